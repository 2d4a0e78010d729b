"""The server's work: a bounded queue of planned requests and one worker thread per device.

Each worker runs a request's plans through run.images, the same steps a local run takes (so a request's images are
the ones `diffcli txt2img` makes), one pipeline call (--batch-size images) at a time so that skip can move on to the
next call. Progress, interrupt and skip are A1111's (/sdapi/v1/progress, /interrupt, /skip).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffcli.errors import DiffcliError, RuntimeFailure

DONE = "done"


class Busy(Exception):
    """The queue is full, or the server is shutting down: answered 503 with Retry-After."""


class _Stop(Exception):
    """Raised from the step callback: `skip` ends the current call, otherwise the whole request."""

    def __init__(self, skip: bool):
        self.skip = skip


@dataclass
class Task:
    """One request's plans; the worker puts ("image", plan number, index, PNG bytes, record), ("error", exception)
    and finally (DONE,) on `events`."""

    plans: list
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    interrupted: bool = False
    skip: bool = False

    @property
    def image_count(self) -> int:
        return sum(len(plan.seeds) for plan in self.plans)

    def results(self):
        """The events until DONE, in order (blocks while the worker runs)."""
        while True:
            event = self.events.get()
            if event[0] == DONE:
                return
            yield event


@dataclass
class Progress:
    """A1111's /progress state of one worker."""

    task: Task | None = None
    started: float = 0.0
    job_no: int = 0  # pipeline calls finished in this task
    job_count: int = 0
    step: int = 0
    steps: int = 0
    latents: object = None  # of the last step, for a preview when asked

    def fraction(self) -> float:
        if self.task is None or not self.job_count:
            return 0.0
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.job_no + within) / self.job_count)


class Broker:
    """`submit(plans)` -> Task; one worker thread per device takes tasks from a queue of at most `queue_size`."""

    def __init__(self, devices: list[str], queue_size: int, keep_models: int):
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.keep_models = keep_models
        self.draining = False
        self.lock = threading.Lock()
        self.progress = {device: Progress() for device in devices}
        self.threads = [threading.Thread(target=self._work, args=(device,), name=f"diffcli-worker-{device}", daemon=True)
                        for device in devices]
        for thread in self.threads:
            thread.start()

    def submit(self, plans: list) -> Task:
        if self.draining:
            raise Busy("the server is shutting down")
        task = Task(plans)
        try:
            self.queue.put_nowait(task)
        except queue.Full:
            raise Busy(f"the queue is full ({self.queue.maxsize} waiting requests)") from None
        return task

    def drain(self) -> None:
        """Shutting down: refuse new requests and answer the queued ones 503; running requests finish."""
        self.draining = True
        while True:
            try:
                task = self.queue.get_nowait()
            except queue.Empty:
                break
            task.events.put(("error", Busy("the server is shutting down")))
            task.events.put((DONE,))

    def stop(self) -> None:
        self.drain()
        for _ in self.threads:
            self.queue.put(None)

    def running(self) -> list[Progress]:
        return [state for state in self.progress.values() if state.task is not None]

    def interrupt(self, skip: bool = False) -> None:
        """A1111's /interrupt (stop the running requests, keep what they finished) and /skip (their current call)."""
        for state in self.running():
            if skip:
                state.task.skip = True
            else:
                state.task.interrupted = True

    def _work(self, device: str) -> None:
        state = self.progress[device]
        while True:
            task = self.queue.get()
            if task is None:
                return
            state.task, state.started, state.job_no, state.step, state.steps = task, time.time(), 0, 0, 0
            try:
                self._run(task, device, state)
            except DiffcliError as exc:
                task.events.put(("error", exc))
            except Exception as exc:  # a failed job answers its request; the server keeps serving
                task.events.put(("error", RuntimeFailure(f"unexpected {type(exc).__name__}: {exc}")))
            finally:
                state.task, state.latents = None, None
                task.events.put((DONE,))

    def _run(self, task: Task, device: str, state: Progress) -> None:
        from diffcli import output, pipeline, run

        calls = []  # (plan number, plan, first index, part plan): one pipeline call each
        for number, plan in enumerate(task.plans):
            plan.job.model.device = device  # the plan's own copy: this worker's device
            size = max(1, plan.job.sampling.batch_size)
            calls += [(number, plan, start, replace(plan, seeds=plan.seeds[start:start + size],
                                                    paths=plan.paths[start:start + size]))
                      for start in range(0, len(plan.seeds), size)]
        state.job_count = len(calls)

        def on_step(step: int, steps: int, latents) -> None:
            state.step, state.steps, state.latents = step, steps, latents
            if task.cancelled.is_set() or task.interrupted:
                raise _Stop(skip=False)
            if task.skip:
                raise _Stop(skip=True)

        for number, plan, start, part in calls:
            if task.interrupted or task.cancelled.is_set():
                break
            task.skip = False
            try:
                for _, index, image, meta in run.images([part], on_step=on_step):
                    timings = meta.pop("timings")  # the client's --json reports them; the file does not keep them
                    record = run.image_record(plan, start + index, meta)
                    task.events.put(("image", number, start + index, output.encode_image(image, Path("image.png"), record),
                                     dict(record, timings=timings)))
            except _Stop as stop:
                if not stop.skip:
                    break
            finally:
                state.job_no += 1
                state.step = 0
        with self.lock:
            pipeline.trim_cache(self.keep_models * len(self.progress))
