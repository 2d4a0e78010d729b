"""Single-file ControlNets of the transformer families in diffusers' layout (a diffusers folder's weights file kept
alone, as ComfyUI users keep InstantX's and Shakker-Labs' FLUX.1 ControlNets): FluxControlNetModel, SD3ControlNetModel
and QwenImageControlNetModel, and alibaba-pai's Z-Image Fun Controlnet Union files (ZImageControlNetModel). Their
config comes from the tensors' shapes; what shapes cannot say (rotary axes, the sample size, a head size without q/k
norms, the heads of Z-Image) from the model's transformer config, else the family's published value.
controlnet_files reads the file and checks the config against it; this module only names the class and its config."""

from __future__ import annotations

import math

from diffcli.errors import UsageError

FLAG = "--control model"
MAX_LAYERS = 128  # beyond FLUX.1's 19 + 38 and Qwen-Image's 60 blocks: a header naming more is hostile
MAX_WIDTH, MAX_SIDE = 16384, 512  # beyond any of them (3072 wide; SD3.5's 192-patch position table): hostile too, and
# SD3's position table is computed in real memory while the model is built (its buffers are not on the meta device)
FLUX_ROPE, QWEN_ROPE = [16, 56, 56], [16, 56, 56]  # their published axes (head size 128); shapes do not show them
SD3_HEAD = 64  # every SD3/3.5 head size; only q/k norms show it
# Z-Image Turbo's transformer, where the model's config is not at hand: 30 layers, 2 noise refiners, 30 heads
Z_IMAGE = {"n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
           "all_patch_size": [2], "all_f_patch_size": [1]}
Z_REFINER_ENTRY = "control_noise_refiner.0.before_proj.weight"  # zero (or absent) in Union 2.0's files, trained in 2.1


def kind(names) -> str | None:
    """The ControlNet class these diffusers-layout tensor names make, or None."""
    names = set(names)
    if "control_layers.0.after_proj.weight" in names and any(n.startswith("control_all_x_embedder.") for n in names):
        return "ZImageControlNetModel"
    if "pos_embed_input.proj.weight" in names and "time_text_embed.timestep_embedder.linear_1.weight" in names:
        return "SD3ControlNetModel"
    if "controlnet_x_embedder.weight" in names and "img_in.weight" in names and "txt_in.weight" in names:
        return "QwenImageControlNetModel"
    if "controlnet_x_embedder.weight" in names and "x_embedder.weight" in names and "context_embedder.weight" in names:
        return "FluxControlNetModel"
    return None


def config(shapes: dict, path: str, model: dict, tensor) -> dict:
    """The diffusers config (with `_class_name`) of the ControlNet whose diffusers-named shapes are `shapes`;
    `model`: the transformer config of the model it runs with ({} when not at hand); `tensor(name)`: one of the
    file's tensors (Z-Image's version shows in a value)."""
    found = kind(shapes)
    if found == "ZImageControlNetModel":
        return {"_class_name": found, **_z_image(_Shapes(shapes, path), model, tensor)}
    read = {"FluxControlNetModel": _flux, "SD3ControlNetModel": _sd3, "QwenImageControlNetModel": _qwen}[found]
    return {"_class_name": found, **read(_Shapes(shapes, path), model)}


def unused(config: dict) -> tuple[str, ...]:
    """Prefixes of the file's tensors the ControlNet of `config` does not take: a Z-Image Union 2.0 file's untrained
    noise-refiner blocks (its control layers serve the noise refiner too)."""
    if config.get("_class_name") == "ZImageControlNetModel" and config.get("add_control_noise_refiner") == "control_layers":
        return ("control_noise_refiner.",)
    return ()


