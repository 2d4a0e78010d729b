"""Weight files: their format decided from their bytes in one place, and loaded as data only.

Every weight file diffcli opens (model, refiner, upscaler, LoRA, embedding, VAE) goes through here:
`file_format` reads the first bytes (never the name), `check` is the plan-time gate (format and trust,
no tensor data read), `load_state_dict` loads tensors. Pickle is refused unless the command line
said `--allow-pickle`, and even then goes through torch's restricted unpickler (`weights_only=True`),
so no file can run code. Inside `no_payloads()` (batch --dry-run) no pickle is opened at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import re
import tempfile
from pathlib import Path

from diffcli.errors import ModelError

SAFETENSORS, PICKLE, GGUF = "safetensors", "pickle", "gguf"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")  # only to find candidates in a folder
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format, whose data.pkl is a pickle
PICKLE_PROTOCOL = 0x80  # the PROTO opcode that starts a protocol 2+ pickle (torch's legacy format)
GGUF_MAGIC = b"GGUF"
PICKLE_HINT = "convert it to .safetensors, or pass --allow-pickle if you trust its source"
_payloads_allowed = contextvars.ContextVar("payloads_allowed", default=True)


def file_format(path: str | Path) -> str:
    """safetensors, pickle or gguf, from the file's first bytes; anything else is a ModelError."""
    path = Path(path)
    return _sniff(str(path.resolve()), *_stamp(path))


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _sniff(path: str, size: int, mtime_ns: int) -> str:
    """The format of a file as it is now (cached by size and mtime, so a batch reads each header once)."""
    from diffcli.checkpoints import read_safetensors_header

    try:
        with open(path, "rb") as handle:
            head = handle.read(max(16, len(LFS_POINTER)))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if size == 0:
        raise ModelError(f"{path} is empty", "was the download interrupted?")
    if head.startswith(LFS_POINTER):
        raise ModelError(f"{path} is a git-lfs pointer, not the weights", "run `git lfs pull` in its repository")
    if head.startswith(ZIP_MAGIC):
        return PICKLE
    if head.startswith(GGUF_MAGIC):
        return GGUF
    if head[8:9] == b"{":  # 8-byte header length, then JSON (tested before pickle: the length may start 0x80)
        read_safetensors_header(path)  # a complete, parseable header, or a one-line error saying what is wrong
        return SAFETENSORS
    if len(head) > 1 and head[0] == PICKLE_PROTOCOL and 2 <= head[1] <= 5:  # PROTO n: torch's legacy format, any pickle
        return PICKLE
    raise ModelError(f"{path} is not a weight file diffcli can read (not safetensors, GGUF or a PyTorch checkpoint)",
                     "is it complete, and a model file at all?")


def check(path: str | Path, flag: str, allow_pickle: bool, formats: tuple[str, ...] = (SAFETENSORS, PICKLE)) -> str:
    """The plan-time gate for one weight file: its format (from its bytes) is one `formats` allows, and a
    pickle only with --allow-pickle. Reads headers only."""
    fmt = file_format(path)
    if fmt not in formats:
        raise ModelError(f"{flag} {str(path)!r} is a {fmt} file, which diffcli cannot load here",
                         f"use a {' or '.join(f for f in formats if f != PICKLE)} file")
    if fmt == PICKLE and not allow_pickle:
        raise ModelError(f"{flag} {str(path)!r} is a pickle file (whatever its name), which can run code when loaded",
                         PICKLE_HINT)
    return fmt


def check_folder(folder: str | Path, flag: str, allow_pickle: bool) -> None:
    """The weight files of a diffusers model folder (its root and each component folder) pass `check`.

    Where a folder holds safetensors files the loaders read only those (use_safetensors), so pickle-named files
    beside them are left unopened; a file named .safetensors must be safetensors in its bytes.
    """
    folder = Path(folder)
    for place in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        files = sorted(p for p in place.iterdir() if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES))
        named_safe = [p for p in files if p.name.lower().endswith(".safetensors")]
        for path in named_safe or files:
            check(path, flag, allow_pickle)


@contextlib.contextmanager
def no_payloads():
    """Within this block no weight file's payload is opened (batch --dry-run): loading one is an error."""
    token = _payloads_allowed.set(False)
    try:
        yield
    finally:
        _payloads_allowed.reset(token)


def payloads_allowed() -> bool:
    return _payloads_allowed.get()


def load_state_dict(path: str | Path, flag: str, allow_pickle: bool) -> dict:
    """A file's tensors: safetensors as data, pickle (when allowed) through torch's restricted unpickler."""
    path = Path(path)
    fmt = check(path, flag, allow_pickle)
    if not payloads_allowed():
        raise ModelError(f"{flag} {str(path)!r}: --dry-run opens no weight file", "run without --dry-run")
    if fmt == SAFETENSORS:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the library's errors for damaged files vary
            raise ModelError(f"{flag} {str(path)!r} cannot be read as safetensors: {_first(exc)}") from None
    return _load_pickle(path, flag)


def _load_pickle(path: Path, flag: str) -> dict:
    """torch.load with weights_only=True: tensors, numbers, strings and containers, never arbitrary objects."""
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(named_for_loader(path, PICKLE), map_location="cpu", weights_only=True,
                           mmap=zipfile.is_zipfile(path))  # (torch too decides by the name: x.safetensors is not unpickled)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{flag} {str(path)!r} needs more than tensors to load (it names {_global_named(exc)}), "
                         "and diffcli never runs code from a weight file", "convert it to .safetensors from a trusted copy") from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, bad pickles: any failure means unreadable
        raise ModelError(f"{flag} {str(path)!r} cannot be read as a PyTorch checkpoint: {_first(exc)}") from None
    if not isinstance(state, dict):
        raise ModelError(f"{flag} {str(path)!r} holds a {type(state).__name__}, not a dictionary of tensors")
    return state


def _global_named(exc: Exception) -> str:
    """The global torch's restricted unpickler refused (e.g. posix.system), from its message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else "an object that is not a tensor"


def _first(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


LOADER_SUFFIX = {SAFETENSORS: "safetensors", GGUF: "gguf", PICKLE: "ckpt"}
_links: tempfile.TemporaryDirectory | None = None


def named_for_loader(path: str | Path, fmt: str) -> str:
    """`path`, or a link to it whose suffix tells diffusers the format we read from the bytes (diffusers decides
    by the name: a safetensors file called x.SAFETENSORS would go to torch.load, a pickle called .safetensors
    to safetensors)."""
    global _links
    path = Path(path)
    suffix = path.name.rsplit(".", 1)[-1]  # what diffusers' load_state_dict looks at
    by_name = {"safetensors": SAFETENSORS, "gguf": GGUF}.get(suffix, PICKLE)  # torch.load for any other name
    if by_name == fmt:
        return str(path)
    if _links is None:
        _links = tempfile.TemporaryDirectory(prefix="diffcli-weights-")
    link = Path(_links.name) / f"{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]}.{LOADER_SUFFIX[fmt]}"
    if not link.exists():
        os.symlink(path.resolve(), link)
    return str(link)
