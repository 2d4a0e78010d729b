"""Output naming, atomic no-overwrite writes, and the metadata that makes an image reproducible."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import stat
import string
import threading
import time
import unicodedata
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable

from diffcli.errors import RuntimeFailure, UsageError

DEFAULT_DIR = "outputs"
DEFAULT_TEMPLATE = "{index:05d}-{seed}-{slug}.png"
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
TEMPLATE_FIELDS = ("index", "seed", "slug", "prompt", "model", "steps", "cfg", "scheduler", "width", "height", "date", "time")
EXIF_USER_COMMENT = 0x9286  # where A1111 stores `parameters` in JPEG and WebP files
EXIF_IFD = 0x8769
NAME_MAX = 255  # bytes in one path component (Linux, macOS, Windows); longer names fail with ENAMETOOLONG
PART_EXTRA = len("..XXXXXXXX.part")  # the temporary `.NAME.XXXXXXXX.part` beside a file must fit in NAME_MAX too
FIELD_MAX = 100  # bytes of one text field ({prompt}, {model}...) in a name: room for the template's own text
UNSAFE_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")  # control, escape, format (bidi), lone surrogate, line breaks
STARTED = time.time()  # this process's start: a `.part` file older than it is no write of ours in flight
RENUMBER_TRIES = 1000  # names another run may take from under us before we give up


def slugify(text: str, limit: int = 40) -> str:
    """Filesystem-safe short form of a prompt."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def safe_field(text: str, limit: int = FIELD_MAX) -> str:
    """A text field's value made fit for one file name: no folder separators, NUL, control, escape or bidi
    characters (each becomes `_`), no leading dots, at most `limit` UTF-8 bytes."""
    safe = "".join("_" if ch in "/\\" or unicodedata.category(ch) in UNSAFE_CATEGORIES else ch for ch in text)
    safe = safe.lstrip(".").encode("utf-8")[:limit].decode("utf-8", "ignore")
    return safe or ("_" if text else "")


