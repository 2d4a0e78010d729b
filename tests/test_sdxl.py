"""SDXL through txt2img on tiny real components: two text encoders, pooled embeds, weighting, clip skip."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_tiny_tokenizer
from diffcli.output import read_metadata

FAST = ("--steps", "2", "--quiet", "--seed", "1")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """diffusers' own tiny SDXL test layout (text_time U-Net, CLIPTextModel + CLIPTextModelWithProjection)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = tmp_path_factory.mktemp("sdxl")
    vocab = write_tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    config = CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=32,
                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab,
                            max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(config)
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tok")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(root / "tiny-sdxl")
    return root / "tiny-sdxl"


def test_plain_prompt_encodes_exactly_as_diffusers_sdxl(tiny_sdxl):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from diffcli.prompts import encode

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ours, pooled = encode(pipe, ["a red car", "blurry"])
    embeds, negative, theirs_pooled, negative_pooled = pipe.encode_prompt("a red car", negative_prompt="blurry", device="cpu")
    assert ours.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert torch.allclose(ours[0], embeds[0]) and torch.allclose(ours[1], negative[0])
    assert torch.allclose(pooled[0], theirs_pooled[0]) and torch.allclose(pooled[1], negative_pooled[0])


def test_sdxl_txt2img_weighting_long_prompts_and_clip_skip(cli, tiny_sdxl):
    base = ("--model", tiny_sdxl, *FAST)
    first = cli("txt2img", "a (cat:1.6)", *base, "-o", "weighted.png", "--json")
    assert first.exit_code == 0, first.stderr
    assert first.json_lines()[0]["model_family"] == "sdxl" and Image.open("weighted.png").size == (64, 64)
    assert cli("txt2img", "a (cat:1.6)", *base, "--no-weighting", "-o", "literal.png").exit_code == 0
    assert cli("txt2img", "a (cat:1.6)", *base, "--clip-skip", "2", "-o", "skip.png").exit_code == 0
    long = "a cat on a mat, " * 6  # 96 tokens
    assert cli("txt2img", long + "red", *base, "-n", "blurry", "-o", "red.png").exit_code == 0
    assert cli("txt2img", long + "blue", *base, "-n", "blurry", "-o", "blue.png").exit_code == 0
    for a, b in (("weighted", "literal"), ("weighted", "skip"), ("red", "blue")):
        assert np.abs(pixels(f"{a}.png") - pixels(f"{b}.png")).max() > 0, (a, b)
    assert read_metadata("skip.png")["clip_skip"] == 2
