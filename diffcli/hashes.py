"""Weight and file hashes (sha256), cached on disk by path, size and mtime: image ids, metadata, A1111's hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """Where diffcli keeps small caches (weight hashes); $DIFFCLI_HOME overrides."""
    return Path(os.environ.get("DIFFCLI_HOME") or Path.home() / ".cache" / "diffcli")


def model_hash(spec) -> str:
    """A model's A1111-style short hash (sha256, 10 hex digits) of its weights (a folder's denoiser file); "" for a
    Hub model (the Hub records the revision; hashing multi-GB cached blobs is not worth the wait)."""
    target = Path(spec.location)
    if spec.source in ("folder", "bundled"):
        denoiser = target / ("transformer" if (target / "transformer").is_dir() else "unet")
        files = sorted(denoiser.glob("*.safetensors")) or sorted(denoiser.glob("*.bin"))
        target = files[0] if files else target / "model_index.json"
    elif spec.source == "hub":
        return ""
    return file_hash(target)[:10]


def file_hash(path: Path, tensors_only: bool = False) -> str:
    """sha256 hex digest of a file, cached in cache_dir()/hashes.json by path, size and mtime; `tensors_only`: a
    safetensors file's tensor bytes only (the "addnet" hash A1111 gives LoRAs)."""
    target = Path(path)
    stat = target.stat()
    key = f"sha256{':tensors' if tensors_only else ''}:{target.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = cache_dir() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with target.open("rb") as handle:
            if tensors_only:
                handle.seek(8 + int.from_bytes(handle.read(8), "little"))
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a cache that cannot be written only costs time
    return cache[key]
