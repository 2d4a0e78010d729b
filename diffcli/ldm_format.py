"""Save a diffusers SD1 or SDXL pipeline as an original (CompVis/A1111) single-file checkpoint.

The inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` (loaders/single_file_utils.py), so tests can make
the files users download from model sites out of tiny components, and `diffcli bench --compare sdcpp` can give
stable-diffusion.cpp the bench's model in the layout it reads.
"""

from __future__ import annotations

from pathlib import Path

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_TOP = {"conv_norm_out": "norm_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    """Replace the leading module name of `rest` ("norm1.weight") by its table entry."""
    module, _, param = rest.rpartition(".")
    return f"{table.get(module, module)}.{param}"


def unet_key(key: str, layers: int) -> str:
    """One diffusers UNet2DConditionModel key in the LDM `model.diffusion_model.` layout."""
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "attentions"):
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if parts[0] == "down_blocks":
            position = f"input_blocks.{1 + block * (layers + 1) + index}"
        else:
            position = f"output_blocks.{block * (layers + 1) + index}"
        return f"{position}.0.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"{position}.1.{rest}"
    if parts[0] == "down_blocks":  # down_blocks.B.downsamplers.0.conv.P
        return f"input_blocks.{(int(parts[1]) + 1) * (layers + 1)}.0.op.{parts[-1]}"
    if parts[0] == "up_blocks":  # up_blocks.B.upsamplers.0.conv.P; slot 2 when the level has attention
        return f"output_blocks.{int(parts[1]) * (layers + 1) + layers}.UPSAMPLE.conv.{parts[-1]}"
    if parts[0] == "mid_block":
        slot = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        rest = ".".join(parts[3:])
        return f"middle_block.{slot}.{_rename(rest, UNET_RESNET) if slot != 1 else rest}"
    return _rename(key, UNET_TOP)


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    """A diffusers UNet state dict in the LDM layout, keys prefixed `model.diffusion_model.`."""
    out = {unet_key(k, layers_per_block): v for k, v in state.items()}
    fixed = {}
    for key, value in out.items():
        if ".UPSAMPLE." in key:
            block = key.split(".")[1]
            has_attention = any(k.startswith(f"output_blocks.{block}.1.") and ".UPSAMPLE." not in k for k in out)
            key = key.replace(".UPSAMPLE.", ".2." if has_attention else ".1.")
        fixed["model.diffusion_model." + key] = value
    return fixed


def vae_key(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key in the LDM `first_stage_model.` layout."""
    parts = key.split(".")
    if len(parts) > 1 and parts[1] in ("down_blocks", "up_blocks"):
        coder, block = parts[0], int(parts[2])
        level = f"down.{block}" if parts[1] == "down_blocks" else f"up.{num_blocks - 1 - block}"
        if parts[3] == "resnets":
            return f"{coder}.{level}.block.{parts[4]}.{_rename('.'.join(parts[5:]), {'conv_shortcut': 'nin_shortcut'})}"
        return f"{coder}.{level}.{'downsample' if parts[1] == 'down_blocks' else 'upsample'}.conv.{parts[-1]}"
    if len(parts) > 1 and parts[1] == "mid_block":
        coder, kind, index, rest = parts[0], parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"{coder}.mid.block_{index + 1}.{_rename(rest, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{coder}.mid.attn_1.{_rename(rest, VAE_ATTENTION)}"
    if len(parts) > 2:
        return f"{parts[0]}.{_rename('.'.join(parts[1:]), VAE_TOP)}"
    return key


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
    """A diffusers AutoencoderKL state dict in the LDM layout; attention projections as 1x1 convs."""
    out = {}
    for key, value in state.items():
        ldm = vae_key(key, num_blocks)
        if ".mid.attn_1." in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]
        out["first_stage_model." + ldm] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """A transformers CLIP text model in the LDM layout (`cond_stage_model.transformer.text_model.*`)."""
    # transformers >= 5.6 drops CLIPTextModel's `text_model.` level; the original layout keeps it
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """A CLIPTextModelWithProjection in OpenCLIP's layout: fused in_proj, resblocks, text_projection transposed."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "text_projection": state.pop("text_projection.weight").T.contiguous(),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight")}
    for key, value in state.items():
        if ".k_proj." in key or ".v_proj." in key:
            continue
        if ".q_proj." in key:  # q, k and v travel together as one in_proj tensor
            value = torch.cat([state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            key = key.replace("q_proj.", "in_proj_")
        key = key.replace("final_layer_norm.", "ln_final.").replace("encoder.layers.", "transformer.resblocks.")
        key = key.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace(".self_attn.", ".attn.")
        out[prefix + key.replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")] = value
    return out


def controlnet_to_ldm(state: dict, layers_per_block: int, prefix: str = "control_model.") -> dict:
    """A diffusers ControlNetModel state dict in lllyasviel's original layout (A1111's models/ControlNet files): the
    U-Net part as the U-Net's, `zero_convs`, `middle_block_out` and the map encoder `input_hint_block` (convs at even
    indices, as in its nn.Sequential with activations between)."""
    blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "controlnet_down_blocks":
            key = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif parts[0] == "controlnet_mid_block":
            key = f"middle_block_out.0.{parts[1]}"
        elif parts[0] == "controlnet_cond_embedding":
            index = {"conv_in": 0, "conv_out": 2 * (blocks + 1)}.get(parts[1])
            key = f"input_hint_block.{2 * (int(parts[2]) + 1) if index is None else index}.{parts[-1]}"
        else:
            key = unet_key(key, layers_per_block)
        out[prefix + key] = value
    return out


def pipeline_to_ldm(pipe) -> dict:
    """All weights of an SD1 or SDXL pipeline as one original-layout state dict."""
    unet, vae = pipe.unet, pipe.vae
    state = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    else:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return state


def save_original_checkpoint(pipe, path: str | Path, metadata: dict | None = None, dtype=None) -> Path:
    """Write `pipe` as an A1111-style .safetensors single file (its floats in `dtype` if given); returns the path."""
    from safetensors.torch import save_file

    state = {k: (v if dtype is None or not v.is_floating_point() else v.to(dtype)).detach().contiguous().clone()
             for k, v in pipeline_to_ldm(pipe).items()}
    save_file(state, str(path), metadata=metadata)
    return Path(path)
