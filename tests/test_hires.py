"""Hires fix: generate, upscale the latents or pixels, refine with img2img at the larger size."""

import pytest
from PIL import Image

from diffcli.output import read_metadata

FAST = ("--steps", "2", "--seed", "3", "--quiet")


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_doubles_the_size_and_records_it(cli, tiny_model, upscaler):
    result = cli("txt2img", "a cat", "--model", tiny_model, "--hires", "2", "--hires-upscaler", upscaler,
                 "--hires-steps", "3", "--hires-strength", "0.5", "-o", "h.png", *FAST)
    assert result.exit_code == 0, result.stderr
    assert Image.open("h.png").size == (128, 128)
    meta = read_metadata("h.png")
    assert (meta["hires_scale"], meta["hires_upscaler"], meta["hires_steps"], meta["width"]) == (2.0, upscaler, 3, 64)
    assert "Hires upscale: 2.0, Hires steps: 3" in Image.open("h.png").info["parameters"]


def test_hires_changes_the_image_compared_to_a_plain_resize(cli, tiny_model):
    import numpy as np

    cli("txt2img", "a cat", "--model", tiny_model, "-o", "base.png", *FAST)
    cli("txt2img", "a cat", "--model", tiny_model, "--hires", "2", "--hires-upscaler", "lanczos", "-o", "hr.png", *FAST)
    resized = np.asarray(Image.open("base.png").resize((128, 128), Image.LANCZOS), dtype=int)
    assert np.abs(np.asarray(Image.open("hr.png"), dtype=int) - resized).mean() > 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hires", "1"], "--hires must be between 1 (exclusive) and 4, got 1"),
        (["--hires", "2", "--hires-upscaler", "esrgan"], "--hires-upscaler must be one of latent, lanczos"),
        (["--hires", "2", "--hires-strength", "0"], "--hires-strength must be between 0 (exclusive) and 1"),
        (["--hires-steps", "5"], "--hires-steps needs --hires SCALE"),
        (["--hires", "2", "--hires-steps", "2", "--hires-strength", "0.2"], "less than one denoising step"),
    ],
)
def test_hires_usage_errors(cli, tiny_model, args, message):
    result = cli("txt2img", "a cat", "--model", tiny_model, *args)
    assert result.exit_code == 2 and message in result.stderr
