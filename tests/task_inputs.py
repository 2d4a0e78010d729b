"""Small input images shared by the img2img, inpaint and upscale tests (plain helpers, not fixtures)."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FAST = ("--steps", "2", "--seed", "3", "--quiet")


def pixels(path) -> np.ndarray:
    """An image file as an int16 RGB array (so differences do not wrap)."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def write_photo(folder: Path, size=(60, 50), name="photo.png") -> Path:
    """Random RGB noise: any change made by a pipeline shows."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(folder / name)
    return folder / name


def write_mask(folder: Path, size=(60, 50), box=(20, 15, 40, 35), name="mask.png") -> Path:
    """Black with a white rectangle (the area to repaint)."""
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle(box, fill=255)
    image.save(folder / name)
    return folder / name
