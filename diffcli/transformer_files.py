"""Transformer-only single files (SD3, FLUX.1, FLUX.2; .safetensors or .gguf): their family from tensor names and
shapes (the header only), and loading them offline through diffusers' `from_single_file` (GGUF through its GGUF
quantizer) into the pipeline of their --base (models.py resolves the base: a model of its own)."""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from diffcli import families, weights
from diffcli.errors import ModelError

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI's checkpoints (and some GGUF files) keep the original names under it
BASE_HINT = "pass --base with a diffusers folder or Hub id of the same model: its text encoders and VAE"


@dataclass(frozen=True)
class TransformerInfo:
    """What a transformer-only file is, read from its header alone."""

    path: str
    format: str  # weights.SAFETENSORS | weights.GGUF
    family: str  # "sd3" | "flux" | "flux-fill" | "flux2" | "flux2-klein"
    layout: str  # "original" (BFL/SAI, ComfyUI, city96's GGUF) | "diffusers"
    width: int  # the transformer's inner width (heads x head size)
    config: tuple  # (config key, value) pairs the file decides over the base's transformer config

    @property
    def denoiser(self) -> dict:
        """The file's config values as a transformer config dict (what families.variant reads)."""
        return dict(self.config)


def tensor_shapes(path: Path, fmt: str) -> dict[str, list]:
    """Tensor name -> shape from a safetensors header or the GGUF reader, without the ComfyUI prefix."""
    header = weights.read_gguf_tensors(path) if fmt == weights.GGUF else weights.read_safetensors_header(path)
    shapes = {}
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict):
            shapes[name[len(COMFY_PREFIX):] if name.startswith(COMFY_PREFIX) else name] = entry.get("shape") or []
    return shapes


def inspect(path: str | Path, allow_pickle: bool = False) -> TransformerInfo | None:
    """The transformer-only file at `path`, or None when it is not one (an SD checkpoint, a pickle); a GGUF file that
    holds no transformer diffcli knows is a ModelError."""
    path = Path(path)
    fmt = weights.check(path, "--model", allow_pickle, (weights.SAFETENSORS, weights.PICKLE, weights.GGUF))
    if fmt == weights.PICKLE:
        return None
    shapes = tensor_shapes(path, fmt)
    for family in families.FAMILIES.values():
        known = family.transformer_file
        for layout_name, layout in (known.layouts if known else ()):
            if layout.marker in shapes:
                return _info(path, fmt, family.name, layout_name, layout, shapes)
    if fmt == weights.GGUF:
        raise ModelError(f"--model {str(path)!r} is a GGUF file of no transformer diffcli loads (first tensors: "
                         f"{', '.join(sorted(shapes)[:3]) or 'none'})",
                         "diffcli loads SD3, FLUX.1 and FLUX.2 GGUF transformers")
    return None


def _info(path: Path, fmt: str, family: str, layout_name: str, layout, shapes: dict) -> TransformerInfo:
    """The family (FLUX.1 Fill: more input than output channels; FLUX.2 klein: no guidance embedding), width and the
    config values the file decides."""
    where = f"--model {str(path)!r}"
    embedding = shapes.get(layout.input) or []
    if len(embedding) < 2:
        raise ModelError(f"{where}: tensor {layout.input} has shape {embedding}, not a {family} transformer's",
                         "is the file complete?")
    config = {"in_channels": embedding[1]}
    if layout.output is not None:
        config["out_channels"] = (shapes.get(layout.output) or [embedding[1]])[0]
    for key, prefix in layout.blocks:
        found = [re.match(r"\d+", name[len(prefix):]) for name in shapes if name.startswith(prefix)]
        config[key] = 1 + max((int(m.group()) for m in found if m), default=-1)
    for key, part, present, absent in layout.present:
        config[key] = present if any(part in name for name in shapes) else absent
    known = families.get(family).transformer_file
    if known.widened and config["in_channels"] > config.get("out_channels", config["in_channels"]):
        family = known.widened
    if known.unguided and not config.get("guidance_embeds"):
        family = known.unguided
    return TransformerInfo(str(path), fmt, family, layout_name, embedding[0], tuple(sorted(config.items())))


def load(cls, spec, allow_pickle: bool, **kwargs):
    """The pipeline `cls` from the base with the file's transformer (from_single_file with the base's transformer
    config and the file's own values; GGUF quantized tensors stay quantized and compute in the pipeline's dtype)."""
    import diffusers

    info = inspect(spec.location, allow_pickle)
    model_class = getattr(diffusers, families.get(info.family).transformer_file.class_name)
    quantized = {}
    if info.format == weights.GGUF:
        quantized["quantization_config"] = diffusers.GGUFQuantizationConfig(compute_dtype=kwargs["torch_dtype"])
    with _names_without_comfy_prefix(model_class.__name__):
        transformer = model_class.from_single_file(weights.named_for_loader(info.path, info.format),
                                                   config=spec.config_dir, subfolder="transformer", local_files_only=True,
                                                   torch_dtype=kwargs["torch_dtype"], **info.denoiser, **quantized)
    safe = None if allow_pickle else True
    return cls.from_pretrained(spec.base, transformer=transformer, use_safetensors=safe, **kwargs)


@contextlib.contextmanager
def _names_without_comfy_prefix(class_name: str):
    """During the block, diffusers' converter of `class_name` gets tensor names without ComfyUI's prefix: its FLUX.2
    converter (diffusers 0.42) reads BFL's names only, where its FLUX.1 and SD3 ones strip the prefix themselves."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    entry = SINGLE_FILE_LOADABLE_CLASSES[class_name]
    convert = entry["checkpoint_mapping_fn"]

    @functools.wraps(convert)  # diffusers passes the keyword arguments the converter's signature names
    def stripped(checkpoint, **kwargs):
        return convert({k.removeprefix(COMFY_PREFIX): v for k, v in checkpoint.items()}, **kwargs)

    entry["checkpoint_mapping_fn"] = stripped
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"] = convert
