"""Processes of a batch: ranks from accelerate/torchrun's environment, local ranks started by --processes, and the
Ctrl-C that finishes the current image before stopping."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

from diffcli.errors import EXIT_INTERRUPTED


@dataclass
class Ranks:
    """Where this process stands in a launch: rank, world size, local rank (for cuda:N)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    def broadcast(self, value):
        """Rank 0's value on every rank (the base seed), over the process group."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def ranks_from_env() -> Ranks:
    """PartialState when launched by accelerate/torchrun/--processes (WORLD_SIZE > 1), else one rank.

    Without CUDA, PartialState(cpu=True) is what makes the processes form a gloo group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import warnings

    import torch
    from accelerate import PartialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate's OMP_NUM_THREADS notice
        state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(state.process_index, state.num_processes, state.local_process_index)


def spawn(processes: int, argv: list[str], threads: int | None = None) -> int:
    """Start `processes` local ranks of `diffcli batch` (env:// rendezvous, as torchrun would) and wait; each gets
    --threads (in `argv` too) or, unless OMP_NUM_THREADS is set, its share of the cores."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    share = str(max(1, (os.cpu_count() or 1) // processes))
    children = []
    for rank in range(processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                   LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("OMP_NUM_THREADS", share)
        env["DIFFCLI_BATCH_SPAWNED"] = "1"  # the parent already printed the summary
        # A session of their own: a terminal's Ctrl-C reaches only us, and we pass it on once.
        children.append(subprocess.Popen([sys.executable, "-m", "diffcli", "batch", *argv], env=env, start_new_session=True))

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [code for code in codes if code != 0]
    if not failed:
        return 0
    return EXIT_INTERRUPTED if EXIT_INTERRUPTED in failed else failed[0] if failed[0] > 0 else 1


class StopOnSignal:
    """First Ctrl-C: finish the current image, record it, then stop (exit 130). Second: abandon it."""

    def __init__(self, notify):
        self.notify = notify
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.notify("interrupt: finishing the current image (Ctrl-C again to abandon it)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def children_argv(options: dict, values: dict, extra: list[str], base: int, source: str) -> list[str]:
    """The batch command line again for --processes ranks, from its declared `options` (flags.Flag) and `values`: the
    resolved base seed, one process each, the pass-through flags `extra`, the jobs file last."""
    argv = []
    for name, value in values.items():
        flag = options[name]
        if name in ("file", "processes", "seed", "server") or value is None:
            continue
        if flag.kind in (bool, "bools"):
            if value or flag.off:
                argv.append(flag.flags[0] if value else flag.off)
        else:
            argv += [f"{flag.long}={item}" for item in (value if flag.kind == "texts" else [value])]
    return [*argv, f"--seed={base}", *extra, "--", source]
