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


# ---------------------------------------------------------------- masked content (--fill) and --mask-from-alpha


def test_fill_from_surroundings_keeps_known_pixels_and_fills_holes_from_their_neighbours():
    from diffcli.images import fill_from_surroundings

    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30], rgb[:, 30:] = (200, 0, 0), (0, 0, 200)  # red left half, blue right half
    known = np.full((40, 60), 255, np.uint8)
    known[10:30, 20:40] = 0  # a hole across the boundary, its pixels set to white
    rgb[10:30, 20:40] = 255
    out = np.asarray(fill_from_surroundings(Image.fromarray(rgb), Image.fromarray(known)), dtype=np.int16)
    assert np.array_equal(out[known == 255], rgb[known == 255])
    assert out[20, 21, 0] > 150 and out[20, 21, 2] < 60  # next to the red: red
    assert out[20, 38, 2] > 150 and out[20, 38, 0] < 60  # next to the blue: blue
    assert out[known == 0].min(axis=-1).max() < 120  # nothing of the white under the hole is left


def test_inpaint_fill_modes_start_from_different_content_and_are_recorded(cli, tiny_model, tmp_path):
    photo, mask = write_photo(tmp_path), write_mask(tmp_path)
    keep, made = kept(mask, 0), {}
    for fill in ("original", "fill", "latent-noise", "latent-nothing"):
        result = cli("inpaint", photo, "a cat", "--mask", mask, "--mask-blur", "0", "--strength", "0.5", "--steps", "4",
                     "--fill", fill, "--model", tiny_model, "-o", f"{fill}.png", "--json", "--seed", "3", "--quiet")
        assert result.exit_code == 0, result.stderr
        record, meta = result.json_lines()[0], read_metadata(f"{fill}.png")
        assert record["fill"] == meta["fill"] == fill
        label = {"original": None, "fill": "fill", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}[fill]
        parameters = Image.open(f"{fill}.png").text["parameters"]
        assert (f"Masked content: {label}" in parameters) if label else ("Masked content" not in parameters)
        assert np.array_equal(pixels(f"{fill}.png")[keep], pixels(photo)[keep])
        made[fill] = (pixels(f"{fill}.png")[~keep], meta["id"])
    for a, b in [("original", "fill"), ("fill", "latent-noise"), ("fill", "latent-nothing"), ("latent-noise", "latent-nothing")]:
        assert not np.array_equal(made[a][0], made[b][0]), (a, b)
    assert len({image_id for _, image_id in made.values()}) == 4  # --fill is part of each image's identity


@pytest.mark.parametrize("model", ["tiny_model", "tiny_inpaint_model"])
def test_inpaint_latent_noise_is_per_seed_in_a_batch(cli, request, tmp_path, model):
    """Image i of a batch equals seed+i run alone (each image's VAE sample and noise from its own generator)."""
    photo, mask = write_photo(tmp_path), write_mask(tmp_path)
    args = ("inpaint", photo, "a cat", "--mask", mask, "--strength", "0.6", "--steps", "4", "--fill", "latent-noise",
            "--model", request.getfixturevalue(model), "--quiet")
    assert cli(*args, "--seed", "5", "-N", "2", "--batch-size", "2", "-o", "b-{index}.png").exit_code == 0
    assert cli(*args, "--seed", "6", "-o", "alone.png").exit_code == 0
    assert cli(*args, "--seed", "6", "--fill", "latent-nothing", "-o", "other.png").exit_code == 0
    assert np.abs(pixels("b-1.png") - pixels("alone.png")).max() <= 2
    assert np.abs(pixels("b-1.png") - pixels("other.png")).max() > 2


def test_inpaint_fill_usage_error(cli, tiny_model, tmp_path):
    result = cli("inpaint", write_photo(tmp_path), "a cat", "--mask", write_mask(tmp_path), "--fill", "noise",
                 "--model", tiny_model)
    assert result.exit_code == 2
    assert "--fill must be one of original, fill, latent-noise, latent-nothing, got 'noise'" in result.stderr


def test_mask_from_alpha_leaves_no_white_frame(cli, tmp_path):
    """A coloured opaque centre in a transparent border (RGB black under it): the old white composite leaked a white
    ring into the repainted border (through the feathered paste-back and the encoded image); the fill does not."""
    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[32:96, 32:96] = (30, 70, 225, 255)  # world.py's blue
    rgba[52:76, 52:76] = (245, 220, 30, 255)  # and yellow
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    border = rgba[..., 3] == 0
    Image.fromarray(np.where(border, 255, 0).astype(np.uint8)).save(tmp_path / "border.png")
    on_white = Image.alpha_composite(Image.new("RGBA", (128, 128), "white"), Image.fromarray(rgba, "RGBA")).convert("RGB")
    on_white.save(tmp_path / "on-white.png")  # the input as --mask-from-alpha read it before
    prompt = ("a yellow square on a blue background", "--seed", "1", "--steps", "6", "--quiet")  # the bundled model
    assert cli("inpaint", tmp_path / "cutout.png", *prompt, "--mask-from-alpha", "-o", "alpha.png").exit_code == 0
    assert cli("inpaint", tmp_path / "on-white.png", *prompt, "--mask", tmp_path / "border.png", "-o", "white.png").exit_code == 0
    alpha, white = pixels("alpha.png")[border], pixels("white.png")[border]
    whitish = lambda p: int((p.min(axis=-1) > 128).sum())  # noqa: E731  (the input's colours all have a channel below 100)
    assert whitish(white) > 50 and whitish(alpha) == 0, (whitish(white), whitish(alpha))
    assert alpha.mean() < white.mean() - 3
    keep = kept(tmp_path / "border.png", 4)  # beyond the default 4 px feather: the opaque pixels, exactly
    assert np.array_equal(pixels("alpha.png")[keep], pixels(tmp_path / "on-white.png")[keep])


def test_outpaint_fill_defaults_to_the_surroundings_and_original_keeps_the_stretched_edges(cli, tiny_model, tmp_path):
    photo = write_photo(tmp_path)
    args = ("outpaint", photo, "a cat", "--extend", "left=16", "--strength", "0.5", "--steps", "4", "--model", tiny_model,
            "--seed", "3", "--quiet")
    assert cli(*args, "-o", "default.png").exit_code == 0
    assert cli(*args, "--fill", "original", "-o", "original.png").exit_code == 0
    assert (read_metadata("default.png")["fill"], read_metadata("original.png")["fill"]) == ("fill", "original")
    assert not np.array_equal(pixels("default.png")[:, :16], pixels("original.png")[:, :16])
