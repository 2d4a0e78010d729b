"""SDXL through txt2img on tiny real components: two text encoders, pooled embeds, weighting, clip skip."""

import numpy as np
from PIL import Image

from diffcli.output import read_metadata

FAST = ("--steps", "2", "--quiet", "--seed", "1")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_plain_prompt_encodes_exactly_as_diffusers_sdxl(tiny_sdxl):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from diffcli.prompts import encode

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ours, pooled = encode(pipe, ["a red car", "blurry"])
    embeds, negative, theirs_pooled, negative_pooled = pipe.encode_prompt("a red car", negative_prompt="blurry", device="cpu")
    assert ours.shape == (2, 77, 72) and pooled.shape == (2, 32)  # 32 + 40 wide encoders
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
