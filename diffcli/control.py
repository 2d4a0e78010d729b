"""Control maps for ControlNet: built-in preprocessors on numpy and Pillow alone, controlnet_aux's model-based ones
from local weights, chosen by a type text such as `canny:low=50,high=150` (commands.preprocess writes one)."""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from diffcli.errors import RuntimeFailure, UsageError, first_line

TG22 = 13573  # tan(22.5 deg) in 15-bit fixed point, as OpenCV's canny.cpp bins gradient directions
SOBEL_MAX = 2040  # largest L1 magnitude of a 3x3 Sobel on 8-bit pixels (4*255 in x plus 4*255 in y)
ANNOTATORS_ENV = "DIFFCLI_ANNOTATORS"  # the only place model-based annotators are loaded from: never a download
METADATA_KEY = "diffcli-preprocess"  # PNG text chunk recording how a map was made (not "diffcli": replay reads that)


@dataclass(frozen=True)
class Param:
    """A preprocessor parameter: default and inclusive range."""

    default: float
    low: float
    high: float
    integer: bool = True


@dataclass(frozen=True)
class Preprocessor:
    """A built-in preprocessor: function(image, **params) -> map, its parameters, what its map shows."""

    function: Callable
    params: dict
    about: str


def _rgb(grey):
    """A bool mask or an 8-bit grey array as a PIL RGB image (white = 255)."""
    import numpy as np
    from PIL import Image

    grey = grey.astype(np.uint8) * 255 if grey.dtype == bool else grey
    return Image.fromarray(grey, "L").convert("RGB")


def canny(image, low: int = 100, high: int = 200):
    """Edges, white on black (Canny 1986, as cv2.Canny in A1111's canny: 3x3 Sobel, L1 magnitude, the channel with
    the largest one, non-maximum suppression, hysteresis with 8-connectivity; `low`/`high` on that magnitude)."""
    import numpy as np

    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    h, w = rgb.shape[:2]
    pad = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")  # BORDER_REPLICATE, as OpenCV's Canny
    at = lambda r, c: pad[1 + r:1 + r + h, 1 + c:1 + c + w]  # noqa: E731
    dx = at(-1, 1) + 2 * at(0, 1) + at(1, 1) - at(-1, -1) - 2 * at(0, -1) - at(1, -1)
    dy = at(1, -1) + 2 * at(1, 0) + at(1, 1) - at(-1, -1) - 2 * at(-1, 0) - at(-1, 1)
    best = (np.abs(dx) + np.abs(dy)).argmax(axis=2)[..., None]  # first channel on ties, as OpenCV
    dx, dy = np.take_along_axis(dx, best, 2)[..., 0], np.take_along_axis(dy, best, 2)[..., 0]
    mag = np.abs(dx) + np.abs(dy)
    weak = (mag > low) & _local_maxima(dx, dy, mag)
    return _rgb(_hysteresis(weak, weak & (mag > high)))


def _local_maxima(dx, dy, mag):
    """Non-maximum suppression along the gradient, binned and tie-broken exactly as OpenCV's canny.cpp."""
    import numpy as np

    h, w = mag.shape
    padded = np.pad(mag, 1)  # zero magnitude outside the image
    at = lambda r, c: padded[1 + r:1 + r + h, 1 + c:1 + c + w]  # noqa: E731
    ax, ay = np.abs(dx), np.abs(dy) << 15
    tg22 = ax * TG22
    across = ay < tg22  # gradient within 22.5 deg of horizontal
    along = ~across & (ay > tg22 + (ax << 16))  # within 22.5 deg of vertical
    same = (dx ^ dy) >= 0  # gradient down-right or up-left
    keep = np.where(across, (mag > at(0, -1)) & (mag >= at(0, 1)), (mag > at(-1, 0)) & (mag >= at(1, 0)))
    diagonal = np.where(same, (mag > at(-1, -1)) & (mag > at(1, 1)), (mag > at(-1, 1)) & (mag > at(1, -1)))
    return np.where(across | along, keep, diagonal)


