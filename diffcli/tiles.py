"""Tiled upscaling: overlapping tiles, blended with linear ramps so seams do not show."""

from __future__ import annotations


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: `tile` wide, at least `overlap` shared with the neighbour."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    return sorted(set(list(range(0, length - tile, step)) + [length - tile]))


def _ramp(size: int, fade: int, fade_start: bool, fade_end: bool):
    """Per-pixel weights along one axis: 1 inside, rising linearly over `fade` pixels at faded edges."""
    import numpy as np

    weights = np.ones(size)
    ramp = (np.arange(fade) + 0.5) / fade if fade > 0 else np.ones(0)
    if fade_start and fade:
        weights[:fade] = np.minimum(weights[:fade], ramp)
    if fade_end and fade:
        weights[size - fade:] = np.minimum(weights[size - fade:], ramp[::-1])
    return weights


def upscale_tiled(image, tile: int, overlap: int, scale: int, upscale_one):
    """Upscale `image` (PIL) tile by tile with `upscale_one(crop) -> HxWx3 float array`, blending the overlaps."""
    import numpy as np

    width, height = image.size
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    total = np.zeros((height * scale, width * scale, 3))
    weight = np.zeros((height * scale, width * scale, 1))
    for y in ys:
        for x in xs:
            w, h = min(tile, width - x), min(tile, height - y)
            out = np.asarray(upscale_one(image.crop((x, y, x + w, y + h))), dtype=np.float64)
            fade = overlap * scale
            wx = _ramp(w * scale, fade, x > xs[0], x < xs[-1])
            wy = _ramp(h * scale, fade, y > ys[0], y < ys[-1])
            mask = (wy[:, None] * wx[None, :])[..., None]
            total[y * scale:(y + h) * scale, x * scale:(x + w) * scale] += out * mask
            weight[y * scale:(y + h) * scale, x * scale:(x + w) * scale] += mask
    return total / weight
