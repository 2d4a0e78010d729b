"""Single-file checkpoints (A1111/CompVis layout): read the header, name the family, load offline.

Only the safetensors header is read to classify a file, so validation costs milliseconds and no
torch import. Loading goes through diffusers' `from_single_file` with a diffusers config folder
shipped in `diffcli/configs/<name>/` and tokenizers built from one packaged copy of CLIP's BPE
vocabulary, so no file is fetched from the Hub.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from diffcli import families, weights
from diffcli.errors import ModelError

CONFIGS = Path(__file__).parent / "configs"
CLIP_BPE = CONFIGS / "clip-bpe"
UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
CROSS_ATTN_K = re.compile(re.escape(UNET) + r".*\.attn2\.to_k\.weight$")
VAE_PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint is, read from its header alone."""

    path: str
    family: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner"
    inpaint: bool  # a 9-channel inpainting UNet
    prediction_type: str  # "epsilon" | "v_prediction"
    prediction_guessed: bool  # True when neither metadata nor a marker key said which
    config_dir: str  # the packaged diffusers config folder for this family


def _size_at(path: Path, header: dict, key: str, axis: int) -> int:
    """Size `axis` of tensor `key`; a tensor with fewer dimensions is not the layout this key has in a checkpoint."""
    shape = header[key].get("shape") if isinstance(header[key], dict) else None
    if not isinstance(shape, list) or len(shape) <= axis:
        raise ModelError(f"--model {str(path)!r}: tensor {key} has shape {shape}, not a Stable Diffusion checkpoint's",
                         "is it a complete SD1/SD2/SDXL checkpoint?")
    return shape[axis]


def _not_a_pipeline(path: Path, keys: list[str]) -> ModelError:
    """Explain what a file without a Stable Diffusion UNet probably is instead."""
    if any("lora" in k for k in keys):
        what = "a LoRA"
    elif any(k.startswith(("encoder.", "decoder.")) for k in keys):
        what = "a VAE alone"
    elif any(k.startswith(("down_blocks.", "unet.", "text_model.")) for k in keys):
        what = "a diffusers-format component"
    else:
        what = f"unknown (first keys: {', '.join(sorted(keys)[:3]) or 'none'})"
    return ModelError(
        f"--model {str(path)!r} is not a full Stable Diffusion checkpoint: no {UNET}* keys; it looks like {what}",
        "diffcli loads original-layout SD1/SD2/SDXL checkpoints holding UNet, VAE and text encoder",
    )


def _prediction_type(family: str, inpaint: bool, header: dict) -> tuple[str, bool]:
    """v_prediction or epsilon from metadata or marker keys; else the family's usual (guessed)."""
    meta = header.get("__metadata__") or {}
    stated = str(meta.get("modelspec.prediction_type", "")).lower()
    if stated in ("v", "v_prediction", "epsilon"):
        return ("epsilon" if stated == "epsilon" else "v_prediction"), False
    if "ss_v_parameterization" in meta:  # kohya sd-scripts training metadata
        return ("v_prediction" if meta["ss_v_parameterization"] == "True" else "epsilon"), False
    if "v_pred" in header:  # ComfyUI's marker key in v-prediction SDXL checkpoints
        return "v_prediction", False
    # No weight tells 512-epsilon from 768-v: the family's usual (SD 2.x: 768-v, like diffusers), inpainting epsilon.
    return ("epsilon" if inpaint else families.get(family).prediction_type), True


def _family(path: Path, keys: list[str]) -> str:
    """sd1/sd2/sdxl/sdxl-refiner from which text encoder the file holds; refuse incomplete files."""
    if not any(k.startswith(UNET) for k in keys):
        raise _not_a_pipeline(path, keys)
    single = [(f.name, f.single_file.text_encoder_prefix) for f in families.FAMILIES.values() if f.single_file]
    family = next((f for f, prefix in single if any(k.startswith(prefix) for k in keys)), None)
    if family is None:
        expected = ", ".join(f"{prefix}* ({f})" for f, prefix in single)
        raise ModelError(f"--model {str(path)!r} has a UNet but no text encoder weights", f"expected one of {expected}")
    if not any(k.startswith(VAE_PREFIXES) for k in keys):
        raise ModelError(f"--model {str(path)!r} has no VAE weights (first_stage_model.*)", "use a full checkpoint")
    return family


