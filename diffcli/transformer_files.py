"""Transformer-only single files (SD3, FLUX.1; .safetensors or .gguf): their family from tensor names and shapes (the
header only), the --base diffusers folder or Hub id whose text encoders, tokenizers, VAE and scheduler complete them,
and loading them offline through diffusers' `from_single_file` (GGUF through its GGUF quantizer)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
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
    family: str  # "sd3" | "flux" | "flux-fill"
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
                         f"{', '.join(sorted(shapes)[:3]) or 'none'})", "diffcli loads SD3 and FLUX.1 GGUF transformers")
    return None


def _info(path: Path, fmt: str, family: str, layout_name: str, layout, shapes: dict) -> TransformerInfo:
    """The family (FLUX.1 Fill: more input than output channels), width and the config values the file decides."""
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
    return TransformerInfo(str(path), fmt, family, layout_name, embedding[0], tuple(sorted(config.items())))


def default_base(info: TransformerInfo) -> str:
    """The registry's Hub id for the file's variant (families.Variant.base)."""
    variant = families.variant(info.family, info.denoiser)
    if variant is None or variant.base is None:
        raise ModelError(f"--base: {info.path!r} holds only a {info.family} transformer and its family names no "
                         "default base", BASE_HINT)
    return variant.base


def resolve_base(info: TransformerInfo, base: str | None, allow_pickle: bool):
    """(Hub id or folder for from_pretrained, the folder holding its configs, Hub revision) of --base or the default,
    checked: a diffusers folder or cached Hub id of the file's kind, whose transformer has the file's width."""
    from diffcli import models

    given = base
    base = base or default_base(info)
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"--base {base!r} is not a diffusers folder (no model_index.json)", BASE_HINT)
        weights.check_folder(path, "--base", allow_pickle)
        location, folder, revision = str(path.resolve()), path, None
    elif path.exists() or base.startswith((".", "/", "~")) or not models.HUB_ID.match(base):
        raise _not_a_base(base, path)
    else:
        revision = _hub_base(base, given, info).revision
        location, folder = base, Path(_snapshot(base, revision))
    _check_base(info, base, folder)
    return location, folder, revision


def _not_a_base(base: str, path: Path) -> ModelError:
    """Why --base is neither a folder nor a Hub id: a file, a missing folder, or no owner/name."""
    if path.exists():
        return ModelError(f"--base {base!r} is a file", BASE_HINT)
    if base.startswith((".", "/", "~")):
        return ModelError(f"--base {base!r}: no such folder", BASE_HINT)
    return ModelError(f"--base {base!r} is neither a folder nor a Hub id (owner/name)", BASE_HINT)


def _hub_base(repo: str, given: str | None, info: TransformerInfo):
    """The base as a Hub model (offline: from the cache), its errors naming --base; an uncached default names --base."""
    from diffcli import models

    try:
        return models.resolve_model(repo, flag="--base")
    except ModelError as exc:
        hint = f"download it once with `hf download {repo}`, or {BASE_HINT}"
        if given:
            raise ModelError(exc.message, hint) from None
        reason = exc.message.removeprefix(f"--base {repo!r} ")
        raise ModelError(f"--base: {info.path!r} holds only a {info.family} transformer; its text encoders and VAE come "
                         f"from --base, by default {repo}, which {reason}", hint) from None


def _snapshot(repo: str, revision: str) -> str:
    """The cached snapshot folder of a Hub repo's revision (models._from_hub fetched its configs there)."""
    from huggingface_hub import hf_hub_download

    return str(Path(hf_hub_download(repo, "model_index.json", revision=revision, local_files_only=True)).parent)


def _check_base(info: TransformerInfo, base: str, folder: Path) -> None:
    """The base is of the file's kind (the same transformer class) and its transformer is as wide as the file's."""
    from diffcli import models

    index = models.read_json(folder / "model_index.json")
    config = models.read_json(folder / "transformer" / "config.json") if "transformer" in index else {}
    kind = families.get(info.family).transformer_file.class_name
    if config.get("_class_name") != kind:
        raise ModelError(f"--base {base!r} is not a {info.family} model (its transformer is "
                         f"{config.get('_class_name') or 'missing'}), got a {info.family} file", BASE_HINT)
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    if width != info.width:
        raise ModelError(f"--base {base!r}: its transformer is {width} wide, the file's {info.width}", BASE_HINT)
    converted = families.get(info.family).transformer_file.converted_width
    if info.layout == "original" and converted and info.width != converted:
        raise ModelError(f"--model {info.path!r}: diffusers converts original-layout {info.family} files of width "
                         f"{converted} only, got {info.width}", "save the transformer in diffusers' layout")


def spec_for(info: TransformerInfo, name: str, base: str | None, allow_pickle: bool):
    """The ModelSpec of a transformer-only file completed by its base: the file's family and variant, the base's
    sizes and configs."""
    from diffcli import models

    location, folder, revision = resolve_base(info, base, allow_pickle)
    spec = models._spec_from_configs(folder, name, "single_file", info.path)
    variant = families.variant(info.family, info.denoiser)
    return replace(spec, family=info.family, config_dir=str(folder), base=location, revision=revision,
                   defaults=dict(variant.defaults) if variant else {},
                   guidance=(variant and variant.guidance) or families.get(info.family).guidance)


def load(cls, spec, allow_pickle: bool, **kwargs):
    """The pipeline `cls` from the base with the file's transformer (from_single_file with the base's transformer
    config and the file's own values; GGUF quantized tensors stay quantized and compute in the pipeline's dtype)."""
    import diffusers

    info = inspect(spec.location, allow_pickle)
    model_class = getattr(diffusers, families.get(info.family).transformer_file.class_name)
    quantized = {}
    if info.format == weights.GGUF:
        quantized["quantization_config"] = diffusers.GGUFQuantizationConfig(compute_dtype=kwargs["torch_dtype"])
    transformer = model_class.from_single_file(weights.named_for_loader(info.path, info.format), config=spec.config_dir,
                                               subfolder="transformer", local_files_only=True,
                                               torch_dtype=kwargs["torch_dtype"], **info.denoiser, **quantized)
    safe = None if allow_pickle else True
    return cls.from_pretrained(spec.base, transformer=transformer, use_safetensors=safe, **kwargs)
