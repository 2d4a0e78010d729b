"""Tensor-name layouts of transformer-only files (SD3, FLUX.1, FLUX.2): the registry's single-file knowledge for them,
read by transformer_files.py to tell a file's family from its names and shapes, before any weights load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Tensor names of a transformer-only file in one layout (original BFL/SAI, or diffusers'), after any ComfyUI
    `model.diffusion_model.` prefix: what tells the family and the config values the file itself decides."""

    marker: str  # a tensor only this family's transformer has in this layout
    input: str  # the patch embedding, [width, in_channels, ...]: the transformer's width and input channels
    blocks: tuple[tuple[str, str], ...]  # (config key, block name prefix): the file's block counts
    present: tuple[tuple[str, str, object, object], ...] = ()  # (config key, name part, value if present, if absent)
    output: str | None = None  # the output projection, [out_channels, width], when out_channels follows the file


@dataclass(frozen=True)
class TransformerFile:
    """How a transformer-only single file of the family is told from its tensor names and loaded (from_single_file)."""

    class_name: str  # the diffusers model class
    layouts: tuple[tuple[str, Layout], ...]  # (name, layout), the original layout first
    widened: str | None = None  # the family a file of more input than output channels is (FLUX.1 Fill)
    unguided: str | None = None  # the family a file without a guidance embedding is (FLUX.2 klein)
    converted_width: int | None = None  # the only width diffusers converts from the original layout (None: any)

# Transformer-only files: SAI's sd3.5_large.safetensors and BFL's flux1-dev.safetensors (ComfyUI's and city96's GGUF
# files name their tensors so too), or a diffusers transformer's own names. FLUX.1: diffusers' converter splits the
# single blocks at FLUX.1's width 3072 (diffusers 0.42), so original-layout files of another width cannot load.
SD3_FILE = TransformerFile("SD3Transformer2DModel", (
    ("original", Layout("joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight", (("num_layers", "joint_blocks."),),
                        (("qk_norm", ".attn.ln_q.", "rms_norm", None),))),
    ("diffusers", Layout("pos_embed.proj.weight", "pos_embed.proj.weight", (("num_layers", "transformer_blocks."),),
                         (("qk_norm", ".attn.norm_q.", "rms_norm", None),)))))
FLUX_FILE = TransformerFile("FluxTransformer2DModel", (
    ("original", Layout("double_blocks.0.img_mod.lin.weight", "img_in.weight",  # FLUX.2's blocks share modulations
                        (("num_layers", "double_blocks."), ("num_single_layers", "single_blocks.")),
                        (("guidance_embeds", "guidance_in.", True, False),), "final_layer.linear.weight")),
    ("diffusers", Layout("single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight",
                         (("num_layers", "transformer_blocks."), ("num_single_layers", "single_transformer_blocks.")),
                         (("guidance_embeds", "time_text_embed.guidance_embedder.", True, False),), "proj_out.weight"))),
    widened="flux-fill", converted_width=3072)
# FLUX.2 (dev: embedded guidance; klein: none), BFL's flux2-dev.safetensors layout or diffusers'; diffusers' converter
# splits the fused q, k, v at any width
FLUX2_FILE = TransformerFile("Flux2Transformer2DModel", (
    ("original", Layout("single_stream_modulation.lin.weight", "img_in.weight",
                        (("num_layers", "double_blocks."), ("num_single_layers", "single_blocks.")),
                        (("guidance_embeds", "guidance_in.", True, False),), "final_layer.linear.weight")),
    ("diffusers", Layout("single_stream_modulation.linear.weight", "x_embedder.weight",
                         (("num_layers", "transformer_blocks."), ("num_single_layers", "single_transformer_blocks.")),
                         (("guidance_embeds", "time_guidance_embed.guidance_embedder.", True, False),), "proj_out.weight"))),
    unguided="flux2-klein")
