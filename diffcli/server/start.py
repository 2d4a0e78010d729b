"""`diffcli serve`: its options checked before any model loads, the app and broker built, uvicorn run until SIGTERM."""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from dataclasses import dataclass

from diffcli.errors import UsageError

LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 7860
    model: str | None = None
    models_dir: str | None = None
    lora_dir: str | None = None
    controlnet_dir: str | None = None
    api_auth: str | None = None
    no_auth: bool = False
    queue: int = 8
    devices: str = "auto"
    threads: int | None = None
    keep_models: int = 2
    max_steps: int = 150
    max_pixels: int = 2048 * 2048
    max_images: int = 16
    max_body_mb: float = 64.0
    allow_pickle: bool = False
    preload: bool = True


def parse_users(text: str | None) -> dict[str, str]:
    """--api-auth user:pass[,user2:pass2] (A1111's syntax)."""
    users = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise UsageError("--api-auth: expected user:password[,user2:password2], got an item without both")
        users[user] = password
    return users


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(options: ServeOptions) -> dict[str, str]:
    """Every serve flag, before any model loads; returns the users of --api-auth."""
    from diffcli.options import check_threads

    users = parse_users(options.api_auth)
    if not is_loopback(options.host) and not users and not options.no_auth:
        raise UsageError(f"--host {options.host} opens the server to other machines without a password",
                         "add --api-auth user:password, or --no-auth if the network is trusted")
    if not 0 < options.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {options.port}")
    for flag, value in (("--queue", options.queue), ("--keep-models", options.keep_models), ("--max-steps", options.max_steps),
                        ("--max-pixels", options.max_pixels), ("--max-images", options.max_images),
                        ("--max-body-mb", options.max_body_mb)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value:g}")
    check_threads(options.threads)
    return users


def devices_of(text: str) -> list[str]:
    """--devices: a comma list (one worker each), or auto (one worker on the best device)."""
    from diffcli.pipeline import resolve_device

    names = [item.strip() for item in text.split(",") if item.strip()] or ["auto"]
    devices = [resolve_device(name) for name in names]
    if len(set(devices)) != len(devices):
        raise UsageError(f"--devices names a device twice: {text}")
    return devices


def build(options: ServeOptions, users: dict[str, str]):
    """The app and its broker (tests serve it in-process)."""
    from diffcli.server import intake
    from diffcli.server.app import Settings, create_app
    from diffcli.server.catalog import Catalog
    from diffcli.server.worker import Broker

    catalog = Catalog(options.model, options.models_dir, options.allow_pickle, options.controlnet_dir)
    if options.lora_dir:
        from diffcli.options import check_path

        check_path("--lora-dir", options.lora_dir)
    limits = intake.Limits(options.max_steps, options.max_pixels, options.max_images, options.max_body_mb)
    served = intake.Served(catalog, limits, options.lora_dir, options.threads, options.allow_pickle)
    broker = Broker(devices_of(options.devices), options.queue, options.keep_models)
    settings = Settings(served, broker, users)
    if options.preload:
        preload(settings)
    return create_app(settings), broker


def preload(settings) -> None:
    """Load the default model on every worker's device now, so the first request finds it warm."""
    import tempfile

    from diffcli import jobs
    from diffcli.pipeline import load_for_job
    from diffcli.plan import plan_job

    served = settings.served
    for device in settings.broker.progress:
        with tempfile.TemporaryDirectory(prefix="diffcli-preload-") as folder:  # paths are planned, nothing written
            job = jobs.build("txt2img", {"prompt": "warm-up", "model": served.catalog.default.spec, "seed": 0,
                                         "out": folder, "device": device, "threads": served.threads,
                                         "allow_pickle": served.allow_pickle})[0]
            plan = plan_job(job)
        load_for_job(plan.spec, "txt2img", plan.job.model, plan.scheduler)


def serve(options: ServeOptions) -> None:
    """Run until SIGTERM/SIGINT: then finish the running requests, answer queued ones 503, and return (exit 0)."""
    from diffcli import extras

    users = check(options)
    for module in ("fastapi", "uvicorn"):
        extras.require(module, "diffcli serve")
    import uvicorn

    with socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET) as probe:  # before loading a model
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: old connections may linger
        try:
            probe.bind((options.host, options.port))
        except OSError as exc:
            raise UsageError(f"--host {options.host} --port {options.port}: cannot listen there: {exc.strerror}",
                             "is another server running? choose another --port") from None
    print(f"diffcli serve: loading {options.model or 'the default model'}...", file=sys.stderr, flush=True)
    app, broker = build(options, users)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            broker.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=None)
    print(f"diffcli serve: http://{options.host}:{options.port} (model {app.state.settings.served.catalog.default.name}, "
          f"workers {', '.join(broker.progress)}, queue {options.queue}"
          f"{', auth on' if users else ''}); Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal after its graceful shutdown
        signal.signal(sig, lambda signum, frame: None)
    Server(config).run()
    broker.stop()
    print("diffcli serve: stopped", file=sys.stderr, flush=True)
