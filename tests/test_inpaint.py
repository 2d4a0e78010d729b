"""inpaint and outpaint through the CLI: 4- and 9-channel models, exact pixels outside the mask, mask options."""

import numpy as np
import pytest
from PIL import Image, ImageFilter
from task_inputs import FAST, pixels, write_mask, write_photo

from diffcli.output import read_metadata


def kept(mask_path, blur: int) -> np.ndarray:
    """Where the blurred mask is 0: the pixels inpaint must leave exactly as they were."""
    mask = Image.open(mask_path).convert("L")
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask) == 0


@pytest.mark.parametrize("model", ["tiny_model", "tiny_inpaint_model"])
def test_inpaint_keeps_pixels_outside_the_blurred_mask(cli, request, tmp_path, model):
    """A plain 4-channel U-Net and a 9-channel inpainting U-Net, both through StableDiffusionInpaintPipeline."""
    photo, mask = write_photo(tmp_path), write_mask(tmp_path)
    result = cli("inpaint", photo, "a cat", "--mask", mask, "--mask-blur", "2", "--model", request.getfixturevalue(model),
                 "-o", "p.png", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    keep = kept(mask, 2)
    assert np.array_equal(pixels("p.png")[keep], pixels(photo)[keep])
    assert not np.array_equal(pixels("p.png")[~keep], pixels(photo)[~keep])
    record = result.json_lines()[0]
    assert (record["task"], record["mask"], record["mask_blur"], record["strength"]) == ("inpaint", str(mask), 2, 1.0)


def test_inpaint_rounds_the_working_size_but_saves_the_input_size(cli, tiny_model, tmp_path):
    photo, mask = write_photo(tmp_path, (61, 51)), write_mask(tmp_path, (61, 51))
    result = cli("inpaint", photo, "a cat", "--mask", mask, "--model", tiny_model, "-o", "r.png", "--steps", "2", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert "input resized from 61x51 to 60x50" in result.stderr and Image.open("r.png").size == (61, 51)
    keep = kept(mask, 4)
    assert np.array_equal(pixels("r.png")[keep], pixels(photo)[keep])


def test_inpaint_masked_only_works_on_a_crop_at_model_resolution(cli, tiny_model, tmp_path):
    photo, mask = write_photo(tmp_path), write_mask(tmp_path, box=(20, 15, 30, 25))
    result = cli("inpaint", photo, "a cat", "--mask", mask, "--masked-only", "--padding", "4", "--model", tiny_model,
                 "-o", "m.png", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["width"], record["height"]) == (64, 64)  # an 19x19 crop (mask + padding) worked at the model's 64 px
    assert Image.open("m.png").size == (60, 50) and read_metadata("m.png")["masked_only"] is True
    keep = kept(mask, 4)
    assert np.array_equal(pixels("m.png")[keep], pixels(photo)[keep])


def test_inpaint_invert_mask(cli, tiny_model, tmp_path):
    photo, mask = write_photo(tmp_path), write_mask(tmp_path)
    result = cli("inpaint", photo, "a cat", "--mask", mask, "--invert-mask", "--mask-blur", "0", "--model", tiny_model, "-o", "v.png", *FAST)
    inside = np.asarray(Image.open(mask)) == 255
    assert result.exit_code == 0 and np.array_equal(pixels("v.png")[inside], pixels(photo)[inside])
    assert not np.array_equal(pixels("v.png")[~inside], pixels(photo)[~inside])


def test_inpaint_mask_from_alpha_repaints_transparent_pixels(cli, tiny_model, tmp_path):
    photo, mask = write_photo(tmp_path), write_mask(tmp_path)
    rgba = Image.open(photo).convert("RGBA")
    rgba.putalpha(Image.open(mask).point(lambda v: 0 if v else 255))
    rgba.save(tmp_path / "holes.png")
    result = cli("inpaint", tmp_path / "holes.png", "a cat", "--mask-from-alpha", "--mask-blur", "0", "--model", tiny_model, "-o", "a.png", *FAST)
    assert result.exit_code == 0, result.stderr
    keep = kept(mask, 0)
    assert np.array_equal(pixels("a.png")[keep], pixels(photo)[keep])
    assert read_metadata("a.png")["mask"] == "alpha"


def test_inpaint_resize_mask_stretches_a_mask_of_another_size(cli, tiny_model, tmp_path):
    photo, mask = write_photo(tmp_path), write_mask(tmp_path, (120, 100), (40, 30, 80, 70))
    result = cli("inpaint", photo, "a cat", "--mask", mask, "--resize-mask", "--model", tiny_model, "-o", "s.png", *FAST)
    assert result.exit_code == 0, result.stderr
    assert Image.open("s.png").size == (60, 50)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mask", "small.png"], "--mask small.png is 8x8 but the image is 60x50 (pass --resize-mask"),
        ([], "give exactly one of --mask FILE or --mask-from-alpha"),
        (["--mask", "black.png"], "the mask is empty"),
        (["--mask-from-alpha"], "has no transparency"),
        (["--mask", "nothere.png"], "--mask nothere.png: no such file"),
        (["--mask", "small.png", "--resize-mask", "--mask-blur", "-1"], "--mask-blur and --padding must be >= 0"),
        (["--mask", "small.png", "--resize-mask", "--width", "64"], "--width 64 sets the crop size of --masked-only"),
        (["--mask", "small.png", "--resize-mask", "--strength", "0.2", "--steps", "2"], "less than one denoising step"),
    ],
)
def test_inpaint_usage_errors(cli, tiny_model, tmp_path, args, message):
    Image.new("L", (8, 8), 255).save("small.png")
    Image.new("L", (60, 50), 0).save("black.png")
    result = cli("inpaint", write_photo(tmp_path), "a cat", "--model", tiny_model, *args, "--seed", "1")
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_outpaint_extends_the_canvas_and_keeps_the_original(cli, tiny_model, tmp_path):
    photo = write_photo(tmp_path)
    result = cli("outpaint", photo, "a cat", "--extend", "left=10,top=4", "--feather", "2", "--model", tiny_model, "-o", "o.png", *FAST)
    assert result.exit_code == 0, result.stderr
    out = pixels("o.png")
    assert out.shape == (54, 70, 3)
    assert np.array_equal(out[4 + 8:, 10 + 8:], pixels(photo)[8:, 8:])  # beyond the seam, the original is untouched
    assert not np.array_equal(out[:4], np.repeat(out[4:5], 4, axis=0))  # the new rows were painted, not just stretched
    assert read_metadata("o.png")["outpaint"] == "left=10,top=4"


def test_outpaint_all_sides_rounds_the_canvas_up(cli, tiny_model, tmp_path):
    photo = write_photo(tmp_path, (31, 31))
    result = cli("outpaint", photo, "a cat", "--extend", "all=8", "--model", tiny_model, "-o", "a.png", "--steps", "2", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    assert "canvas 47x47 rounded up to 48x48 (a multiple of 2) on the right and bottom" in result.stderr
    assert Image.open("a.png").size == (48, 48)  # 31 + 16 = 47, rounded up to the tiny model's multiple of 2
    assert np.array_equal(pixels("a.png")[8 + 8:-9 - 8, 8 + 8:-9 - 8], pixels(photo)[8:-8, 8:-8])


@pytest.mark.parametrize(
    ("extend", "message"),
    [("middle=3", "expected side=pixels"), ("left=0", "adds nothing"), ("left=-4", "expected side=pixels")],
)
def test_outpaint_extend_errors(cli, tiny_model, tmp_path, extend, message):
    result = cli("outpaint", write_photo(tmp_path), "a cat", "--extend", extend, "--model", tiny_model)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_outpaint_seam_is_exactly_feather_pixels_wide(cli, tiny_model, tmp_path):
    photo = write_photo(tmp_path, (40, 30))
    result = cli("outpaint", photo, "a cat", "--extend", "right=8", "--feather", "6", "--model", tiny_model, "-o", "f.png", *FAST)
    assert result.exit_code == 0, result.stderr
    out, original = pixels("f.png"), pixels(photo)
    assert np.array_equal(out[:, :40 - 6], original[:, :40 - 6])  # 6+ px from the new edge: untouched
    assert not np.array_equal(out[:, 40 - 6:40], original[:, 40 - 6:])  # the seam was blended
