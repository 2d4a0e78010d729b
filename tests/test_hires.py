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
        (["--hires", "2", "--hires-upscaler", "esrgan"], "--hires-upscaler must be one of latent, lanczos, x4"),
        (["--hires", "2", "--hires-strength", "0"], "--hires-strength must be between 0 (exclusive) and 1"),
        (["--hires-steps", "5"], "--hires-steps needs --hires SCALE"),
        (["--hires", "2", "--hires-steps", "2", "--hires-strength", "0.2"], "less than one denoising step"),
    ],
)
def test_hires_usage_errors(cli, tiny_model, args, message):
    result = cli("txt2img", "a cat", "--model", tiny_model, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_hires_x4_upscales_with_the_sd_x4_model_then_refines(cli, tiny_model, tiny_x4_upscaler, tmp_path):
    import shutil

    upscaler = tmp_path / "x4"  # a copy with a diffcli.json recommending few steps, as the bundled x4 has
    shutil.copytree(tiny_x4_upscaler, upscaler)
    (upscaler / "diffcli.json").write_text('{"steps": 2, "cfg": 1.0, "noise_level": 20}')
    args = ("txt2img", "a cat", "--model", tiny_model, "--hires", "2", "--hires-steps", "2", "--hires-strength", "0.5", *FAST)
    result = cli(*args, "--hires-upscaler", "x4", "--hires-upscaler-model", upscaler, "-o", "x4.png")
    assert result.exit_code == 0, result.stderr
    assert cli(*args, "--hires-upscaler", "lanczos", "-o", "lanczos.png").exit_code == 0
    assert Image.open("x4.png").size == (128, 128)
    meta = read_metadata("x4.png")
    assert (meta["hires_upscaler"], meta["hires_upscaler_model"]) == ("x4", str(upscaler))
    assert "Hires upscaler: SD x4" in Image.open("x4.png").info["parameters"]
    import numpy as np  # the x4 model's output, not a plain resize, went into the refinement

    assert np.abs(np.asarray(Image.open("x4.png"), dtype=int) - np.asarray(Image.open("lanczos.png"), dtype=int)).max() > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hires", "2", "--hires-upscaler", "lanczos", "--hires-upscaler-model", "x"], "--hires-upscaler-model needs --hires-upscaler x4"),
        (["--hires-upscaler-model", "x"], "--hires-upscaler-model needs --hires SCALE"),
        (["--hires", "2", "--hires-upscaler", "x4", "--hires-upscaler-model", "tiny-shapes"], "'tiny-shapes' is a sd1 model, not an SD x4 upscaler"),
        (["--hires", "2", "--hires-upscaler", "x4", "--hires-upscaler-model", "./missing"], "no such file or folder"),
    ],
)
def test_hires_x4_model_errors_before_loading(cli, tiny_model, args, message):
    result = cli("txt2img", "a cat", "--model", tiny_model, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
