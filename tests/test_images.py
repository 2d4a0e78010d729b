"""Reading inputs deliberately: EXIF orientation, every common mode, hostile and broken files."""

import numpy as np
import pytest
from PIL import Image

from diffcli import images
from diffcli.errors import UsageError


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "L", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_8_bit_rgb(tmp_path, mode):
    wide = {"I;16": np.full((8, 16), 40000, np.uint16), "I": np.full((8, 16), 40000, np.int32), "F": np.full((8, 16), 0.5, np.float32)}
    image = Image.fromarray(wide[mode]) if mode in wide else Image.new("RGB", (16, 8), (200, 100, 50)).convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    image.save(path)
    rgb = images.load_image(str(path))
    assert rgb.mode == "RGB" and rgb.size == (16, 8)


def test_transparency_is_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert images.load_image(str(tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert images.load_image(str(tmp_path / "r.jpg")).size == (10, 20)


def test_high_bit_depth_is_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "w.png")
    assert images.load_image(str(tmp_path / "w.png")).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"not an image at all"), "not an image file"),
        (lambda p: p.write_bytes(_png_bytes()[:60]), "broken image data"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
)
def test_unreadable_inputs_are_usage_errors(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(UsageError, match=message):
        images.load_image(str(path))


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    with pytest.raises(UsageError, match="image too large"):
        images.load_image(str(tmp_path / "big.png"))


def test_animated_images_are_refused(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(UsageError, match="animated images are not supported"):
        images.load_image(str(tmp_path / "a.gif"))


def test_mask_size_mismatch_needs_resize_flag(tmp_path):
    Image.new("L", (8, 8), 255).save(tmp_path / "m.png")
    with pytest.raises(UsageError, match="--mask .* is 8x8 but the image is 16x16 \\(pass --resize-mask"):
        images.load_mask(str(tmp_path / "m.png"), (16, 16), resize=False, invert=False)
    assert images.load_mask(str(tmp_path / "m.png"), (16, 16), resize=True, invert=True).getpixel((0, 0)) == 0


def test_fit_crop_stretch_and_rounding():
    image = Image.new("RGB", (100, 50))
    assert images.fit_to_multiple(image, None, None, 8, "fit").size == (96, 48)
    for mode in images.RESIZE_MODES:
        assert images.fit_to_multiple(image, 64, 64, 8, mode).size == (64, 64)
    with pytest.raises(UsageError, match="--resize must be one of fit, crop, stretch"):
        images.fit_to_multiple(image, 64, 64, 8, "zoom")


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_palette_transparency_and_la_are_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    for name in ("p.png", "la.png"):
        assert images.load_image(str(tmp_path / name)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg_and_truncated_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert images.load_image(str(tmp_path / "c.jpg")).getpixel((4, 4))[0] > 200  # red stays red
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    with pytest.raises(UsageError, match="cut.jpg: broken image data"):
        images.load_image(str(tmp_path / "cut.jpg"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16", "1"])
def test_masks_of_any_mode_become_l(tmp_path, mode):
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "m.png")
    else:
        Image.new("L", (8, 8), 255).convert(mode).save(tmp_path / "m.png")
    mask = images.load_mask(str(tmp_path / "m.png"), (8, 8), resize=False, invert=False)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 255


def test_mask_from_alpha_keeps_the_alpha_the_rgb_path_drops(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (9, 9, 9, 255))
    rgba.putpixel((0, 0), (9, 9, 9, 0))
    rgba.save(tmp_path / "a.png")
    mask = images.mask_from_alpha(str(tmp_path / "a.png"), invert=False)
    assert (mask.getpixel((0, 0)), mask.getpixel((1, 0))) == (255, 0)
    assert images.mask_from_alpha(str(tmp_path / "a.png"), invert=True).getpixel((0, 0)) == 0
    with pytest.raises(UsageError, match="has no transparency"):
        Image.new("RGB", (4, 2)).save(tmp_path / "opaque.png")
        images.mask_from_alpha(str(tmp_path / "opaque.png"), invert=False)


def test_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)  # 40,000 px is over twice the cap: Pillow's bomb error
    with pytest.raises(UsageError, match="big.png: image too large \\(over 10,000 pixels\\)"):
        images.load_image(str(tmp_path / "big.png"))
