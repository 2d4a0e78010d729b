"""The models a server offers, by name: the bundled ones, the --model it started with, and what --models-dir holds.

A request names a model from this list and nothing else, so no request can reach a file outside --models-dir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffcli.errors import UsageError

WEIGHT_SUFFIXES = (".safetensors", ".gguf")  # single files a request may name (pickles only with --allow-pickle)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Entry:
    name: str  # what requests say: a bundled name, a file or folder name relative to --models-dir
    spec: str  # what --model gets: the bundled name, a Hub id, or the path


class Catalog:
    """Model names -> --model values; `default` is the model a request without one gets."""

    def __init__(self, default: str | None, models_dir: str | None, allow_pickle: bool = False,
                 controlnet_dir: str | None = None):
        from diffcli.models import DEFAULT_MODEL, bundled_models

        self.entries: dict[str, Entry] = {name: Entry(name, name) for name in bundled_models()}
        self.allow_pickle = allow_pickle
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        if self.models_dir is not None:
            if not self.models_dir.is_dir():
                raise UsageError(f"--models-dir {models_dir!r} is not a folder")
            for path in _weights(self.models_dir, WEIGHT_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ())):
                name = path.relative_to(self.models_dir).as_posix()
                self.entries.setdefault(name, Entry(name, str(path)))
        self.default = self.add(default) if default else self.entries.get(DEFAULT_MODEL) or Entry(DEFAULT_MODEL, DEFAULT_MODEL)
        self.controlnets = _controlnets(controlnet_dir)
        self.ip_adapters = _ip_adapters(controlnet_dir)

    def controlnet(self, asked: str) -> str:
        """The folder or file of a ControlNet a request names (its name in --controlnet-dir, or A1111's "name [hash]")."""
        plain = str(asked).strip().rsplit(" [", 1)[0]
        found = self.controlnets.get(plain) or self.controlnets.get(plain[:-len(".safetensors")]
                                                                    if plain.lower().endswith(".safetensors") else None)
        if found is None:
            raise UsageError(f"controlnet model {str(asked)[:120]!r} is not one of this server's ControlNets",
                             f"its --controlnet-dir offers: {', '.join(self.controlnets) or 'none'}")
        return found

    def ip_adapter(self, asked: str) -> str:
        """The file of an IP-Adapter a request names: a .safetensors file name in --controlnet-dir, where A1111 keeps
        them too (its image_encoder folder beside it), with or without the suffix or A1111's " [hash]"."""
        plain = str(asked).strip().rsplit(" [", 1)[0]
        found = self.ip_adapters.get(plain) or self.ip_adapters.get(plain + ".safetensors")
        if found is None:
            raise UsageError(f"ip_adapter model {str(asked)[:120]!r} is not one of this server's IP-Adapters",
                             f"its --controlnet-dir offers: {', '.join(self.ip_adapters) or 'none'}")
        return found

    def add(self, spec: str) -> Entry:
        """The server's own --model (any --model value: trusted, it comes from the command line)."""
        name = Path(spec).name if Path(spec).exists() else spec
        entry = self.entries.setdefault(name, Entry(name, spec))
        return entry

    def find(self, asked: str, field: str = "sd_model_checkpoint") -> Entry:
        """The entry a request names: its name, its A1111 title ("name [hash]"), or its name without the suffix."""
        asked = str(asked).strip()
        plain = asked.rsplit(" [", 1)[0] if asked.endswith("]") else asked
        for candidate in (asked, plain):
            if candidate in self.entries:
                return self.entries[candidate]
        stems = {Path(name).with_suffix("").as_posix(): entry for name, entry in self.entries.items()}
        if plain in stems:
            return stems[plain]
        raise UsageError(f"{field} {asked[:120]!r} is not one of this server's models",
                         f"GET /sdapi/v1/sd-models lists them: {', '.join(list(self.entries)[:10])}")

    def title(self, entry: Entry) -> str:
        """A1111's title: name and short hash (hashed once, then cached on disk)."""
        return f"{entry.name} [{self.short_hash(entry)}]"

    def short_hash(self, entry: Entry) -> str:
        from diffcli import hashes
        from diffcli.models import resolve_model

        try:
            return hashes.model_hash(resolve_model(entry.spec, allow_pickle=self.allow_pickle))
        except UsageError:
            return "unknown"


def _weights(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Diffusers folders (not the files inside them) and single weight files under `root`; links leading out of
    `root` are left out."""
    import os

    found = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        if not here.resolve().is_relative_to(root):
            subfolders.clear()
            continue
        if "model_index.json" in files and here != root:
            found.append(here)
            subfolders.clear()  # its unet/vae files are parts, not models
            continue
        found += [here / name for name in files if Path(name).suffix.lower() in suffixes
                  and (here / name).resolve().is_relative_to(root)]
        subfolders.sort()
    return sorted(found)


def _controlnets(folder: str | None) -> dict[str, str]:
    """--controlnet-dir's ControlNets by name: folders (a config.json naming a ControlNet class) by folder name, and
    single .safetensors files (a ControlNet's tensors in their header, as A1111 keeps them) by name without the suffix."""
    import json

    from diffcli import controlnet_files, weights
    from diffcli.errors import ModelError

    if not folder:
        return {}
    root = Path(folder).resolve()
    if not root.is_dir():
        raise UsageError(f"--controlnet-dir {folder!r} is not a folder")
    found = {}
    for path in sorted(root.iterdir()):
        if not path.resolve().is_relative_to(root) or ";" in str(path):
            continue
        if path.is_file() and path.suffix.lower() == ".safetensors":
            try:
                header = weights.read_safetensors_header(path)
            except ModelError:
                continue
            if controlnet_files.marks_a_controlnet(header):
                found.setdefault(path.stem, str(path))
            continue
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if "ControlNet" in str(config.get("_class_name", "")):
            found[path.name] = str(path)
    return found


def _ip_adapters(folder: str | None) -> dict[str, str]:
    """--controlnet-dir's IP-Adapter files (.safetensors with image_proj. tensors in their header) by file name."""
    from diffcli import weights
    from diffcli.errors import ModelError

    if not folder or not Path(folder).is_dir():
        return {}
    root = Path(folder).resolve()
    found = {}
    for path in sorted(root.glob("*.safetensors")):
        try:
            header = weights.read_safetensors_header(path)
        except ModelError:
            continue
        if path.resolve().is_relative_to(root) and any(key.startswith("image_proj.") for key in header):
            found[path.name] = str(path)
    return found