def _hysteresis(weak, strong):
    """The weak pixels 8-connected to a strong one: connected components by vectorised union-find (hooking onto the
    smaller root, then pointer jumping, as Shiloach & Vishkin 1982)."""
    import numpy as np

    where = np.flatnonzero(weak)
    index = np.full(weak.shape, -1, dtype=np.int64)
    index.flat[where] = np.arange(where.size)
    pairs = [(index[:, :-1], index[:, 1:]), (index[:-1], index[1:]), (index[:-1, :-1], index[1:, 1:]),
             (index[:-1, 1:], index[1:, :-1])]
    a = np.concatenate([x[(x >= 0) & (y >= 0)] for x, y in pairs])
    b = np.concatenate([y[(x >= 0) & (y >= 0)] for x, y in pairs])
    parent = np.arange(where.size)
    while (differ := parent[a] != parent[b]).any():
        ra, rb = parent[a][differ], parent[b][differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while not np.array_equal(jumped := parent[parent], parent):
            parent = jumped
    kept = np.zeros(where.size, dtype=bool)
    kept[parent[index[strong]]] = True
    edges = np.zeros(weak.shape, dtype=bool)
    edges.flat[where] = kept[parent]
    return edges


def scribble(image, level: int = 32, thicken: int = 1):
    """Strokes, white on black: XDoG as A1111's scribble_xdog (a Gaussian blur of sigma 5 minus one of sigma 0.5, the
    darkest channel; white where twice it exceeds `level`), then widened `thicken` px by a max filter."""
    import numpy as np
    from PIL import ImageFilter

    fine, coarse = (np.asarray(image.filter(ImageFilter.GaussianBlur(s)), np.float32) for s in (0.5, 5.0))
    strokes = _rgb(2 * (coarse - fine).min(axis=2) > level)
    return strokes.filter(ImageFilter.MaxFilter(2 * thicken + 1)) if thicken else strokes


def threshold(image, level: int = 127):
    """Dark pixels white, the rest black: grey <= `level` (cv2.THRESH_BINARY_INV, as A1111's threshold); level 0
    picks it by Otsu's method."""
    import numpy as np

    grey = np.asarray(image.convert("L"))
    return _rgb(grey <= (level or _otsu(grey)))


def _otsu(grey) -> int:
    """Otsu 1979: the level with the largest between-class variance of the grey histogram (cv2.THRESH_OTSU)."""
    import numpy as np

    p = np.bincount(grey.ravel(), minlength=256) / grey.size
    w0, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return int(np.nan_to_num(between, nan=0, posinf=0).argmax())


def lineart(image, sigma: float = 6.0):
    """Dark lines, white on black: how much darker than a Gaussian-blurred copy (`sigma`) each pixel is, scaled by the
    median of the clear lines, as controlnet_aux's lineart_standard ("from white bg & black line" in A1111)."""
    import numpy as np
    from PIL import ImageFilter

    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)), np.float32)
    darker = np.clip((blurred - np.asarray(image, np.float32)).min(axis=2), 0, 255)
    lines = darker[darker > 8]  # clearly darker than the surround: the scale of this image's lines
    scale = max(16.0, float(np.median(lines)) if lines.size else 16.0)
    return _rgb(np.clip(darker / scale * 127, 0, 255).astype(np.uint8))


def tile(image, factor: float = 2.0):
    """A1111's tile_resample: shrink by `factor` (area average, as cv2.INTER_AREA), then back to the input size
    (bicubic), so the tile model re-invents the lost detail."""
    from PIL import Image

    w, h = image.size
    small = image.resize((max(1, int(w / factor)), max(1, int(h / factor))), Image.BOX)
    return small.resize(image.size, Image.BICUBIC).convert("RGB")


def blur(image, sigma: float = 9.0):
    """A Gaussian blur of `sigma` px, as A1111's blur_gaussian for the tile model."""
    from PIL import ImageFilter

    return image.convert("RGB").filter(ImageFilter.GaussianBlur(sigma))


def none(image):
    """The image itself: it already is a control map."""
    return image.convert("RGB")


PREPROCESSORS = {
    "canny": Preprocessor(canny, {"low": Param(100, 0, SOBEL_MAX), "high": Param(200, 0, SOBEL_MAX)},
                          "edges, white on black (as cv2.Canny; thresholds on the L1 Sobel magnitude, 0..2040)"),
    "scribble": Preprocessor(scribble, {"level": Param(32, 1, 255), "thicken": Param(1, 0, 8)},
                             "strokes from a drawing or photo (XDoG), widened by `thicken` px"),
    "threshold": Preprocessor(threshold, {"level": Param(127, 0, 255)},
                              "grey <= level white, the rest black; level 0: Otsu's automatic level"),
    "lineart": Preprocessor(lineart, {"sigma": Param(6.0, 0.5, 32.0, False)},
                            "dark lines as white on black (darkness against a blurred copy)"),
    "tile": Preprocessor(tile, {"factor": Param(2.0, 1.0, 8.0, False)}, "shrunk by factor and enlarged back"),
    "blur": Preprocessor(blur, {"sigma": Param(9.0, 0.5, 64.0, False)}, "a Gaussian blur"),
    "none": Preprocessor(none, {}, "the image as it is (already a control map)"),
}
ANNOTATORS = {  # name -> controlnet_aux class, its weights file (lllyasviel/Annotators), what it finds
    "depth": ("MidasDetector", "dpt_hybrid-midas-501f0c75.pt", "depth (MiDaS)"),
    "openpose": ("OpenposeDetector", "body_pose_model.pth", "body pose"),
    "normal": ("NormalBaeDetector", "scannet.pt", "surface normals"),
    "mlsd": ("MLSDdetector", "mlsd_large_512_fp32.pth", "straight lines"),
    "hed": ("HEDdetector", "ControlNetHED.pth", "soft edges (HED)"),
    "softedge": ("PidiNetDetector", "table5_pidinet.pth", "soft edges (PiDiNet)"),
    "lineart_anime": ("LineartAnimeDetector", "netG.pth", "anime line art"),
}


