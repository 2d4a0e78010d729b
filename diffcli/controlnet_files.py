"""Single-file ControlNets, as A1111 and ComfyUI keep them (models/ControlNet/*.safetensors). For SD 1.x/2.x/XL: the
original layout (`input_hint_block`, `zero_convs`, `input_blocks`, with or without `control_model.`) and diffusers' own
layout saved as one file (ControlNetModel, and ControlNetUnionModel's `task_embedding`); for FLUX.1, SD3 and Qwen-Image:
diffusers' layout; for Z-Image: alibaba-pai's files (controlnet_transformer_files). The config comes from the tensors'
names and shapes, and what shapes cannot say (attention heads, the time embedding's settings) from the model's
denoiser config, so nothing is fetched from the Hub. One conversion serves the plan (shapes) and the load (tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffcli import controlnet_transformer_files as transformer_files
from diffcli.errors import ModelError, UsageError

FLAG = "--control model"
LDM_PREFIX = "control_model."
LDM_MARK = "input_hint_block.0.weight"
DIFFUSERS_MARK = "controlnet_cond_embedding.conv_in.weight"
UNION_MARK = "task_embedding"
# The U-Net settings a ControlNet copies that its tensors do not show (ControlNetModel.from_unet copies them too).
FROM_MODEL = ("flip_sin_to_cos", "freq_shift", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
              "norm_eps", "attention_head_dim", "num_attention_heads", "upcast_attention", "resnet_time_scale_shift",
              "addition_time_embed_dim", "only_cross_attention")
FAMILY_BY_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}  # cross_attention_dim -> packaged config, when the model's is not at hand
MAX_BLOCKS, MAX_LAYERS = 8, 16  # beyond any SD ControlNet's levels and resnets/transformer layers per level: a header
# naming more is hostile, not a model to build
UNION_HEADS = 8  # ControlNetUnionModel's num_trans_head (xinsir's ProMax); nn.MultiheadAttention's shapes do not show it


def is_single_file(model: str) -> bool:
    return Path(model).is_file()


def marks_a_controlnet(names) -> bool:
    """Whether these tensor names hold a ControlNet diffcli reads from one file (any layout, any family)."""
    return _marks_an_sd_controlnet(names) or transformer_files.kind(names) is not None


def _marks_an_sd_controlnet(names) -> bool:
    names = {name.removeprefix(LDM_PREFIX) for name in names}
    return DIFFUSERS_MARK in names or {LDM_MARK, "time_embed.0.weight"} <= names


def read_config(path: str, allow_pickle: bool, model_unet: dict, takes=None) -> dict:
    """The diffusers config of the ControlNet in `path` (with `_class_name`), from its tensor shapes and `model_unet`
    (the denoiser config of the model it runs with; {} when not at hand), checked against the model that config builds
    (every tensor there, of its shape) without loading any weights; UsageError when it is none diffcli reads. A class
    not in `takes` (the model family's) comes back as {"_class_name": ...} alone, for the caller's refusal."""
    found = _shapes(path, allow_pickle)
    if found is None:
        return {"_class_name": None}  # --dry-run opens no pickle: its layout is read when it runs (check_model)
    shapes = to_diffusers(found, path)
    transformer = transformer_files.kind(shapes)
    name = transformer or ("ControlNetUnionModel" if UNION_MARK in shapes else "ControlNetModel")
    if takes is not None and name not in takes:
        return {"_class_name": name}
    if transformer:
        config = transformer_files.config(shapes, path, model_unet, lambda name: _tensor(path, name, allow_pickle))
        shapes = {name: shape for name, shape in shapes.items() if not name.startswith(transformer_files.unused(config))}
    else:
        config = _config(shapes, path, model_unet)
    wanted = {name: list(tensor.shape) for name, tensor in _build(config, path).state_dict().items()}
    missing = [name for name in wanted if name not in shapes]
    unknown = [name for name in shapes if name not in wanted]
    wrong = [name for name in wanted if name in shapes and shapes[name] != wanted[name]]
    if missing or unknown or wrong:
        example = (missing or unknown or wrong)[0]
        raise UsageError(f"{FLAG}={path}: its tensors do not make one ControlNet ({len(missing)} missing, "
                         f"{len(unknown)} unknown, {len(wrong)} of another shape, e.g. {example})",
                         "is the file complete, and a ControlNet for this model's family?")
    return config


def load(path: str, config: dict, allow_pickle: bool, dtype):
    """The ControlNet in `path`, built from `config` (read_config's) and filled with the file's tensors in `dtype`."""
    from diffcli import weights

    dropped = transformer_files.unused(config)
    state = {name: value.to(dtype) if value.is_floating_point() else value
             for name, value in to_diffusers(weights.unwrapped(weights.load_state_dict(path, FLAG, allow_pickle)), path).items()
             if not name.startswith(dropped)}
    model = _build(config, path)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # the file changed since the plan read it
        raise ModelError(f"{FLAG}={path}: its tensors do not fit one ControlNet: {str(exc).splitlines()[-1].strip()[:200]}") from None
    return model.eval()


def _build(config: dict, path: str):
    """The ControlNet of `config` with empty (meta) weights."""
    import inspect

    import accelerate
    import diffusers.models.controlnets as controlnets

    cls = getattr(controlnets, config["_class_name"])
    takes = inspect.signature(cls.__init__).parameters  # (ControlNetUnionModel has no mid_block_type)
    try:
        with accelerate.init_empty_weights():
            return cls.from_config({key: value for key, value in config.items() if key in takes})
    except Exception as exc:  # noqa: BLE001 - diffusers' and torch's checks of a layout raise several kinds
        raise UsageError(f"{FLAG}={path}: its layout is none diffusers builds: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from None


def _shapes(path: str, allow_pickle: bool) -> dict | None:
    """Tensor name -> shape: the safetensors header, or an allowed pickle read through the restricted unpickler (once
    per file version: a batch plans each job); None for a pickle under --dry-run, which opens no weights."""
    from diffcli import weights

    if weights.check(path, FLAG, allow_pickle) == weights.SAFETENSORS:
        header = weights.read_safetensors_header(path)
        return {name: entry["shape"] for name, entry in header.items()
                if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("shape"), list)}
    if not weights.payloads_allowed():
        return None
    return weights.pickle_shapes(path, FLAG)


def _tensor(path: str, name: str, allow_pickle: bool):
    """One tensor of the file: read alone from a safetensors file, else from the whole (allowed) pickle."""
    from diffcli import weights

    if weights.check(path, FLAG, allow_pickle) == weights.SAFETENSORS:
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as file:
                return file.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own errors for a damaged file)
            raise UsageError(f"{FLAG}={path}: its tensor {name} cannot be read ({str(exc)[:200]})") from None
    return weights.unwrapped(weights.load_state_dict(path, FLAG, allow_pickle))[name]


def version(path: str) -> tuple:
    """What names a file's current content for a cache: its resolved path, size and modification time."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def to_diffusers(state: dict, path: str) -> dict:
    """A ControlNet state dict (or name -> shape) in diffusers' names, from either layout; UsageError for other files.
    A file with `control_model.` tensors (a v1.0 ControlNet saved with its whole SD model) is read for those alone."""
    if any(name.startswith(LDM_PREFIX) for name in state):
        state = {name.removeprefix(LDM_PREFIX): value for name, value in state.items() if name.startswith(LDM_PREFIX)}
    if _marks_an_sd_controlnet(state):
        return state if DIFFUSERS_MARK in state else _from_original(state)
    if transformer_files.kind(state):
        return state
    raise UsageError(f"{FLAG}={path}: not a ControlNet diffcli reads ({_looks_like(state)})",
                     "diffcli reads SD 1.x/2.x/XL ControlNets in one file, FLUX.1, SD3 and Qwen-Image ones in diffusers' "
                     "layout, Z-Image ones in alibaba-pai's, and any ControlNet as a diffusers folder")


def _indices(state: dict, pattern: str) -> list[int]:
    """The numbers N of the names matching `pattern` (a regex with one (\\d+) group), sorted."""
    import re

    found = (re.fullmatch(pattern, name) for name in state)
    return sorted({int(match.group(1)) for match in found if match})


def _from_original(state: dict) -> dict:
    """The original layout in diffusers' names: the U-Net part through diffusers' converter, the map encoder
    (`input_hint_block`: convs at even indices, the last one its output) and SDXL's `label_emb` here."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state = {name: value for name, value in state.items()
             if name.split(".")[0] in ("time_embed", "label_emb", "input_blocks", "middle_block", "zero_convs",
                                       "middle_block_out", "input_hint_block")}  # diffusers' converter matches substrings
    downsamplers = _indices(state, r"input_blocks\.(\d+)\.0\.op\.weight")
    blocks = _indices(state, r"input_blocks\.(\d+)\..*")
    layers = downsamplers[0] - 1 if downsamplers else max(blocks, default=1)
    hint = _indices(state, r"input_hint_block\.(\d+)\.weight")
    if layers < 1 or len(hint) < 2 or len(blocks) > MAX_BLOCKS * (MAX_LAYERS + 1):
        return {}  # then reported as tensors missing
    out = {name: value for name, value in convert_controlnet_checkpoint(state, {"layers_per_block": layers}).items()
           if value is not None and not name.startswith("controlnet_cond_embedding.")}
    for param in ("weight", "bias"):
        out[f"controlnet_cond_embedding.conv_in.{param}"] = state.get(f"input_hint_block.{hint[0]}.{param}")
        out[f"controlnet_cond_embedding.conv_out.{param}"] = state.get(f"input_hint_block.{hint[-1]}.{param}")
        for number, index in enumerate(hint[1:-1]):
            out[f"controlnet_cond_embedding.blocks.{number}.{param}"] = state.get(f"input_hint_block.{index}.{param}")
        for diffusers_name, original in (("linear_1", "0"), ("linear_2", "2")):
            out[f"add_embedding.{diffusers_name}.{param}"] = state.get(f"label_emb.0.{original}.{param}")
    return {name: value for name, value in out.items() if value is not None}


def _looks_like(state: dict) -> str:
    names = list(state)
    if any("lllite" in name for name in names):
        return "a ControlNet-LLLite file"
    if "lora_controlnet" in state or any(name.endswith((".up", ".down")) for name in names):
        return "a Control-LoRA"
    if any(name.startswith(("control_all_x_embedder.", "control_layers.", "control_noise_refiner.")) for name in names):
        return "a Z-Image ControlNet without its first control layer, or incomplete"
    if any(name.startswith("double_blocks.") for name in names):
        return "a FLUX.1 ControlNet in XLabs' layout, which diffusers does not run"
    if any(name.startswith(("controlnet_blocks.", "controlnet_x_embedder.")) for name in names):
        return "a FLUX.1, SD3 or Qwen-Image ControlNet in another layout than diffusers', or incomplete"
    if any(name.startswith(("body.", "adapter.")) for name in names):
        return "a T2I-Adapter"
    if any(name.startswith(("image_proj.", "ip_adapter.")) for name in names):
        return "an IP-Adapter: use --ip-adapter"
    if any(name.startswith("model.diffusion_model.") for name in names):
        return "a whole checkpoint: use --model"
    if any("lora" in name for name in names):
        return "a LoRA: use --lora"
    return f"first tensors: {', '.join(sorted(names)[:3]) or 'none'}"


def _need(shapes: dict, name: str, path: str, ndim: int = 2) -> list:
    """The shape of tensor `name`, with at least `ndim` dimensions, all positive; UsageError otherwise."""
    shape = shapes.get(name)
    if not isinstance(shape, list) or len(shape) < ndim or not all(isinstance(size, int) and size > 0 for size in shape):
        raise UsageError(f"{FLAG}={path}: no usable tensor {name}", "is the file a complete ControlNet?")
    return shape


def _count(shapes: dict, prefix: str) -> int:
    """How many numbered children `prefix`N. has ("down_blocks.0.resnets." -> 2)."""
    return len({name[len(prefix):].split(".")[0] for name in shapes if name.startswith(prefix)})


def _config(shapes: dict, path: str, model_unet: dict) -> dict:
    """ControlNetModel's (or ControlNetUnionModel's) config from diffusers-named shapes and the model's U-Net config.
    A level may hold attention with no transformer layers (the SDXL "small" and "mid" ControlNets)."""
    blocks = _count(shapes, "down_blocks.")
    layers = _count(shapes, "down_blocks.0.resnets.")
    if not 0 < blocks <= MAX_BLOCKS or not 0 < layers <= MAX_LAYERS:
        raise UsageError(f"{FLAG}={path}: {blocks} down blocks of {layers} resnets, no SD ControlNet's layout",
                         "is the file a complete ControlNet?")
    attention = [any(name.startswith(f"down_blocks.{b}.attentions.0.") for name in shapes) for b in range(blocks)]
    transformers = [_count(shapes, f"down_blocks.{b}.attentions.0.transformer_blocks.") for b in range(blocks)]
    middle = _count(shapes, "mid_block.attentions.0.transformer_blocks.")
    if max(transformers + [middle]) > MAX_LAYERS:
        raise UsageError(f"{FLAG}={path}: over {MAX_LAYERS} transformer layers in a block, no SD ControlNet's layout")
    sdxl = "add_embedding.linear_1.weight" in shapes
    cross = next((_need(shapes, name, path)[1] for name in shapes if name.endswith("attn2.to_k.weight")), None)
    cross = cross or model_unet.get("cross_attention_dim") or (2048 if sdxl else None)  # no transformer layer says it
    proj_in = next((shapes[name] for name in shapes if name.endswith("proj_in.weight")), [])
    if any(attention) and not isinstance(cross, int):
        raise UsageError(f"{FLAG}={path}: its text width is not in its tensors, and the model's config is not at hand")
    embed_blocks = _count(shapes, "controlnet_cond_embedding.blocks.")
    config = {
        "in_channels": _need(shapes, "conv_in.weight", path, 4)[1],
        "conditioning_channels": _need(shapes, DIFFUSERS_MARK, path, 4)[1],
        "conditioning_embedding_out_channels": [_need(shapes, DIFFUSERS_MARK, path, 4)[0]] + [
            _need(shapes, f"controlnet_cond_embedding.blocks.{i}.weight", path, 4)[0] for i in range(1, embed_blocks, 2)],
        "block_out_channels": [_need(shapes, f"down_blocks.{b}.resnets.0.conv1.weight", path, 4)[0] for b in range(blocks)],
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        # the last level's count is also the middle block's (ControlNetModel reads it there)
        "transformer_layers_per_block": [t if a else middle for a, t in zip(attention, transformers)],
        "cross_attention_dim": cross or 768,
        "use_linear_projection": len(proj_in) == 2,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if _count(shapes, "mid_block.attentions.") else "UNetMidBlock2D",
        "global_pool_conditions": "shuffle" in Path(path).name.lower(),  # A1111's rule: shuffle ControlNets pool the map
    }
    if sdxl:  # pooled text and size conditioning
        config.update(addition_embed_type="text_time",
                      projection_class_embeddings_input_dim=_need(shapes, "add_embedding.linear_1.weight", path)[1])
    model = _model_settings(model_unet, config["cross_attention_dim"], blocks)
    config.update({key: model[key] for key in FROM_MODEL if key in model})
    if config.get("addition_embed_type") and not config.get("addition_time_embed_dim"):
        config["addition_time_embed_dim"] = 256
    if UNION_MARK in shapes:
        count, width = _need(shapes, UNION_MARK, path)[:2]
        config.update(_class_name="ControlNetUnionModel", num_control_type=count, num_trans_channel=width,
                      num_trans_head=UNION_HEADS, num_trans_layer=_count(shapes, "transformer_layes."),
                      num_proj_channel=_need(shapes, "spatial_ch_projs.weight", path)[0],
                      addition_time_embed_dim=_need(shapes, "control_add_embedding.linear_1.weight", path)[1] // count)
    else:
        config["_class_name"] = "ControlNetModel"
    return config


def _model_settings(model_unet: dict, width: int, blocks: int) -> dict:
    """The U-Net settings for a ControlNet of `blocks` levels and text width `width`: the model's own U-Net config where
    it fits, else the packaged config of the family of that width (SD 1.x, 2.x, XL)."""
    from diffcli.checkpoints import CONFIGS

    def fits(unet: dict) -> bool:
        heads = unet.get("attention_head_dim")
        return unet.get("cross_attention_dim") == width and not (isinstance(heads, list) and len(heads) != blocks)

    if model_unet and fits(model_unet):
        return model_unet
    family = FAMILY_BY_WIDTH.get(width)
    packaged = json.loads((CONFIGS / family / "unet" / "config.json").read_text()) if family else {}
    return packaged if fits(packaged) else {}
