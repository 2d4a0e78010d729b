"""Reading input images and masks deliberately: EXIF orientation, modes, sizes, hostile files."""

from __future__ import annotations

import warnings
from pathlib import Path

from diffcli.errors import UsageError
from diffcli.options import check_path

MAX_PIXELS = 64_000_000  # about 8000x8000: larger inputs are refused rather than exhausting memory
RESIZE_MODES = ("fit", "crop", "stretch")


def open_image(path: str, flag: str):
    """Open, fully decode and orient an image; every failure is a UsageError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    check_path(flag, path)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(Path(path))
            if getattr(image, "n_frames", 1) > 1:
                raise UsageError(f"{flag} {path}: animated images are not supported", "extract one frame first")
            image.load()
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise UsageError(f"{flag} {path}: not an image file diffcli can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(f"{flag} {path}: image too large (over {MAX_PIXELS:,} pixels)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        if isinstance(exc, OSError) and exc.errno is not None:  # the file system's refusal (permission, loop), not the data's
            raise UsageError(f"{flag} {path}: cannot read it: {exc.strerror}") from None
        raise UsageError(f"{flag} {path}: broken image data ({exc})") from None
    return ImageOps.exif_transpose(image)


def to_rgb(image):
    """Any mode to 8-bit RGB: transparency is composited on white, 16-bit and float are rescaled."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str, flag: str = "INPUT"):
    """An input image as RGB."""
    return to_rgb(open_image(path, flag))


def load_mask(path: str, size: tuple[int, int], resize: bool, invert: bool):
    """A mask as 8-bit L (white = repaint); a size mismatch is an error unless `resize`."""
    mask = open_image(path, "--mask")
    mask = to_rgb(mask).convert("L") if mask.mode not in ("L", "1") else mask.convert("L")
    if mask.size != size:
        if not resize:
            raise UsageError(
                f"--mask {path} is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}",
                "pass --resize-mask to stretch it",
            )
        mask = mask.resize(size)
    return invert_mask(mask) if invert else mask


def mask_from_alpha(path: str, invert: bool):
    """Transparent pixels of the input (alpha < 128) become the area to repaint."""
    return alpha_input(path, invert)[1]


def alpha_input(path: str, invert: bool):
    """The input and its mask for --mask-from-alpha: transparent pixels (alpha < 128) are the area to repaint, and
    the image under them is filled from the opaque pixels around them (not composited on white, which would leak
    into the result as a white frame); semi-transparent pixels are blended over that fill."""
    from PIL import Image

    image = open_image(path, "INPUT")
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        raise UsageError(f"--mask-from-alpha: {path} has no transparency", "give a --mask file instead")
    rgba = image.convert("RGBA") if image.mode in ("RGBA", "LA", "PA", "P") else to_rgb(image).convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getbbox() is None:  # transparent everywhere: no surroundings to fill from, a blank white canvas
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    else:
        background = fill_from_surroundings(rgba.convert("RGB"), alpha).convert("RGBA")
    mask = alpha.point(lambda a: 255 if a < 128 else 0)
    return Image.alpha_composite(background, rgba).convert("RGB"), invert_mask(mask) if invert else mask


def fill_from_surroundings(image, known):
    """`image` (RGB) where `known` (L, 255 = keep) is 0 replaced by the colours around it, smoothly: pull-push
    interpolation (Gortler et al. 1996, "The Lumigraph", sec. 3.4), the float counterpart of A1111's
    masking.fill. Pixels where `known` is 255 are returned unchanged; partly known ones are blended."""
    import numpy as np
    from PIL import Image

    weight = np.asarray(known.convert("L"), dtype=np.float64) / 255
    if not weight.any():  # nothing to fill from
        return image
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    levels = [(rgb * weight[..., None], weight)]
    while max(levels[-1][1].shape) > 1:  # pull: sums over 2x2 blocks up to one pixel
        colour, w = levels[-1]
        h, wd = w.shape
        colour = np.pad(colour, ((0, h % 2), (0, wd % 2), (0, 0)))
        w = np.pad(w, ((0, h % 2), (0, wd % 2)))
        h2, w2 = w.shape[0] // 2, w.shape[1] // 2
        levels.append((colour.reshape(h2, 2, w2, 2, 3).sum((1, 3)), w.reshape(h2, 2, w2, 2).sum((1, 3))))
    colour, w = levels[-1]
    filled = colour / w[..., None]  # the mean of every known pixel
    for colour, w in reversed(levels[:-1]):  # push: each level's own mean where it knows a pixel's worth, else the coarser one
        h, wd = w.shape
        up = np.stack([np.asarray(Image.fromarray(filled[..., c].astype(np.float32), "F").resize(
            (wd + wd % 2, h + h % 2), Image.BILINEAR))[:h, :wd] for c in range(3)], axis=-1)
        own = np.clip(w, 0, 1)[..., None]
        filled = own * colour / np.maximum(w, 1e-12)[..., None] + (1 - own) * up
    return Image.fromarray(np.clip(np.round(filled), 0, 255).astype(np.uint8), "RGB")


def invert_mask(mask):
    """White becomes black and back."""
    from PIL import ImageOps

    return ImageOps.invert(mask)


def fit_to_multiple(image, width: int | None, height: int | None, multiple: int, mode: str):
    """Resize to --width/--height (fit, crop or stretch) or round the size down to the model's multiple."""
    from PIL import Image, ImageOps

    if mode not in RESIZE_MODES:
        raise UsageError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    w, h = image.size
    if width or height:
        target = (width or round(w * height / h), height or round(h * width / w))
    else:
        target = (w, h)
    target = (max(multiple, target[0] - target[0] % multiple), max(multiple, target[1] - target[1] % multiple))
    if target == image.size:
        return image
    if mode == "stretch" or not (width or height):
        return image.resize(target, Image.LANCZOS)
    if mode == "crop":
        return ImageOps.fit(image, target, Image.LANCZOS)
    return ImageOps.pad(image, target, Image.LANCZOS, color=(255, 255, 255))


def blur_mask(mask, radius: int):
    """Feather a mask's edge by `radius` pixels."""
    from PIL import ImageFilter

    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def composite(original, generated, mask):
    """Generated pixels where the mask is white, the original's elsewhere (exactly where it is black)."""
    from PIL import Image

    return Image.composite(generated.resize(original.size), original, mask)


def to_pil(array):
    """float [0,1] HxWxC -> 8-bit PIL image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"))