def parse_type(text: str, flag: str = "--type") -> tuple[str, dict]:
    """`canny` or `canny:low=50,high=150` -> ("canny", {"low": 50, "high": 150}), defaults filled in; a bad name, key,
    value or range is a UsageError naming it."""
    name, colon, rest = text.partition(":")
    name = name.strip().lower()
    if name not in PREPROCESSORS and name not in ANNOTATORS:
        raise UsageError(f"{flag}: unknown type, got {name!r}", f"one of: {', '.join([*PREPROCESSORS, *ANNOTATORS])}")
    spec, given = PREPROCESSORS[name].params if name in PREPROCESSORS else {}, {}
    if colon and not spec:
        raise UsageError(f"{flag} {name}: takes no parameters, got {rest!r}")
    for item in rest.split(",") if colon else []:
        key, eq, value = (part.strip() for part in item.partition("="))
        if not (key and eq and value):
            raise UsageError(f"{flag} {name}: parameters are KEY=VALUE, got {item!r}", f"e.g. {example(name)}")
        if key not in spec:
            raise UsageError(f"{flag} {name}: unknown parameter, got {key!r}", f"it takes {', '.join(spec)}")
        if key in given:
            raise UsageError(f"{flag} {name}: {key} given twice, got {rest!r}")
        given[key] = _value(f"{flag} {name}", key, value, spec[key])
    values = {key: param.default for key, param in spec.items()} | given
    if name == "canny" and values["low"] > values["high"]:
        raise UsageError(f"{flag} canny: low must not exceed high, got low={values['low']} high={values['high']}")
    return name, values


def _value(where: str, key: str, text: str, param: Param):
    """One parameter's value, checked against its range."""
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    kind = "an integer" if param.integer else "a number"
    if not math.isfinite(number) or (param.integer and not number.is_integer()):
        raise UsageError(f"{where}: {key} must be {kind}, got {text!r}")
    if not param.low <= number <= param.high:
        raise UsageError(f"{where}: {key} must be in {param.low:g}..{param.high:g}, got {text!r}")
    return int(number) if param.integer else number


def example(name: str) -> str:
    """`name:key=default,...`, for hints."""
    return name + ":" + ",".join(f"{k}={p.default:g}" for k, p in PREPROCESSORS[name].params.items())


def annotate(image, name: str, allow_pickle: bool):
    """controlnet_aux's map of `image` at its size, the detector loaded from $DIFFCLI_ANNOTATORS only (from_pretrained
    on a folder reads the file there: no download); its .pth weights are pickles, so --allow-pickle is required."""
    from PIL import Image

    class_name, weights, _ = ANNOTATORS[name]
    try:
        module = importlib.import_module("controlnet_aux")
    except ImportError:
        raise UsageError(f"--type {name} needs the optional package controlnet_aux, which is not installed",
                         f"pip install controlnet_aux, and fetch its annotator weights ({weights} from "
                         f"lllyasviel/Annotators) into ${ANNOTATORS_ENV}") from None
    folder = os.environ.get(ANNOTATORS_ENV)
    if not folder or not (Path(folder) / weights).is_file():
        raise UsageError(f"--type {name}: no {weights} in ${ANNOTATORS_ENV}, got {folder or '(unset)'}",
                         f"fetch {weights} from lllyasviel/Annotators into that folder")
    if not allow_pickle:
        raise UsageError(f"--type {name}: {weights} is a pickle file, refused", "pass --allow-pickle if you trust it")
    try:
        result = getattr(module, class_name).from_pretrained(folder)(image).convert("RGB")
    except Exception as exc:
        raise RuntimeFailure(f"--type {name}: the {class_name} annotator failed: {first_line(exc)}") from exc
    return result if result.size == image.size else result.resize(image.size, Image.BICUBIC)


def make(image, name: str, params: dict, allow_pickle: bool):
    """The map of type `name` (parse_type's name and parameters) of a PIL RGB image, at its size."""
    if name in ANNOTATORS:
        return annotate(image, name, allow_pickle)
    return PREPROCESSORS[name].function(image, **params)