class _Shapes:
    """Shape lookups that turn a missing or malformed tensor into one UsageError line."""

    def __init__(self, shapes: dict, path: str):
        self.shapes, self.path = shapes, path

    def __call__(self, name: str, ndim: int = 2) -> list:
        shape = self.shapes.get(name)
        if not isinstance(shape, list) or len(shape) < ndim or not all(isinstance(s, int) and s > 0 for s in shape):
            raise UsageError(f"{FLAG}={self.path}: no usable tensor {name}", "is the file a complete ControlNet?")
        return shape

    def has(self, name: str) -> bool:
        return name in self.shapes

    def count(self, prefix: str) -> int:
        """How many numbered children `prefix`N. there are; UsageError beyond MAX_LAYERS."""
        found = len({name[len(prefix):].split(".")[0] for name in self.shapes if name.startswith(prefix)})
        if found > MAX_LAYERS:
            raise UsageError(f"{FLAG}={self.path}: {found} {prefix.rstrip('.')}, no ControlNet's layout")
        return found

    def heads(self, inner: int, head: int) -> int:
        if inner > MAX_WIDTH:
            raise UsageError(f"{FLAG}={self.path}: width {inner}, beyond any ControlNet's {MAX_WIDTH}")
        if inner % head:
            raise UsageError(f"{FLAG}={self.path}: width {inner} is no whole number of {head}-wide heads")
        return inner // head

    def rope(self, model: dict, head: int, published: list) -> list:
        """The rotary axes: the model's where they fit this head size, else the family's published ones."""
        for axes in (model.get("axes_dims_rope"), published):
            if isinstance(axes, (list, tuple)) and all(isinstance(a, int) for a in axes) and sum(axes) == head:
                return list(axes)
        raise UsageError(f"{FLAG}={self.path}: heads of {head}, and the model's config gives no rotary axes for them",
                         "use the ControlNet as a diffusers folder with its config.json")


def _flux(s: _Shapes, model: dict) -> dict:
    inner, in_channels = s("x_embedder.weight")[:2]
    layers, single = s.count("transformer_blocks."), s.count("single_transformer_blocks.")
    head = s(f"{'transformer_blocks' if layers else 'single_transformer_blocks'}.0.attn.norm_q.weight", 1)[0]
    return {"patch_size": 1, "in_channels": in_channels, "num_layers": layers, "num_single_layers": single,
            "attention_head_dim": head, "num_attention_heads": s.heads(inner, head),
            "joint_attention_dim": s("context_embedder.weight")[1],
            "pooled_projection_dim": s("time_text_embed.text_embedder.linear_1.weight")[1],
            "guidance_embeds": s.has("time_text_embed.guidance_embedder.linear_1.weight"),
            "axes_dims_rope": s.rope(model, head, FLUX_ROPE),
            "num_mode": s("controlnet_mode_embedder.weight")[0] if s.has("controlnet_mode_embedder.weight") else None,
            # XLabs-style map encoder (the map in pixels, not through the VAE)
            "conditioning_embedding_channels": s("input_hint_block.conv_out.weight", 4)[0]
            if s.has("input_hint_block.conv_out.weight") else None}


def _sd3(s: _Shapes, model: dict) -> dict:
    inner = s("time_text_embed.timestep_embedder.linear_1.weight")[0]
    patch = s("pos_embed_input.proj.weight", 4)
    positions = s.has("pos_embed.proj.weight")  # SD3.5 Large's ControlNets use the transformer's
    in_channels = s("pos_embed.proj.weight", 4)[1] if positions else model.get("in_channels", 16)
    if not isinstance(in_channels, int) or patch[1] < in_channels:
        raise UsageError(f"{FLAG}={s.path}: its map input takes {patch[1]} channels, fewer than the model's latents")
    layers = s.count("transformer_blocks.")
    norm = s("transformer_blocks.0.attn.norm_q.weight", 1) if s.has("transformer_blocks.0.attn.norm_q.weight") else None
    head = norm[0] if norm else model.get("attention_head_dim")
    head = head if isinstance(head, int) and head > 0 else SD3_HEAD
    heads = s.heads(inner, head)
    table = s("pos_embed.pos_embed", 3) if s.has("pos_embed.pos_embed") else None  # saved where it has a maximum size
    side = math.isqrt(table[1]) if table else None
    if table and (table != [1, side * side, inner] or side > MAX_SIDE):
        raise UsageError(f"{FLAG}={s.path}: a position table of shape {table}, not a square grid of at most "
                         f"{MAX_SIDE}x{MAX_SIDE} positions {inner} wide")
    context = s("context_embedder.weight") if s.has("context_embedder.weight") else None
    return {"sample_size": model.get("sample_size", 128), "patch_size": patch[2], "in_channels": in_channels,
            "num_layers": layers, "attention_head_dim": head, "num_attention_heads": heads,
            "joint_attention_dim": context[1] if context else None, "caption_projection_dim": context[0] if context else inner,
            "pooled_projection_dim": s("time_text_embed.text_embedder.linear_1.weight")[1], "out_channels": in_channels,
            "pos_embed_max_size": side, "extra_conditioning_channels": patch[1] - in_channels,
            "dual_attention_layers": [i for i in range(layers) if s.has(f"transformer_blocks.{i}.attn2.to_q.weight")],
            "qk_norm": None if norm is None else
            "layer_norm" if s.has("transformer_blocks.0.attn.norm_q.bias") else "rms_norm",
            "pos_embed_type": "sincos" if positions else None, "use_pos_embed": positions,
            # SD3.5 Large's (no text projection of their own) get the pooled text and shifted map latents
            "force_zeros_for_pooled_projection": context is not None}


