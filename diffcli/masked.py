"""What inpaint's repainted area starts from: A1111's "Masked content" (processing.py `inpainting_fill`).

- `original`: the input's pixels as they are;
- `fill`: the masked pixels replaced by the colours around them (images.fill_from_surroundings) before encoding;
- `latent-noise`: `fill`, then the masked latents replaced by Gaussian noise drawn from each image's generator;
- `latent-nothing`: `fill`, then the masked latents set to zero.

As in A1111, the latent modes encode the filled image and the latent mask is the pixel mask binarised (diffusers
binarises it at 0.5) and resized to the latents. diffusers starts the masked area of a `--strength 1` run from pure
noise, so the modes change the result only below strength 1 (and only through the encoded image).
"""

from __future__ import annotations

import contextlib

from diffcli.errors import UsageError

MODES = ("original", "fill", "latent-noise", "latent-nothing")
LABELS = {"fill": "fill", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}  # A1111's "Masked content"


def check(fill: str) -> str:
    """--fill is one of MODES."""
    if fill not in MODES:
        raise UsageError(f"--fill must be one of {', '.join(MODES)}, got {fill!r}")
    return fill


def prefill(image, soft_mask, fill: str):
    """The image the pipeline encodes: the input, or (every mode but `original`, as A1111) the masked area filled
    from its surroundings."""
    from diffcli import images

    return image if fill == "original" else images.fill_from_surroundings(image, images.invert_mask(soft_mask))


@contextlib.contextmanager
def latent_content(pipe, fill: str | None, mask_image):
    """Within the block, the inpaint pipeline's encoded image has its masked latents replaced (latent-noise) or
    zeroed (latent-nothing) before the initial noise is added; other modes and other pipelines pass through."""
    if fill not in ("latent-noise", "latent-nothing") or mask_image is None or not hasattr(pipe, "prepare_latents"):
        yield
        return
    import inspect

    original = pipe.prepare_latents
    signature = inspect.signature(original)

    def prepare_latents(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        if given["is_strength_max"] or given["latents"] is not None:  # the masked area starts from noise anyway
            return original(*args, **kwargs)
        latents, noise, image_latents = original(**dict(given, return_noise=True, return_image_latents=True))
        repaint = _latent_mask(mask_image, image_latents)
        content = _noise_like(image_latents, given["generator"]) if fill == "latent-noise" else 0.0
        image_latents = image_latents * (1 - repaint) + content * repaint
        latents = pipe.scheduler.add_noise(image_latents, noise, given["timestep"])
        return (latents,) + ((noise,) if given["return_noise"] else ()) + ((image_latents,) if given["return_image_latents"] else ())

    own = vars(pipe).get("prepare_latents")  # an instance attribute set before ours, if any
    pipe.prepare_latents = prepare_latents
    try:
        yield
    finally:
        if own is None:
            del pipe.prepare_latents  # the class's method again
        else:
            pipe.prepare_latents = own


def _latent_mask(mask_image, like):
    """The mask at the latents' size, 1 = repaint: binarised at 0.5 as diffusers' mask processor does, then resized
    (nearest) as its prepare_mask_latents does."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.asarray(mask_image.convert("L"), dtype=np.float32) / 255)[None, None]
    binary = (pixels >= 0.5).to(like.dtype)
    return torch.nn.functional.interpolate(binary, size=tuple(like.shape[-2:])).to(like.device)


def _noise_like(latents, generator):
    """Unit Gaussian noise of the latents' shape, one draw per image from its own generator (a batch image equals the
    same seed run alone)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(latents.shape), generator=generator, device=latents.device, dtype=latents.dtype)
