"""Tiled upscaling: overlapping tiles, blended with linear ramps, each tile denoised from its own region of
the noise an untiled call with the same seed would draw (so tiling changes only the context a tile sees)."""

from __future__ import annotations

from contextlib import contextmanager

# The noise an untiled upscaler call draws from its generator, in order: (name, channels, input pixels per noise
# pixel); channels None = the VAE's latent channels. Read from diffusers 0.42 (pipeline_stable_diffusion_*upscale.py).
NOISE_DRAWS = {
    "StableDiffusionUpscalePipeline": (("image", 3, 1), ("latents", None, 1)),  # noise_level noise, then latents
    "StableDiffusionLatentUpscalePipeline": (("encode", None, 8), ("latents", None, 4)),  # VAE posterior sample, x2 latents
}


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Tile origins along one axis: `tile` wide, at least `overlap` shared with the neighbour, multiples of `align`."""
    if length <= tile:
        return [0]
    step = max(align, (tile - overlap) // align * align)
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


def upscale_tiled(image, tile: int, overlap: int, scale: int, upscale_one, align: int = 1):
    """Upscale `image` (PIL) tile by tile with `upscale_one(crop, box) -> HxWx3 float array`, blending the overlaps."""
    import numpy as np

    width, height = image.size
    xs, ys = tile_starts(width, tile, overlap, align), tile_starts(height, tile, overlap, align)
    total = np.zeros((height * scale, width * scale, 3))
    weight = np.zeros((height * scale, width * scale, 1))
    for y in ys:
        for x in xs:
            w, h = min(tile, width - x), min(tile, height - y)
            box = (x, y, x + w, y + h)
            out = np.asarray(upscale_one(image.crop(box), box), dtype=np.float64)
            fade = overlap * scale
            wx = _ramp(w * scale, fade, x > xs[0], x < xs[-1])
            wy = _ramp(h * scale, fade, y > ys[0], y < ys[-1])
            mask = (wy[:, None] * wx[None, :])[..., None]
            total[y * scale:(y + h) * scale, x * scale:(x + w) * scale] += out * mask
            weight[y * scale:(y + h) * scale, x * scale:(x + w) * scale] += mask
    return total / weight


def _align(pipe) -> int:
    """Tile origins lie on the coarsest noise grid the pipeline draws."""
    return max(per for _, _, per in NOISE_DRAWS[type(pipe).__name__])


def tile_count(pipe, size: tuple[int, int], tile: int, overlap: int) -> int:
    """How many tiles (pipeline calls) `upscale_with_tiles` makes for an image of `size`."""
    align = _align(pipe)
    return len(tile_starts(size[0], tile, overlap, align)) * len(tile_starts(size[1], tile, overlap, align))


def noise_fields(pipe, size: tuple[int, int], seed: int) -> dict:
    """The noise tensors an untiled call on an image of `size` with a CPU generator seeded `seed` draws, by name."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    dtype = pipe.unet.dtype
    fields = {}
    for name, channels, per in NOISE_DRAWS[type(pipe).__name__]:
        channels = channels or pipe.vae.config.latent_channels
        fields[name] = (torch.randn((1, channels, size[1] // per, size[0] // per), generator=generator, dtype=dtype), per)
    return fields


@contextmanager
def _low_res_noise(pipe, noise):
    """Make the x4 upscaler add `noise` (this tile's region of the full field) to its input instead of its own draw."""
    scheduler = pipe.low_res_scheduler
    scheduler.add_noise = lambda samples, _drawn, timesteps: type(scheduler).add_noise(
        scheduler, samples, noise.to(samples.device, samples.dtype), timesteps)
    try:
        yield
    finally:
        del scheduler.add_noise


def upscale_with_tiles(pipe, image, seed: int, tile: int, overlap: int, scale: int, call):
    """Upscale in tiles, each with its region of the untiled noise; `call(extra_kwargs, generator) -> HxWx3`."""
    import contextlib

    import torch

    fields = noise_fields(pipe, image.size, seed)
    align = _align(pipe)

    def one(crop, box):
        def region(name):
            tensor, per = fields[name]
            return tensor[:, :, box[1] // per:box[3] // per, box[0] // per:box[2] // per]

        patch = _low_res_noise(pipe, region("image")) if "image" in fields else contextlib.nullcontext()
        with patch:
            return call({"image": crop, "latents": region("latents")}, torch.Generator("cpu").manual_seed(seed))

    return upscale_tiled(image, tile, overlap, scale, one, align)
