"""Weight and file hashes (sha256), cached on disk by path, size and mtime: image ids, metadata, A1111's hashes."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where diffcli keeps small caches (weight hashes); $DIFFCLI_HOME overrides."""
    return Path(os.environ.get("DIFFCLI_HOME") or Path.home() / ".cache" / "diffcli")


def model_hash(spec) -> str:
    """A model's A1111-style short hash (models.model_hash; read from the disk cache while the file is unchanged)."""
    from diffcli import models

    return models.model_hash(spec, cache_dir())


def file_hash(path: Path, tensors_only: bool = False) -> str:
    """sha256 of a file (`tensors_only`: of a safetensors file's tensor bytes, A1111's LoRA hash)."""
    from diffcli.models import file_sha256

    return file_sha256(Path(path), cache_dir(), tensors_only)
