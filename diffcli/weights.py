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
import json
import math
import os
import re
import struct
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

MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
GGUF_VERSIONS = (2, 3)  # the versions the gguf package reads (1 is llama.cpp's first, long gone)
GGUF_MAX_COUNT = 1_000_000  # tensors or metadata entries: FLUX.1 has ~800, the largest LLMs a few thousand
GGUF_MIN_ENTRY = 13  # bytes of the smallest tensor info or metadata entry (name length, a name, a type and a value)
# Bits per element of each safetensors dtype (the format's table); a dtype not listed skips the size check.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
              "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
              "F6_E2M3": 6, "F6_E3M2": 6}


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
        check_gguf_header(path, head, size)
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


def pickle_shapes(path: str | Path, flag: str) -> dict[str, list[int]]:
    """Tensor name -> shape of an allowed pickle (the restricted unpickler), out of a training checkpoint's
    {"state_dict": ...} wrapper; read once per file version (a batch plans each of its jobs)."""
    stat = Path(path).stat()
    return dict(_pickle_shapes(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, flag))


@functools.lru_cache(maxsize=8)
def _pickle_shapes(path: str, size: int, mtime_ns: int, flag: str) -> dict:
    return {name: list(value.shape) for name, value in unwrapped(load_state_dict(path, flag, True)).items()}


def unwrapped(state: dict) -> dict:
    """The tensors of a state dict, out of a training checkpoint's {"state_dict": ...} wrapper."""
    inner = state.get("state_dict") if isinstance(state, dict) else None
    state = inner if isinstance(inner, dict) else state if isinstance(state, dict) else {}
    return {name: value for name, value in state.items() if isinstance(name, str) and hasattr(value, "shape")}


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


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON), checked as the format
    specifies: every malformed header, file or entry is a ModelError, never another exception."""
    path = Path(path)
    try:
        size = path.stat().st_size
        handle = path.open("rb")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    with handle:
        head = handle.read(max(8, len(LFS_POINTER)))
        if size == 0:
            raise ModelError(f"{path} is empty", "was the download interrupted?")
        if head.startswith(LFS_POINTER):
            raise ModelError(f"{path} is a git-lfs pointer, not the weights", "run `git lfs pull` in its repository")
        if head.startswith(b"PK\x03\x04"):
            raise ModelError(f"{path} is a PyTorch zip (pickle) checkpoint, not safetensors", "rename it to .ckpt")
        if size < 8:
            raise ModelError(f"{path} is not a safetensors file: only {size} bytes")
        (length,) = struct.unpack("<Q", head[:8])
        if length > MAX_HEADER or not head[8:9] == b"{":
            raise ModelError(f"{path} is not a safetensors file (no JSON header at its start)")
        if 8 + length > size:
            raise ModelError(f"{path} is truncated: its header needs {8 + length} bytes, the file has {size}")
        handle.seek(8)
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4300-digit numbers, nesting thousands deep
            raise ModelError(f"{path} is not a safetensors file (bad JSON header: {str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (header is not a JSON object)")
    end = _data_end(path, header)
    if 8 + length + end > size:
        raise ModelError(
            f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has {size}",
            "download it again",
        )
    return header


def check_gguf_header(path: str | Path, head: bytes, size: int) -> None:
    """The fixed GGUF header (magic, version, tensor and metadata counts) is one a file of `size` bytes can hold,
    checked before the gguf package's reader allocates anything for it."""
    if len(head) < 24:
        raise ModelError(f"{path} is truncated: a GGUF header needs 24 bytes, the file has {size}")
    version, tensors, entries = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise ModelError(f"{path} is GGUF version {version}, diffcli reads versions {GGUF_VERSIONS[0]}-{GGUF_VERSIONS[-1]}",
                         "convert it again with a current gguf package")
    if max(tensors, entries) > GGUF_MAX_COUNT or 24 + (tensors + entries) * GGUF_MIN_ENTRY > size:
        raise ModelError(f"{path} is not a valid GGUF file: it claims {tensors} tensors and {entries} metadata entries "
                         f"in {size} bytes", "is it complete? download it again")


def read_gguf_tensors(path: str | Path) -> dict:
    """Tensor names and shapes of a GGUF file, as a safetensors header holds them (torch's order), read with the gguf
    package's reader (memory-mapped: no tensor data is read); a malformed file is a ModelError."""
    from diffcli import extras

    try:
        from gguf import GGUFReader
    except ImportError:
        raise extras.missing("gguf", f"--model {str(path)!r} (a GGUF file)") from None
    file_format(path)  # the fixed header first
    try:
        reader = GGUFReader(str(path))
        return {t.name: {"shape": [int(n) for n in reversed(t.shape.tolist())], "type": t.tensor_type.name}
                for t in reader.tensors}
    except Exception as exc:  # noqa: BLE001 - the reader's errors for damaged files vary (ValueError, struct, numpy)
        raise ModelError(f"{path} is not a valid GGUF file: {_first(exc)[:200]}", "is it complete? download it again") from None


def _is_size(value) -> bool:
    return type(value) is int and value >= 0  # not bool, not float


def _data_end(path: Path, header: dict) -> int:
    """Check each entry as the safetensors format defines it (a dtype, a shape of sizes, [begin, end] data offsets
    holding exactly the shape's bytes; __metadata__ strings only); returns where the tensor data ends."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ModelError(f"{path} is not a valid safetensors file: __metadata__ must map names to strings")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path} is not a valid safetensors file: tensor {name[:80]!r}"
        if not isinstance(entry, dict):
            raise ModelError(f"{where} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise ModelError(f"{where} has no dtype name, got {json.dumps(dtype)[:40]}")
        if not isinstance(shape, list) or not all(_is_size(n) for n in shape):
            raise ModelError(f"{where}: shape must be a list of sizes >= 0, got {json.dumps(shape)[:40]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets)) and offsets[0] <= offsets[1]):
            raise ModelError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {json.dumps(offsets)[:40]}")
        bits = DTYPE_BITS.get(dtype)
        if bits is not None and math.prod(shape) * bits != (offsets[1] - offsets[0]) * 8:
            raise ModelError(f"{where}: shape {json.dumps(shape)[:40]} of {dtype} does not fill its data_offsets "
                             f"({offsets[1] - offsets[0]} bytes)")
        end = max(end, offsets[1])
    return end
