"""Tiny real SD3 and FLUX.1 components from config dicts (transformer, VAE, CLIP and T5 encoders), with tokenizers
written locally: the flow-matching families' models as users have them, saved as diffusers folders. No network."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from conftest import write_tiny_tokenizer

TEXT_HIDDEN = 32  # CLIP and T5 widths: the transformers' joint_attention_dim
VAE_BLOCKS = (8, 8, 8, 8)  # four blocks: a VAE factor of 8, as the real models', so sizes must be multiples of 16
SD3_VAE_FACTORS = {"shift_factor": 0.0609, "scaling_factor": 1.5305}  # SD3's VAE latent statistics
FLUX_VAE_FACTORS = {"shift_factor": 0.1159, "scaling_factor": 0.3611}  # FLUX.1's


def write_tiny_t5_tokenizer(folder: Path):
    """A character-level T5 (Unigram) tokenizer: pad, eos, unk, the word marker and every printable character."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in string.printable.strip()]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def text_parts(root: Path) -> dict:
    """A CLIP tokenizer and config (built locally), a T5 tokenizer and a tiny T5 encoder."""
    import torch
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel

    vocab = write_tiny_tokenizer(root / "clip-tokenizer")
    t5_tokenizer = write_tiny_t5_tokenizer(root / "t5-tokenizer")
    clip = CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=TEXT_HIDDEN,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab,
                          max_position_embeddings=77, projection_dim=TEXT_HIDDEN, hidden_act="gelu")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=1,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    return {"clip_config": clip, "clip_tokenizer": CLIPTokenizer.from_pretrained(root / "clip-tokenizer"),
            "t5": t5, "t5_tokenizer": t5_tokenizer}


def tiny_vae(factors: dict, channels: int):
    """A VAE of the SD3/FLUX layout (no quant convs, a shift factor), downsampling by 8."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=VAE_BLOCKS, in_channels=3, out_channels=3, latent_channels=channels,
                         norm_num_groups=4, layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * len(VAE_BLOCKS),
                         up_block_types=["UpDecoderBlock2D"] * len(VAE_BLOCKS), use_quant_conv=False,
                         use_post_quant_conv=False, **factors)


def build_tiny_sd3(root: Path):
    """Tiny SD3.5-layout components (qk RMS norm, patch 2): two CLIPs with projection, T5, a joint transformer."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    parts = text_parts(root)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=TEXT_HIDDEN, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=16, qk_norm="rms_norm")
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(parts["clip_config"])
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**parts["clip_config"].to_dict()))
    tokenizer = parts["clip_tokenizer"]
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(SD3_VAE_FACTORS, 16),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=parts["t5"], tokenizer_3=parts["t5_tokenizer"])


def build_tiny_flux(root: Path, guidance: bool = True):
    """Tiny FLUX.1-layout components: CLIP (pooled) + T5, a double- and a single-stream block; `guidance`: the
    distilled-guidance embedding of FLUX.1 dev (without it, the schnell layout, whose scheduler does not shift)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    parts = text_parts(root)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
                                         pooled_projection_dim=TEXT_HIDDEN, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=guidance)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(parts["clip_config"])
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
                 if guidance else FlowMatchEulerDiscreteScheduler(shift=1.0))
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(FLUX_VAE_FACTORS, 4),
                        text_encoder=text_encoder, tokenizer=parts["clip_tokenizer"], text_encoder_2=parts["t5"],
                        tokenizer_2=parts["t5_tokenizer"])


def build_tiny_flux_fill(root: Path):
    """A tiny FLUX.1 Fill layout: the dev components with a transformer that also reads the packed masked-image latents
    (4 x 2x2) and the packed pixel mask (8x8 per latent pixel, x 2x2)."""
    import torch
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    base = build_tiny_flux(root)
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel.from_config(base.transformer.config, in_channels=16 + 16 + 256, out_channels=16)
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    return FluxFillPipeline(**dict(parts, transformer=transformer))


def save(pipe, folder: Path) -> Path:
    """The pipeline as a local diffusers folder (save_pretrained), as --model takes it."""
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """The tiny SD3.5-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("sd3")
    return save(build_tiny_sd3(root), root / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """The tiny FLUX.1 dev-layout model (guidance embedding) as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux")
    return save(build_tiny_flux(root), root / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    """The tiny FLUX.1 schnell-layout model (no guidance embedding) as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux-schnell")
    return save(build_tiny_flux(root, guidance=False), root / "tiny-flux-schnell")


@pytest.fixture(scope="session")
def tiny_flux_lora(tiny_flux, tmp_path_factory) -> Path:
    """A peft LoRA for the tiny FLUX.1 transformer (attention and output: enough to show), saved as diffusers does."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("flux-loras")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   weight_name="shiny.safetensors")
    return folder / "shiny.safetensors"


@pytest.fixture(scope="session")
def tiny_flux_fill(tmp_path_factory) -> Path:
    """The tiny FLUX.1 Fill-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux-fill")
    return save(build_tiny_flux_fill(root), root / "tiny-flux-fill")
