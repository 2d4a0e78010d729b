"""The HTTP side: A1111's /sdapi/v1 endpoints and diffcli's native /diffcli/v1 ones on FastAPI, with Basic auth and
body limits. Requests become plans here (intake; bad ones are answered 422 before they are queued) and run on the
Broker's workers."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from diffcli import __version__
from diffcli.errors import DiffcliError, UsageError
from diffcli.server import a1111, intake
from diffcli.server.worker import Broker, Busy

RETRY_AFTER_S = 5  # what a 503 asks the client to wait


@dataclass
class Settings:
    """What `diffcli serve` was started with (its command line: the only source of trust)."""

    served: intake.Served  # what every request is built with
    broker: Broker
    users: dict[str, str] = field(default_factory=dict)  # --api-auth user -> password; empty: no auth


def _error(status: int, exc: Exception, folder: Path | None = None) -> JSONResponse:
    """A1111's error shape: error type, detail and errors (the message)."""
    message = str(exc)
    if folder is not None:
        message = intake.public(message, folder)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": type(exc).__name__, "detail": message, "errors": message}, status, headers=headers)


def _status(exc: Exception) -> int:
    if isinstance(exc, Busy):
        return 503
    if isinstance(exc, intake.TooLarge):
        return 413
    if isinstance(exc, UsageError):
        return 422
    return 500


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="diffcli", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    served, broker = settings.served, settings.broker
    limits, catalog = served.limits, served.catalog

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Basic auth (when --api-auth) and the body limit, before any route reads the body."""
        if settings.users and not _authorized(request.headers.get("authorization", ""), settings.users):
            return JSONResponse({"detail": "Incorrect username or password"}, 401, headers={"WWW-Authenticate": "Basic"})
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_mb * 2**20:
            return _error(413, intake.TooLarge(f"request body over {limits.max_body_mb:g} MB"))
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        size, chunks = 0, []
        async for chunk in request.stream():  # chunked bodies have no content-length: counted as they arrive
            size += len(chunk)
            if size > limits.max_body_mb * 2**20:
                raise intake.TooLarge(f"request body over {limits.max_body_mb:g} MB")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"{}")
        except ValueError as exc:
            raise UsageError(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise UsageError("the body must be a JSON object")
        return body

    def start(command: str, values: dict):
        """Plans of a request (all checks), then queued: (task, folder); the folder holds its decoded images."""
        folder = Path(tempfile.mkdtemp(prefix="diffcli-request-"))
        try:
            made = intake.build(command, values, served, folder)
            task = broker.submit(intake.plan(made, limits))
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, DiffcliError) and not isinstance(exc, Busy):
                exc.message = intake.public(exc.message, folder)
            raise
        return task, folder

    def collect(task, folder: Path) -> list[tuple]:
        """Every image of a finished task (images made before an interrupt included); an error raises."""
        try:
            events = list(task.results())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        errors = [event[1] for event in events if event[0] == "error"]
        if errors:
            raise errors[0]
        return [event for event in events if event[0] == "image"]

    def a1111_images(command: str, values: dict, body: dict) -> dict:
        entry = catalog.find(values["model"]) if values.get("model") else catalog.default
        task, folder = start(command, dict(values, model=entry.name))
        started = time.strftime("%Y%m%d%H%M%S")
        images = collect(task, folder)
        records = [{key: value for key, value in event[4].items() if key != "timings"} for event in images]
        return {"images": [base64.b64encode(event[3]).decode() for event in images], "parameters": body,
                "info": a1111.info(records, values, started, entry.name)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        async def work():
            body = await body_of(request)
            return await run_in_threadpool(a1111_images, "txt2img", a1111.txt2img_values(body), body)
        return await _guarded(work)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        async def work():
            body = await body_of(request)
            command, values = a1111.img2img_values(body)
            return await run_in_threadpool(a1111_images, command, values, body)
        return await _guarded(work)

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(request: Request):
        async def work():
            body = await body_of(request)
            return await run_in_threadpool(upscale_one, body)
        return await _guarded(work)

    def upscale_one(body: dict) -> dict:
        """A1111's extras upscale: SD x4 through `diffcli upscale`, or a plain resize; then resized to the factor."""
        import io

        from PIL import Image

        factor = a1111._number(body, "upscaling_resize", float, 2.0)
        name = a1111._text(body, "upscaler_1", "None").strip()
        if not 0 < factor <= 4:
            raise UsageError(f"upscaling_resize must be in (0, 4], got {factor:g}")
        if name.lower() in a1111.PIXEL_UPSCALERS:
            folder = Path(tempfile.mkdtemp(prefix="diffcli-request-"))
            try:
                from diffcli.images import load_image

                image = load_image(intake.decode_image(body.get("image"), "image", folder, "image.img", limits), "image")
            except UsageError as exc:
                raise UsageError(intake.public(exc.message, folder)) from None
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            made, width, height = image, image.width, image.height
        elif name.lower() == "sd x4":
            task, folder = start("upscale", {"input": body.get("image"), "prompt": "", "seed": 0})
            made = Image.open(io.BytesIO(collect(task, folder)[0][3]))
            made.load()
            width, height = made.width / 4, made.height / 4
        else:
            raise UsageError(f"upscaler_1 {name!r} is not available", "None, Lanczos, Nearest or SD x4")
        size = (round(width * factor), round(height * factor))
        if made.size != size:
            made = made.resize(size, Image.NEAREST if name.lower() == "nearest" else Image.LANCZOS)
        buffer = io.BytesIO()
        made.save(buffer, "PNG")
        return {"html_info": f"<p>{name}, x{factor:g}</p>", "image": base64.b64encode(buffer.getvalue()).decode()}

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        async def work():
            body = await body_of(request)
            data = body.get("image")
            if not isinstance(data, str) or not data:
                raise UsageError("image: expected base64 image data")
            try:
                raw = base64.b64decode(intake.DATA_URL.sub("", data.strip(), count=1), validate=True)
            except ValueError:
                raise UsageError("image: not valid base64 data") from None
            return a1111.png_info(raw)
        return await _guarded(work)

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        def listing():
            return [{"title": catalog.title(entry), "model_name": Path(entry.name).with_suffix("").as_posix(),
                     "hash": catalog.short_hash(entry), "sha256": None, "filename": entry.name, "config": None}
                    for entry in catalog.entries.values()]
        return await run_in_threadpool(listing)

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from diffcli.pipeline import SCHEDULERS

        return [{"name": entry.label, "aliases": [name], "options": {}} for name, entry in SCHEDULERS.items()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": name, "label": name.title(), "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name in a1111.SCHEDULES]

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4 if name == "SD x4" else 1}
                for name in ("None", "Lanczos", "Nearest", "SD x4")]

    @app.get("/sdapi/v1/options")
    async def get_options():
        title = await run_in_threadpool(catalog.title, catalog.default)
        return {"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": 1, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        async def work():
            body = await body_of(request)
            if body.get("sd_model_checkpoint"):
                catalog.default = catalog.find(a1111._text(body, "sd_model_checkpoint"))
            return None
        return await _guarded(work)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        running = broker.running()
        idle = {"skipped": False, "interrupted": False, "job": "", "job_count": broker.queue.qsize(), "job_timestamp": "0",
                "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if not running:
            return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
        state = running[0]
        fraction, elapsed = state.fraction(), time.time() - state.started
        image = None if skip_current_image else await run_in_threadpool(a1111.preview, state.latents)
        return {"progress": fraction, "eta_relative": elapsed / fraction - elapsed if fraction else 0.0,
                "state": dict(idle, skipped=state.task.skip, interrupted=state.task.interrupted, job=f"task({id(state.task)})",
                              job_count=broker.queue.qsize() + len(running), job_no=state.job_no,
                              job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(state.started)),
                              sampling_step=state.step, sampling_steps=state.steps),
                "current_image": image, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        broker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        broker.interrupt(skip=True)
        return {}

    @app.get("/diffcli/v1/health")
    async def health():
        return {"diffcli": __version__, "model": catalog.default.name, "queue": broker.queue.qsize(),
                "workers": list(broker.progress)}

    @app.post("/diffcli/v1/plan")
    async def plan(request: Request):
        """What a job line would make: per job its seeds, name fields (the client names its files from them) and ids."""
        async def work():
            command, values = _native(await body_of(request))
            return await run_in_threadpool(plan_only, command, values)
        return await _guarded(work)

    def plan_only(command: str, values: dict) -> dict:
        folder = Path(tempfile.mkdtemp(prefix="diffcli-request-"))
        try:
            made = intake.build(command, values, served, folder)
            plans = intake.plan(made, limits)
        except DiffcliError as exc:
            exc.message = intake.public(exc.message, folder)
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        from diffcli.identity import image_id

        return {"jobs": [{"seeds": each.seeds, "fields": each.name_fields,
                          "ids": [image_id(each.identity, seed) for seed in each.seeds]} for each in plans]}

    @app.post("/diffcli/v1/jobs")
    async def native_jobs(request: Request):
        """A job line (batch's JSON) run; JSON Lines back: one "image" event per image, then "error" or "done"."""
        try:
            command, values = _native(await body_of(request))
            task, folder = await run_in_threadpool(start, command, values)
        except (DiffcliError, Busy) as exc:
            return _error(_status(exc), exc)

        def lines():
            try:
                for event in task.results():
                    if event[0] == "image":
                        _, number, index, png, record = event
                        yield json.dumps({"event": "image", "job": number, "index": index, "record": record,
                                          "png": base64.b64encode(png).decode()}) + "\n"
                    else:
                        exc = event[1]
                        yield json.dumps({"event": "error", "error": type(exc).__name__,
                                          "message": intake.public(str(exc), folder),
                                          "exit_code": getattr(exc, "exit_code", 1)}) + "\n"
                        return
                yield json.dumps({"event": "done"}) + "\n"
            finally:  # also when the client went away: the worker stops at its next step
                task.cancelled.set()
                shutil.rmtree(folder, ignore_errors=True)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


async def _guarded(work):
    """A route's work; expected failures as A1111's error shape (422, 503, 500), the server unharmed."""
    try:
        return await work()
    except (DiffcliError, Busy) as exc:
        return _error(_status(exc), exc)
    except Exception as exc:  # a bug answers its request; the server keeps serving
        return _error(500, RuntimeError(f"unexpected {type(exc).__name__}: {exc}"))


def _native(body: dict) -> tuple[str, dict]:
    values = dict(body)
    command = values.pop("command", None) or values.pop("task", None) or "txt2img"
    if not isinstance(command, str):
        raise UsageError("command: expected a string")
    return command, values


def _authorized(header: str, users: dict[str, str]) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    expected = users.get(user)
    return expected is not None and secrets.compare_digest(password.encode(), expected.encode())
