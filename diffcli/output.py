"""Output naming, atomic no-overwrite writes, and the metadata that makes an image reproducible."""

from __future__ import annotations

import json
import os
import re
import signal
import string
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from diffcli.errors import RuntimeFailure, UsageError

DEFAULT_DIR = "outputs"
DEFAULT_TEMPLATE = "{index:05d}-{seed}-{slug}.png"
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
TEMPLATE_FIELDS = ("index", "seed", "slug", "prompt", "model", "steps", "cfg", "scheduler", "width", "height", "date", "time")
EXIF_USER_COMMENT = 0x9286  # where A1111 stores `parameters` in JPEG and WebP files
EXIF_IFD = 0x8769


def slugify(text: str, limit: int = 40) -> str:
    """Filesystem-safe short form of a prompt."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def next_index(folder: Path) -> int:
    """The running number after the highest numeric file-name prefix already in `folder`."""
    numbers = [int(m.group()) for p in folder.glob("*") if (m := re.match(r"\d+", p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def plan_paths(out: str | None, seeds: list[int], fields: dict, overwrite: bool, index_offset: int = 0) -> list[Path]:
    """Every output path of a job, decided (and checked for clashes) before any compute.

    `out` is a file (`car.png`; several images become `car-1.png`, `car-2.png`...), a folder
    (existing, or ending in `/`, or without a suffix), or a template with {fields}.
    """
    out = out or os.environ.get("DIFFCLI_OUTPUT") or DEFAULT_DIR
    if "{" in out:
        template = out
    elif out.endswith(("/", os.sep)) or Path(out).is_dir() or not Path(out).suffix:
        template = str(Path(out) / DEFAULT_TEMPLATE)
    elif len(seeds) == 1:
        template = out
    else:
        stem = Path(out)
        template = str(stem.with_name(f"{stem.stem}-{{number}}{stem.suffix}"))
    _check_template(template)
    folder = Path(_render(template, dict(fields, index=0, seed=seeds[0], number=1))).parent
    start = next_index(folder) + index_offset if "{index" in template else 0  # offset: earlier jobs of the same run
    paths = [Path(_render(template, dict(fields, index=start + i, seed=s, number=i + 1))) for i, s in enumerate(seeds)]
    _check_paths(paths, overwrite)
    return paths


def _check_template(template: str) -> None:
    """Unknown fields and unsupported extensions are usage errors."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        raise UsageError(f"--out {template!r} is not a valid name template: {exc}") from None
    unknown = names - set(TEMPLATE_FIELDS) - {"number"}
    if unknown:
        raise UsageError(f"--out has unknown field {{{sorted(unknown)[0]}}}", f"fields: {', '.join(TEMPLATE_FIELDS)}")
    suffix = Path(template).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--out {template!r}: unsupported image type {suffix or '(none)'!r}", "use .png, .jpg or .webp")


def _render(template: str, fields: dict) -> str:
    """Fill a template; a bad format spec is a usage error."""
    now = datetime.now()
    try:
        return template.format(**{"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H%M%S"), **fields})
    except (ValueError, KeyError, IndexError) as exc:
        raise UsageError(f"--out {template!r}: {exc}") from None


def _check_paths(paths: list[Path], overwrite: bool) -> None:
    """No duplicate names, no silent overwrite, and a writable parent folder."""
    if len(set(paths)) != len(paths):
        raise UsageError("--out template gives several images the same name", "add {index} or {seed} to it")
    for path in paths:
        if path.is_dir():
            raise UsageError(f"--out: {path} is a folder, not a file")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} already exists", "pass --overwrite to replace it, or choose another --out")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"--out: cannot create folder {path.parent}: {parent} is a file")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"--out: folder {parent} is not writable")


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text that A1111, ComfyUI loaders and civitai read."""
    lines = [meta["prompt"]]
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    fields = {
        "Steps": meta["steps"],
        "Sampler": meta["sampler"],
        "CFG scale": f"{meta['cfg']:g}",
        "Seed": meta["seed"],
        "Size": f"{meta['width']}x{meta['height']}",
        "Model hash": meta.get("model_hash"),
        "Model": meta["model"],
        "Variation seed": meta.get("variation_seed"),
        "Variation seed strength": meta.get("variation_strength"),
        "Clip skip": meta.get("clip_skip"),
        "Denoising strength": meta.get("hires_strength", meta.get("strength")),
        "Hires upscale": meta.get("hires_scale"),
        "Hires steps": meta.get("hires_steps"),
        "Hires upscaler": {"latent": "Latent", "lanczos": "Lanczos", "x4": "SD x4"}.get(meta.get("hires_upscaler")),
        "Refiner": meta.get("refiner"),
        "Refiner switch at": meta.get("refiner_start"),
        "Lora hashes": f'"{meta["lora_hashes"]}"' if meta.get("lora_hashes") else None,
        "TI hashes": f'"{meta["embedding_hashes"]}"' if meta.get("embedding_hashes") else None,
        "Version": f"diffcli {meta['versions']['diffcli']}",
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v not in (None, "")))
    return "\n".join(lines)


def encode_image(image, path: Path, meta: dict) -> bytes:
    """The file's bytes: PNG with `parameters` and `diffcli` text chunks, or JPEG/WebP with EXIF."""
    import io

    from PIL import Image, PngImagePlugin

    fmt = FORMATS[path.suffix.lower()]
    buffer = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", a1111_parameters(meta))
        info.add_text("diffcli", json.dumps(meta, sort_keys=True))
        image.save(buffer, fmt, pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + a1111_parameters(meta).encode("utf-16-be")
        image.convert("RGB").save(buffer, fmt, exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


_held: list[list] = []  # signals caught by the signals_held blocks now open, innermost last


def interrupt_pending() -> bool:
    """Whether a signal arrived inside an open signals_held block (it is delivered when the block ends)."""
    return any(_held)


@contextmanager
def signals_held():
    """Defer Ctrl-C and SIGTERM until the block ends, then deliver the first one to its usual handler.

    (Blocking signals with a thread mask would not do: the kernel hands a process signal to any thread that does not
    block it, such as torch's workers, and Python then runs the handler in the main thread all the same.)
    """
    if threading.current_thread() is not threading.main_thread():  # Python runs handlers in the main thread only
        yield
        return
    caught = []
    record = lambda signum, frame: caught.append((signum, frame))  # noqa: E731
    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    _held.append(caught)
    try:
        yield
    finally:
        _held.pop()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum, frame in caught[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(signum)


def write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    """Write via a temp file in the same folder; never replace an existing file unless asked.

    An interrupt during the write waits until it is done, so it never leaves a `.part` file behind.
    """
    with signals_held():
        _write_atomic(path, data, overwrite)


def _write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise RuntimeFailure(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the file appeared meanwhile: no race, no overwrite
            except FileExistsError:
                raise UsageError(f"{path} already exists", "pass --overwrite to replace it") from None
            except OSError:  # no hard links on this filesystem: check, then rename
                if path.exists():
                    raise UsageError(f"{path} already exists", "pass --overwrite to replace it") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise RuntimeFailure(f"cannot write {path}: {exc.strerror or exc}", "check free space and permissions") from exc
        raise


def read_metadata(path: Path) -> dict:
    """The diffcli JSON settings stored in an image written by diffcli (empty if none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("diffcli")
    return json.loads(text) if text else {}
