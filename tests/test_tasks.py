"""img2img, inpaint, outpaint and upscale end to end through the CLI on tiny real components."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from diffcli import tiles
from diffcli.output import read_metadata

FAST = ("--steps", "2", "--seed", "3", "--quiet")
BUNDLED_X4 = Path(__file__).resolve().parents[1] / "diffcli" / "bundled" / "tiny-shapes-x4"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture
def photo(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), np.uint8)).save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


@pytest.fixture
def mask(tmp_path) -> Path:
    image = Image.new("L", (60, 50), 0)
    ImageDraw.Draw(image).rectangle((20, 15, 40, 35), fill=255)
    image.save(tmp_path / "mask.png")
    return tmp_path / "mask.png"


def test_img2img_rounds_size_and_says_so(cli, tiny_model, photo):
    result = cli("img2img", photo, "a cat", "--model", tiny_model, "--strength", "0.5", "--steps", "4", "--seed", "1", "-o", "i.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert Image.open("i.png").size == (60, 50) and "input resized from 60x50" not in result.stderr  # multiple of 2
    record = result.json_lines()[0]
    assert (record["task"], record["strength"], record["input"]) == ("img2img", 0.5, str(photo))


def test_img2img_resize_modes_and_strength_errors(cli, tiny_model, photo):
    result = cli("img2img", photo, "a cat", "--model", tiny_model, "--width", "32", "--height", "32", "--resize", "crop", "-o", "c.png", *FAST)
    assert result.exit_code == 0 and Image.open("c.png").size == (32, 32)
    low = cli("img2img", photo, "a cat", "--model", tiny_model, "--strength", "0.1", "--steps", "5")
    assert low.exit_code == 2 and "less than one denoising step" in low.stderr
    bad = cli("img2img", photo, "a cat", "--model", tiny_model, "--strength", "1.5")
    assert bad.exit_code == 2 and "--strength must be between 0 and 1, got 1.5" in bad.stderr


@pytest.mark.parametrize("model", ["tiny_model", "tiny_inpaint_model"])
def test_inpaint_keeps_pixels_outside_the_blurred_mask(cli, request, photo, mask, model):
    folder = request.getfixturevalue(model)
    result = cli("inpaint", photo, "a cat", "--mask", mask, "--mask-blur", "2", "--model", folder, "-o", "p.png", *FAST)
    assert result.exit_code == 0, result.stderr
    keep = np.asarray(Image.open(mask).filter(ImageFilter.GaussianBlur(2))) == 0
    assert np.array_equal(pixels("p.png")[keep], pixels(photo)[keep])
    assert not np.array_equal(pixels("p.png")[~keep], pixels(photo)[~keep])


def test_inpaint_masked_only_invert_and_alpha(cli, tiny_model, photo, mask, tmp_path):
    only = cli("inpaint", photo, "a cat", "--mask", mask, "--masked-only", "--padding", "4", "--model", tiny_model, "-o", "m.png", *FAST)
    assert only.exit_code == 0, only.stderr
    keep = np.asarray(Image.open(mask).filter(ImageFilter.GaussianBlur(4))) == 0
    assert np.array_equal(pixels("m.png")[keep], pixels(photo)[keep])
    assert read_metadata("m.png")["masked_only"] is True
    rgba = Image.open(photo).convert("RGBA")
    rgba.putalpha(Image.open(mask).point(lambda v: 0 if v else 255))
    rgba.save(tmp_path / "holes.png")
    alpha = cli("inpaint", tmp_path / "holes.png", "a cat", "--mask-from-alpha", "--model", tiny_model, "-o", "a.png", *FAST)
    assert alpha.exit_code == 0, alpha.stderr
    inverted = cli("inpaint", photo, "a cat", "--mask", mask, "--invert-mask", "--mask-blur", "0", "--model", tiny_model, "-o", "v.png", *FAST)
    inside = np.asarray(Image.open(mask)) == 255
    assert inverted.exit_code == 0 and np.array_equal(pixels("v.png")[inside], pixels(photo)[inside])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mask", "small.png"], "is 8x8 but the image is 60x50"),
        ([], "give exactly one of --mask FILE or --mask-from-alpha"),
        (["--mask", "black.png"], "the mask is empty"),
        (["--mask-from-alpha"], "has no transparency"),
        (["--mask", "nothere.png"], "--mask nothere.png: no such file"),
    ],
)
def test_inpaint_mask_errors(cli, tiny_model, photo, args, message):
    Image.new("L", (8, 8), 255).save("small.png")
    Image.new("L", (60, 50), 0).save("black.png")
    result = cli("inpaint", photo, "a cat", "--model", tiny_model, *args, *FAST)
    assert result.exit_code == 2 and message in result.stderr


def test_outpaint_extends_canvas_and_keeps_the_original(cli, tiny_model, photo):
    result = cli("outpaint", photo, "a cat", "--extend", "left=10,top=4", "--feather", "2", "--model", tiny_model, "-o", "o.png", *FAST)
    assert result.exit_code == 0, result.stderr
    out = pixels("o.png")
    assert out.shape == (54, 70, 3)
    assert np.array_equal(out[4 + 8:, 10 + 8:], pixels(photo)[8:, 8:])  # beyond the seam, the original is untouched
    assert read_metadata("o.png")["outpaint"] == "left=10,top=4"
    bad = cli("outpaint", photo, "a cat", "--extend", "middle=3", "--model", tiny_model)
    assert bad.exit_code == 2 and "expected side=pixels" in bad.stderr


@pytest.mark.skipif(not BUNDLED_X4.exists(), reason="bundled upscaler absent")
def test_upscale_x4_whole_and_tiled(cli, tmp_path):
    Image.new("RGB", (48, 40), (30, 60, 200)).save(tmp_path / "small.png")
    whole = cli("upscale", tmp_path / "small.png", "a blue background", "-o", "u.png", "--json", *FAST)
    assert whole.exit_code == 0, whole.stderr
    assert Image.open("u.png").size == (192, 160) and whole.json_lines()[0]["model"] == "tiny-shapes-x4"
    tiled = cli("upscale", tmp_path / "small.png", "a blue background", "--tile", "32", "--tile-overlap", "8", "-o", "t.png", *FAST)
    assert tiled.exit_code == 0 and Image.open("t.png").size == (192, 160)
    assert read_metadata("t.png")["tile"] == 32


def test_upscale_latent_x2(cli, tiny_latent_upscaler, tmp_path):
    Image.new("RGB", (128, 128), (200, 40, 40)).save(tmp_path / "in.png")
    result = cli("upscale", tmp_path / "in.png", "a red square", "--method", "latent", "--scale", "2",
                 "--model", tiny_latent_upscaler, "-o", "x2.png", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    assert Image.open("x2.png").size == (256, 256) and result.json_lines()[0]["method"] == "latent"
    no_model = cli("upscale", tmp_path / "in.png", "--method", "latent", "--scale", "2")
    assert no_model.exit_code == 2 and "--method latent needs --model" in no_model.stderr
    wrong_scale = cli("upscale", tmp_path / "in.png", "--method", "latent", "--model", tiny_latent_upscaler)
    assert wrong_scale.exit_code == 2 and "--scale must be 2 with --method latent, got 4" in wrong_scale.stderr


def test_upscale_errors(cli, tiny_model, photo):
    wrong_model = cli("upscale", photo, "--model", tiny_model)
    assert wrong_model.exit_code == 2 and "not an x4 upscaler" in wrong_model.stderr
    bad_tile = cli("upscale", photo, "--tile", "30")
    assert bad_tile.exit_code == 2 and "--tile must be 0 (off) or a positive multiple of 8, got 30" in bad_tile.stderr


def test_tiles_blend_to_the_untiled_result_for_a_local_operator():
    """The tiling and seam blending are exact for an operator without context (nearest-neighbour x4)."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), np.uint8))

    def nearest(crop):
        return np.asarray(crop.resize((crop.size[0] * 4, crop.size[1] * 4), Image.NEAREST), dtype=np.float64)

    tiled = tiles.upscale_tiled(image, 24, 8, 4, nearest)
    assert np.allclose(tiled, nearest(image))
    assert tiles.tile_starts(56, 24, 8) == [0, 16, 32] and tiles.tile_starts(20, 24, 8) == [0]
