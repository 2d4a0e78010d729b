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
import math
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from diffcli import weights
from diffcli.errors import ModelError

CONFIGS = Path(__file__).parent / "configs"
CLIP_BPE = CONFIGS / "clip-bpe"
MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
# Bits per element of each safetensors dtype (the format's table); a dtype not listed skips the size check.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
              "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
              "F6_E2M3": 6, "F6_E3M2": 6}
UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
CROSS_ATTN_K = re.compile(re.escape(UNET) + r".*\.attn2\.to_k\.weight$")
TEXT_ENCODERS = {  # family -> (text encoder key prefix, the UNet's cross-attention width)
    "sdxl": ("conditioner.embedders.1.model.", 2048),  # CLIP ViT-L (embedders.0) + OpenCLIP bigG
    "sdxl-refiner": ("conditioner.embedders.0.model.", 1280),  # OpenCLIP bigG alone
    "sd2": ("cond_stage_model.model.", 1024),  # OpenCLIP ViT-H
    "sd1": ("cond_stage_model.transformer.", 768),  # OpenAI CLIP ViT-L
}
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
        head = handle.read(max(8, len(weights.LFS_POINTER)))
        if size == 0:
            raise ModelError(f"{path} is empty", "was the download interrupted?")
        if head.startswith(weights.LFS_POINTER):
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


def _size_at(path: Path, header: dict, key: str, axis: int) -> int:
    """Size `axis` of tensor `key`; a tensor with fewer dimensions is not the layout this key has in a checkpoint."""
    shape = header[key].get("shape") if isinstance(header[key], dict) else None
    if not isinstance(shape, list) or len(shape) <= axis:
        raise ModelError(f"--model {str(path)!r}: tensor {key} has shape {shape}, not a Stable Diffusion checkpoint's",
                         "is it a complete SD1/SD2/SDXL checkpoint?")
    return shape[axis]


def _pickle_shapes(path: Path) -> dict:
    """Tensor shapes of an allowed pickle checkpoint (restricted unpickler), in the safetensors header's shape."""
    state = weights.load_state_dict(path, "--model", allow_pickle=True)
    state = state.get("state_dict", state)
    return {k: {"shape": list(v.shape)} for k, v in state.items() if hasattr(v, "shape")} if isinstance(state, dict) else {}


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
    # No weight tells 512-epsilon from 768-v: SD 2.x defaults to 768-v like diffusers, inpainting to epsilon.
    return ("v_prediction" if family == "sd2" and not inpaint else "epsilon"), True


def _config_name(family: str, inpaint: bool, prediction_type: str) -> str:
    """The packaged config folder for a family and variant."""
    base = {"sd1": "sd15", "sd2": "sd2-v" if prediction_type == "v_prediction" else "sd2"}.get(family, family)
    return f"{base.removesuffix('-v')}-inpaint" if inpaint else base


def _family(path: Path, keys: list[str]) -> str:
    """sd1/sd2/sdxl/sdxl-refiner from which text encoder the file holds; refuse incomplete files."""
    if not any(k.startswith(UNET) for k in keys):
        raise _not_a_pipeline(path, keys)
    family = next((f for f, (prefix, _) in TEXT_ENCODERS.items() if any(k.startswith(prefix) for k in keys)), None)
    if family is None:
        expected = ", ".join(f"{prefix}* ({f})" for f, (prefix, _) in TEXT_ENCODERS.items())
        raise ModelError(f"--model {str(path)!r} has a UNet but no text encoder weights", f"expected one of {expected}")
    if not any(k.startswith(VAE_PREFIXES) for k in keys):
        raise ModelError(f"--model {str(path)!r} has no VAE weights (first_stage_model.*)", "use a full checkpoint")
    return family


def _packaged_config(path: Path, family: str, header: dict, in_channels: int, prediction_type: str) -> Path:
    """The shipped config folder, after checking the UNet has that family's standard shapes."""
    hint = "pass --model-config with a diffusers folder describing this architecture"
    context = next((_size_at(path, header, k, 1) for k in header if CROSS_ATTN_K.match(k)), None)
    if context != TEXT_ENCODERS[family][1]:
        raise ModelError(f"--model {str(path)!r}: {family} text encoder but UNet cross-attention width {context}, "
                         f"expected {TEXT_ENCODERS[family][1]}", hint)
    if in_channels not in (4, 9):
        raise ModelError(f"--model {str(path)!r}: the UNet takes {in_channels} input channels, "
                         "diffcli ships configs for 4 (text-to-image) and 9 (inpainting)", hint)
    config_dir = CONFIGS / _config_name(family, in_channels == 9, prediction_type)
    if not config_dir.is_dir():
        raise ModelError(f"--model {str(path)!r}: no packaged config for a {family} {in_channels}-channel UNet", hint)
    return config_dir


def inspect_checkpoint(path: str | Path, model_config: str | None = None, allow_pickle: bool = False) -> CheckpointInfo:
    """Family, inpainting, prediction type and config folder of a single-file checkpoint.

    With `model_config` (--model-config) that folder describes the architecture, so shapes go unchecked.
    The format comes from the file's bytes (weights.check); a pickle is refused unless allowed.
    """
    path = Path(path)
    fmt = weights.check(path, "--model", allow_pickle)
    header = _pickle_shapes(path) if fmt == weights.PICKLE else read_safetensors_header(path)
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
