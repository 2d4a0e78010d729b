"""Configs and builders of the tiny networks; `smoke` shrinks them so CPU tests run in seconds."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

# SD 1.x training noise schedule (epsilon prediction). Its t=999 keeps 0.068 of the latents, and a model trained on it
# reads the scene's layout from that trace; sampling starts from pure noise, where there is none, so the seed decides
# which object goes where (lab/NOTEBOOK.md, "What limits accuracy").
NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
# Zero terminal SNR (Lin et al. 2023): the t=999 trained on is the pure noise the pipeline starts from, so the model
# must take the layout (base model) or the colours (x4 upscaler, which otherwise copies them from the trace instead of
# the low-res image) from its conditioning; hence v-prediction (epsilon is undefined at zero SNR) and trailing
# timesteps so sampling starts at t=999.
ZERO_SNR_NOISE = dict(NOISE, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
# Low-res noise augmentation schedule of the SD x4 upscaler.
LOW_RES_NOISE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
UPSCALE_SCALING = 0.08333  # StableDiffusionUpscalePipeline forces this vae scaling factor


def vae(smoke=False, blocks=4, attention=True, groups=None) -> AutoencoderKL:
    """AutoencoderKL with 2**(blocks-1) downsampling and 4 latent channels like SD (`attention`: SD's mid-block
    self-attention; `groups`: of its group norms, default 16)."""
    chans = {4: (16, 32, 64, 64), 3: (16, 32, 64)}[blocks] if not smoke else (8,) * blocks
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=chans, layers_per_block=1,
                         latent_channels=4, norm_num_groups=groups or (8 if smoke else 16), sample_size=128,
                         mid_block_add_attention=attention)


# Group norms of the x4 upscaler's networks. With SD's one group per 1-2 channels at full resolution (16 groups of
# 16 channels in the VAE, 32 of 32 in the UNet), a flat region normalises to nothing but its borders' padding
# effects, so the colour of a large flat area came back wrong and depended on the image size (lab/NOTEBOOK.md, "The x4 upscaler").
UPSCALE_NORM_GROUPS = 4


def upscale_vae(smoke=False) -> AutoencoderKL:
    """The x4 upscaler's VAE: 4x down, no attention, few norm groups: each output pixel depends on its neighbourhood
    (a 512 px decode does not attend over 16k positions) and a flat area keeps its colour at any image size."""
    return vae(smoke, blocks=3, attention=False, groups=UPSCALE_NORM_GROUPS)


def text_encoder(vocab_size, smoke=False, hidden=256, layers=4) -> CLIPTextModel:
    """Tiny causal CLIP text transformer over our BPE vocabulary (77 positions like SD)."""
    hidden, layers = (16, 1) if smoke else (hidden, layers)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=hidden))


def unet(cross_dim, smoke=False) -> UNet2DConditionModel:
    """Text-conditioned UNet on 16x16x4 latents; capacity and attention at 8x8 and 4x4 (CPU speed target)."""
    chans = (16, 32, 32) if smoke else (32, 96, 192)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=chans, layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
        cross_attention_dim=cross_dim, attention_head_dim=2 if smoke else 6, norm_num_groups=8 if smoke else 32)


def upscale_unet(cross_dim, smoke=False) -> UNet2DConditionModel:
    """x4 upscaler UNet: 4 latent + 3 low-res image channels in, noise level as class label (SD x4 layout).

    Convolutions only (no self- or cross-attention; the prompt is read by nobody): what a pixel becomes is decided by
    its neighbourhood of the low-res image, so the model works alike at every input size and a tile differs from the
    whole image only through its borders and the group norms' statistics (attention would tie every pixel to the
    whole input, and costs 16 k x 16 k at 512 px out; lab/NOTEBOOK.md, "The x4 upscaler")."""
    chans = (16, 16, 32) if smoke else (32, 64, 128)
    return UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, block_out_channels=chans, layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, mid_block_type="UNetMidBlock2D",
        cross_attention_dim=cross_dim, num_class_embeds=1000, norm_num_groups=UPSCALE_NORM_GROUPS)


def load_matching(module: torch.nn.Module, source: torch.nn.Module) -> int:
    """Copy every parameter of `source` whose name and shape `module` shares (a warm start across an architecture
    change); returns how many were copied."""
    own = module.state_dict()
    shared = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(shared, strict=False)
    return len(shared)


def n_params(m: torch.nn.Module) -> int:
    """Parameter count."""
    return sum(p.numel() for p in m.parameters())


def noise_scheduler(config: dict = NOISE) -> DDPMScheduler:
    """A training noise schedule (NOISE or ZERO_SNR_NOISE) as a DDPMScheduler."""
    return DDPMScheduler(**{k: v for k, v in config.items() if k not in ("set_alpha_to_one", "steps_offset")})


def load_text_and_unet(folder: Path) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """A saved model folder's text encoder and UNet in float32."""
    return (CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32),
            UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32))


def saved_schedule(folder: Path) -> dict:
    """The training noise schedule (NOISE or ZERO_SNR_NOISE) that a saved base model's sampler config names."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return ZERO_SNR_NOISE if config["prediction_type"] == "v_prediction" else NOISE