def _packaged_config(path: Path, family: str, header: dict, in_channels: int, prediction_type: str) -> Path:
    """The shipped config folder, after checking the UNet has that family's standard shapes."""
    hint = "pass --model-config with a diffusers folder describing this architecture"
    single = families.get(family).single_file
    context = next((_size_at(path, header, k, 1) for k in header if CROSS_ATTN_K.match(k)), None)
    if context != single.cross_attention_dim:
        raise ModelError(f"--model {str(path)!r}: {family} text encoder but UNet cross-attention width {context}, "
                         f"expected {single.cross_attention_dim}", hint)
    if in_channels not in (4, 9):
        raise ModelError(f"--model {str(path)!r}: the UNet takes {in_channels} input channels, "
                         "diffcli ships configs for 4 (text-to-image) and 9 (inpainting)", hint)
    name = single.config_name(in_channels == 9, prediction_type)
    if name is None or not (CONFIGS / name).is_dir():
        raise ModelError(f"--model {str(path)!r}: no packaged config for a {family} {in_channels}-channel UNet", hint)
    return CONFIGS / name


def inspect_checkpoint(path: str | Path, model_config: str | None = None, allow_pickle: bool = False) -> CheckpointInfo:
    """Family, inpainting, prediction type and config folder of a single-file checkpoint.

    With `model_config` (--model-config) that folder describes the architecture, so shapes go unchecked.
    The format comes from the file's bytes (weights.check); a pickle is refused unless allowed.
    """
    path = Path(path)
    fmt = weights.check(path, "--model", allow_pickle)
    header = ({name: {"shape": shape} for name, shape in weights.pickle_shapes(path, "--model").items()}
              if fmt == weights.PICKLE else weights.read_safetensors_header(path))  # (the header's form)
    family = _family(path, [k for k in header if k != "__metadata__"])
    in_channels = _size_at(path, header, CONV_IN, 1) if CONV_IN in header else 4
    prediction_type, guessed = _prediction_type(family, in_channels == 9, header)
    if model_config is None:
        config_dir = _packaged_config(path, family, header, in_channels, prediction_type)
    elif (Path(model_config) / "model_index.json").is_file():
        config_dir = Path(model_config)
    else:
        raise ModelError(f"--model-config {model_config!r} is not a diffusers folder (no model_index.json)")
    return CheckpointInfo(str(path), family, in_channels == 9, prediction_type, guessed, str(config_dir))


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[bytes, bytes]:
    """CLIP's vocab.json and merges.txt, decompressed from the package."""
    return tuple(gzip.decompress((CLIP_BPE / f"{name}.gz").read_bytes()) for name in ("vocab.json", "merges.txt"))


def packaged_tokenizers(folder: str | Path) -> dict:
    """CLIPTokenizers for each tokenizer* component of a config folder that carries no vocabulary."""
    from transformers import CLIPTokenizer

    folder = CONFIGS / folder  # a name under configs/, or any absolute path
    index = json.loads((folder / "model_index.json").read_text())
    tokenizers = {}
    for name, value in index.items():
        own_vocabulary = any((folder / name / f).is_file() for f in ("vocab.json", "tokenizer.json"))
        if not name.startswith("tokenizer") or value[0] is None or own_vocabulary:
            continue
        with tempfile.TemporaryDirectory(prefix="diffcli-clip-") as tmp:
            for filename, data in zip(("vocab.json", "merges.txt"), _clip_bpe()):
                (Path(tmp) / filename).write_bytes(data)
            config = folder / name / "tokenizer_config.json"
            (Path(tmp) / "tokenizer_config.json").write_bytes(config.read_bytes() if config.is_file() else b"{}")
            tokenizers[name] = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    return tokenizers


def single_file_kwargs(info: CheckpointInfo, model_config: str | None = None) -> dict:
    """Keyword arguments for `Pipeline.from_single_file` that need no network."""
    folder = Path(model_config or info.config_dir)
    kwargs = {"config": str(folder), "local_files_only": True, **packaged_tokenizers(folder.resolve())}
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    packaged = not model_config and folder.parent == CONFIGS  # a user's folder decides its own scheduler
    if packaged and scheduler.get("prediction_type", "epsilon") != info.prediction_type:
        import diffusers

        scheduler_cls = getattr(diffusers, scheduler["_class_name"])
        kwargs["scheduler"] = scheduler_cls.from_config(scheduler, prediction_type=info.prediction_type)
    return kwargs