def next_index(folder: Path) -> int:
    """The running number after the highest numeric file-name prefix already in `folder`."""
    numbers = [int(m.group()) for p in folder.glob("*") if (m := re.match(r"\d+", p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def name_template(out: str | None, count: int) -> str:
    """`--out` as a checked name template for `count` images.

    `out` is a file (`car.png`; several images become `car-1.png`, `car-2.png`...), a folder
    (existing, or ending in `/`, or without a suffix), or a template with {fields}.
    """
    out = out or os.environ.get("DIFFCLI_OUTPUT") or DEFAULT_DIR
    if out == "-":  # stdout is handled before planning, for one image only (cli._run_to_stdout)
        raise UsageError("--out - (stdout) takes exactly one image here", "give a folder or a name template")
    if "{" in out:
        template = out
    elif out.endswith(("/", os.sep)) or Path(out).is_dir() or not Path(out).suffix:
        template = str(Path(out) / DEFAULT_TEMPLATE)
    elif count == 1:
        template = out
    else:
        stem = Path(out)
        template = str(stem.with_name(f"{stem.stem}-{{number}}{stem.suffix}"))
    _check_template(template)
    return template


def plan_paths(out: str | None, seeds: list[int], fields: dict, overwrite: bool, index_offset: int = 0) -> list[Path]:
    """Every output path of a job, decided (and checked for clashes) before any compute (see name_template)."""
    template = name_template(out, len(seeds))
    folder = Path(_render(template, dict(fields, index=0, seed=seeds[0], number=1))).parent
    start = next_index(folder) + index_offset if "{index" in template else 0  # offset: earlier jobs of the same run
    paths = [Path(_render(template, dict(fields, index=start + i, seed=s, number=i + 1))) for i, s in enumerate(seeds)]
    check_paths(paths, overwrite)
    return paths


def renumber(template: str, fields: dict, seed: int, number: int) -> Callable[[int], Path] | None:
    """For a template with {index}: one image's name with another running number (see write_new); else None."""
    if "{index" not in template:
        return None
    return lambda index: Path(_render(template, dict(fields, index=index, seed=seed, number=number)))


def _check_template(template: str) -> None:
    """Unknown fields and unsupported extensions are usage errors."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        raise UsageError(f"--out {template!r} is not a valid name template: {exc}") from None
    unknown = names - set(TEMPLATE_FIELDS) - {"number"}
    if unknown:
        raise UsageError(f"--out has unknown field {{{sorted(unknown)[0]}}}", f"fields: {', '.join(TEMPLATE_FIELDS)}")
    if any(unicodedata.category(ch) == "Cc" for ch in template):
        raise UsageError(f"--out {template!r} contains control characters")
    suffix = Path(template).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise UsageError(f"--out {template!r}: unsupported image type {suffix or '(none)'!r}", "use .png, .jpg or .webp")


def _render(template: str, fields: dict) -> str:
    """Fill a template, text fields made safe (safe_field): a value never adds a folder; a bad format spec is a
    usage error."""
    now = datetime.now()
    fields = {name: safe_field(value) if isinstance(value, str) else value for name, value in fields.items()}
    try:
        return template.format(**{"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H%M%S"), **fields})
    except (ValueError, KeyError, IndexError) as exc:
        raise UsageError(f"--out {template!r}: {exc}") from None


def check_paths(paths: list[Path], overwrite: bool) -> None:
    """No duplicate names, no silent overwrite, and a writable parent folder."""
    if len(set(paths)) != len(paths):
        raise UsageError("--out template gives several images the same name", "add {index} or {seed} to it")
    for path in paths:
        for part in path.parts:
            limit = NAME_MAX - PART_EXTRA if part == path.name else NAME_MAX
            if len(os.fsencode(part)) > limit:
                raise UsageError(f"--out: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes, over {limit}",
                                 "use fewer or shorter fields, e.g. {slug} instead of {prompt}")
        if path.is_dir():
            raise UsageError(f"--out: {path} is a folder, not a file")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} already exists", "pass --overwrite to replace it, or choose another --out")
        if path.is_symlink() and not overwrite:  # dangling: exists() follows links; the write would refuse it later
            raise UsageError(f"{path} already exists as a link to a missing file",
                             "pass --overwrite to replace the link itself (never what it points to), or choose another --out")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"--out: cannot create folder {path.parent}: {parent} is a file")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"--out: folder {parent} is not writable")


def emit_line(text: str) -> None:
    """One result line on stdout in a single write, so lines of processes sharing a pipe never interleave (print
    writes the text and its newline separately when stdout is unbuffered, e.g. PYTHONUNBUFFERED=1)."""
    import sys

    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def check_distinct(paths: list[Path], seen: set, out: str | None) -> None:
    """No two images of one run (a sweep's jobs) share a name: `seen` holds the earlier jobs' paths, and grows."""
    for path in paths:
        if path in seen:
            raise UsageError(f"--out {out or DEFAULT_DIR!r} gives several images the name {path}",
                             "use a folder, or a template with {index}, or with {cfg}, {steps}, {seed} or {scheduler} for a sweep")
        seen.add(path)


def check_stdout(as_json: bool) -> None:
    """`--out -` writes PNG bytes to stdout: not also JSON lines, and never to a terminal."""
    import sys

    if as_json:
        raise UsageError("--out - and --json both want stdout", "drop one of them")
    if sys.stdout.isatty():
        raise UsageError("--out - would write PNG bytes to the terminal", "redirect stdout: > image.png, or | another program")


def write_stdout(data: bytes) -> None:
    """An image's bytes to stdout (`--out -`); a reader that has gone is one clear failure, not a traceback."""
    import sys

    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # the reader has gone (`| head -c 1`, a closed pipe)
        try:  # what is left in the buffer goes nowhere, so Python's exit flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file descriptor (in-process tests)
            pass
        raise RuntimeFailure("stdout closed before the image was written (the reader of the pipe has gone)") from None


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text that A1111, ComfyUI loaders and civitai read."""
    from diffcli import controlnet, ip_adapter
    from diffcli.vae import a1111_name

    lines = [meta["prompt"]]
    distilled = meta.get("guidance") in ("distilled", "none")  # FLUX.1: --cfg is the embedded guidance, as Forge writes
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    fields = {
        "Steps": meta["steps"],
        "Sampler": meta["sampler"],
        # Forge's FLUX.1 fields: CFG scale is its true CFG (above 1: an unconditional pass), so --true-cfg goes there
        "CFG scale": (f"{meta['true_cfg']:g}" if meta.get("true_cfg") is not None else "1") if distilled else f"{meta['cfg']:g}",
        "Distilled CFG Scale": f"{meta['cfg']:g}" if distilled else None,
        "Seed": meta["seed"],
        "Size": f"{meta['width']}x{meta['height']}",
        "Model hash": meta.get("model_hash"),
        "Model": meta["model"],
        "VAE": a1111_name(meta["vae"]) if meta.get("vae") else None,
        "VAE hash": meta.get("vae_hash"),
        "Variation seed": meta.get("variation_seed"),
        "Variation seed strength": meta.get("variation_strength"),
        "Clip skip": meta.get("clip_skip"),
        "Max sequence length": meta.get("max_sequence_length"),
        "Denoising strength": meta.get("hires_strength", meta.get("strength")),
        "Hires upscale": meta.get("hires_scale"),
        "Hires steps": meta.get("hires_steps"),
        "Hires upscaler": {"latent": "Latent", "lanczos": "Lanczos", "x4": "SD x4"}.get(meta.get("hires_upscaler")),
        "Masked content": {"fill": "fill", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}.get(meta.get("fill")),
        "Refiner": meta.get("refiner"),
        "Refiner switch at": meta.get("refiner_start"),
        **controlnet.a1111_fields(meta),
        **ip_adapter.a1111_fields(meta),
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

    fmt = IMAGE_FORMATS[path.suffix.lower()]
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


class NameTaken(UsageError):
    """The file to write exists and --overwrite was not given."""


def write_new(path: Path, data: bytes, overwrite: bool, numbered: Callable[[int], Path] | None = None) -> Path:
    """write_atomic, claiming the name atomically; when another run took `path` since it was planned and `numbered`
    gives the name with another running number (see renumber), take the next free number. Returns the path written."""
    number = -1
    for _ in range(RENUMBER_TRIES):
        try:
            write_atomic(path, data, overwrite)
            return path
        except NameTaken:
            if numbered is None:
                raise
            number = max(next_index(path.parent), number + 1)
            path = numbered(number)
    raise RuntimeFailure(f"cannot write {path}: {RENUMBER_TRIES} names in a row were taken by other runs")


def write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    """Write via a temp file in the same folder; never replace an existing file unless asked.

    An interrupt during the write waits until it is done, so it never leaves a `.part` file behind; a kill -9 can,
    and the next write of that name removes it (_remove_stale_parts).
    """
    with signals_held():
        _write_atomic(path, data, overwrite)


def _temp_file(path: Path) -> tuple[int, str]:
    """A new `.NAME.XXXXXXXX.part` beside `path`, created as any new file is (mode 0666 less the umask, unlike
    mkstemp's 0600)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _remove_stale_parts(path: Path) -> None:
    """Delete `.NAME.XXXXXXXX.part` files of this very name that are ours and older than this process: what a run
    killed during its write left (mkstemp's names, of earlier versions, match too)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]{8}\.part")
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and uid in (None, info.st_uid) and info.st_mtime < STARTED:
                os.unlink(entry.path)
        except OSError:
            pass  # gone already, or not ours to remove


def _write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(path)
        fd, tmp = _temp_file(path)
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
                raise NameTaken(f"{path} already exists", "pass --overwrite to replace it") from None
            except OSError:  # no hard links on this filesystem: check, then rename
                if path.exists():
                    raise NameTaken(f"{path} already exists", "pass --overwrite to replace it") from None
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