def _qwen(s: _Shapes, model: dict) -> dict:
    inner, in_channels = s("img_in.weight")[:2]
    head = s("transformer_blocks.0.attn.norm_q.weight", 1)[0]
    if s("controlnet_x_embedder.weight")[1] < in_channels:
        raise UsageError(f"{FLAG}={s.path}: its map input is narrower than its latent input, no ControlNet's layout")
    return {"patch_size": model.get("patch_size", 2), "in_channels": in_channels,
            "out_channels": model.get("out_channels", 16), "num_layers": s.count("transformer_blocks."),
            "attention_head_dim": head, "num_attention_heads": s.heads(inner, head),
            "joint_attention_dim": s("txt_in.weight")[1], "axes_dims_rope": s.rope(model, head, QWEN_ROPE),
            "extra_condition_channels": s("controlnet_x_embedder.weight")[1] - in_channels}


def _z_image(s: _Shapes, model: dict, tensor) -> dict:
    """alibaba-pai's Fun Controlnet Union files: 1.0 (noise-refiner blocks of the transformer's kind), 2.0 (its control
    layers serve the noise refiner; the refiner blocks it carries are untrained) and 2.1 (control blocks of its own for
    the refiner). Which transformer layers the control layers feed is not in the file: as in every published version
    (1.0: 6 of 30, 2.x: 15, lite: 3), they spread evenly from layer 0."""
    model = {**Z_IMAGE, **{key: value for key, value in model.items() if key in Z_IMAGE}}
    patch, f_patch = model["all_patch_size"][0], model["all_f_patch_size"][0]
    inner, width = s(f"control_all_x_embedder.{patch}-{f_patch}.weight")
    count, layers = s.count("control_layers."), model["n_layers"]
    if width % (patch * patch * f_patch) or not isinstance(layers, int) or not 0 < count <= layers or layers % count:
        raise UsageError(f"{FLAG}={s.path}: {count} control layers taking {width} values per patch do not fit this "
                         f"model's {layers} layers and {patch}x{patch} patches",
                         "use the ControlNet as a diffusers folder with its config.json")
    heads = model["n_heads"]
    if inner > MAX_WIDTH or not isinstance(heads, int) or heads <= 0 or inner % heads:
        raise UsageError(f"{FLAG}={s.path}: width {inner}, no whole number of this model's {heads} heads",
                         "is it a ControlNet for this model?")
    refiners = s.count("control_noise_refiner.")
    if not refiners:
        mode = "control_layers"
    elif not s.has("control_noise_refiner.0.after_proj.weight"):
        mode = None
    elif s.has(Z_REFINER_ENTRY) and bool(tensor(Z_REFINER_ENTRY).abs().sum() > 0):
        mode = "control_noise_refiner"
    else:
        mode = "control_layers"
    if mode == "control_layers" and count < model["n_refiner_layers"]:  # its control layers feed every noise refiner
        raise UsageError(f"{FLAG}={s.path}: {count} control layers cannot feed this model's "
                         f"{model['n_refiner_layers']} noise refiners", "is it a ControlNet for this model?")
    return {"control_layers_places": list(range(0, layers, layers // count)),
            "control_refiner_layers_places": list(range(model["n_refiner_layers"])),
            "control_in_dim": width // (patch * patch * f_patch), "add_control_noise_refiner": mode,
            "all_patch_size": [patch], "all_f_patch_size": [f_patch], "dim": inner,
            "n_refiner_layers": model["n_refiner_layers"], "n_heads": heads,
            "n_kv_heads": model["n_kv_heads"], "norm_eps": model["norm_eps"], "qk_norm": model["qk_norm"]}
