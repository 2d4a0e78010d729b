"""SDXL on tiny real components: two text encoders, pooled embeds, weighting, clip skip; img2img, inpaint,
outpaint; the refiner."""

import numpy as np
import pytest
from PIL import Image, ImageFilter
from task_inputs import write_mask, write_photo

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


PARITY = 2  # 8-bit values: the CLI's PNG against diffusers' own float output, rounded (measured: 0)


def test_txt2img_equals_plain_diffusers_sdxl(cli, tiny_sdxl):
    """Same seed, steps, cfg and size: diffcli's image is plain StableDiffusionXLPipeline's, with and without a
    negative prompt, two images in one call each equal to its seed alone. An empty --negative is diffusers'
    default `negative_prompt=None`, i.e. zero embeddings (force_zeros_for_empty_prompt): NOT diffusers called
    with `negative_prompt=""`, which encodes "" instead and gives a visibly different image (the intended
    difference; A1111 also zeros an empty SDXL negative)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_image(seed: int, **kwargs) -> np.ndarray:
        image = pipe("a red cat", num_inference_steps=4, guidance_scale=7.5, width=64, height=64, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]
        return np.round(image * 255)

    base = ("--model", tiny_sdxl, "--steps", "4", "--cfg", "7.5", "--width", "64", "--height", "64", "--quiet")
    result = cli("txt2img", "a red cat", *base, "--seed", "1", "--num-images", "2", "--batch-size", "2", "-o", "p-{seed}.png")
    assert result.exit_code == 0, result.stderr
    for seed in (1, 2):
        assert np.abs(pixels(f"p-{seed}.png") - diffusers_image(seed)).max() <= PARITY, seed
    assert np.abs(pixels("p-1.png") - diffusers_image(1, negative_prompt="")).max() > 8 * PARITY  # "" encoded, not zeros
    result = cli("txt2img", "a red cat", *base, "--seed", "3", "-n", "blurry", "-o", "n.png")
    assert result.exit_code == 0, result.stderr
    assert np.abs(pixels("n.png") - diffusers_image(3, negative_prompt="blurry")).max() <= PARITY


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


def test_sdxl_img2img_inpaint_and_outpaint(cli, tiny_sdxl, tmp_path):
    photo, mask = write_photo(tmp_path, (64, 48)), write_mask(tmp_path, (64, 48))
    base = ("--model", tiny_sdxl, *FAST)
    result = cli("img2img", photo, "a dog", *base, "--strength", "0.6", "-o", "i2i.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["model_family"] == "sdxl" and Image.open("i2i.png").size == (64, 48)
    assert np.abs(pixels("i2i.png") - pixels(photo)).mean() > 1
    assert cli("inpaint", photo, "a dog", "--mask", mask, "--mask-blur", "2", *base, "-o", "inp.png").exit_code == 0
    keep = np.asarray(Image.open(mask).filter(ImageFilter.GaussianBlur(2))) == 0
    assert np.array_equal(pixels("inp.png")[keep], pixels(photo)[keep])
    assert not np.array_equal(pixels("inp.png")[~keep], pixels(photo)[~keep])
    assert cli("outpaint", photo, "a dog", "--extend", "right=16", "--feather", "2", *base, "-o", "out.png").exit_code == 0
    assert np.array_equal(pixels("out.png")[:, :62], pixels(photo)[:, :62])  # the original up to the seam


def test_refiner_finishes_the_base_latents_as_diffusers_ensemble_does(cli, tiny_sdxl, tiny_sdxl_refiner):
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    result = cli("txt2img", "a cat", "--model", tiny_sdxl, "--refiner", tiny_sdxl_refiner, "--refiner-start", "0.6",
                 "--steps", "5", "--seed", "1", "--quiet", "--no-weighting", "-o", "refined.png", "--json")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["refiner"], record["refiner_start"]) == (str(tiny_sdxl_refiner), 0.6)
    assert f"Refiner: {tiny_sdxl_refiner}, Refiner switch at: 0.6" in Image.open("refined.png").info["parameters"]

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)  # the same ensemble written with plain diffusers
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_refiner)
    generators = [torch.Generator("cpu").manual_seed(1)]
    common = {"num_inference_steps": 5, "guidance_scale": 7.5, "generator": generators}
    latents = base("a cat", denoising_end=0.6, output_type="latent", **common).images
    expected = refiner("a cat", image=latents, denoising_start=0.6, output_type="np", **common).images[0]
    assert np.abs(pixels("refined.png") - np.round(expected * 255)).max() <= 1

    assert cli("txt2img", "a cat", "--model", tiny_sdxl, "--steps", "5", "--seed", "1", "--quiet", "-o", "plain.png").exit_code == 0
    assert np.abs(pixels("refined.png") - pixels("plain.png")).max() > 0


def test_refiner_model_runs_img2img_but_not_txt2img(cli, tiny_sdxl_refiner, tmp_path):
    photo = write_photo(tmp_path, (64, 64))
    result = cli("img2img", photo, "a dog", "--model", tiny_sdxl_refiner, *FAST, "-o", "r.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["model_family"] == "sdxl-refiner"
    result = cli("txt2img", "a dog", "--model", tiny_sdxl_refiner, *FAST)
    assert result.exit_code == 2 and "txt2img does not work with" in result.stderr and "sdxl-refiner model" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--refiner-start", "1"], "--refiner-start must be between 0 and 1 (exclusive), got 1"),
        (["--hires", "2"], "--refiner and --hires cannot be combined yet"),
        (["--steps", "1"], "leaves one of the two models no step"),
    ],
)
def test_refiner_usage_errors(cli, tiny_sdxl, tiny_sdxl_refiner, args, message):
    result = cli("txt2img", "a cat", "--model", tiny_sdxl, "--refiner", tiny_sdxl_refiner, "--quiet", *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
