"""Turn img2img / inpaint / outpaint / upscale inputs into Jobs: images read and checked before any weights load."""

from __future__ import annotations

import os
import re
from pathlib import Path

from diffcli import images, masked
from diffcli.errors import UsageError
from diffcli.models import ModelSpec, read_json, resolve_model
from diffcli.options import MAX_SIDE, Job, validate

DEFAULT_UPSCALER = "tiny-shapes-x4"  # bundled; $DIFFCLI_UPSCALE_MODEL or --model overrides


def check_strength(strength: float, steps: int | None, default: bool = False) -> None:
    """Strength in [0, 1], and at least one denoising step once multiplied by --steps (or, `default`, the steps the
    model and scheduler take without it)."""
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"--strength must be between 0 and 1, got {strength:g}")
    if steps is not None and int(steps * strength) < 1:
        if not strength:
            hint = "--strength 0 would return the input unchanged"
        elif strength * 1000 < 1:  # more steps than --steps allows
            hint = f"raise --strength to at least {1 / 1000:g} (--steps is at most 1000)"
        else:
            hint = f"raise --strength or --steps (at least {int(1 / strength) + 1} steps)"
        if default:
            hint += f"; {steps} is the default --steps of this model and scheduler"
        raise UsageError(f"--strength {strength:g} x --steps {steps} is less than one denoising step", hint)


def _spec(job: Job) -> ModelSpec:
    """Check the job's own settings (so a bad --width fails before the input is resized), then resolve the model."""
    validate(job)
    return resolve_model(job.model, job.model_config, job.allow_pickle)


def img2img(job: Job, input_path: str, strength: float, resize: str) -> Job:
    """Image-to-image: the input is kept at its size (rounded to the model's multiple) or resized to --width/--height."""
    check_strength(strength, job.steps)
    spec = _spec(job)
    image = images.load_image(input_path)
    fitted = images.fit_to_multiple(image, job.width, job.height, spec.size_multiple, resize)
    _note_resize(job, image.size, fitted.size)
    job.width, job.height = fitted.size
    job.extra.update(input=input_path, strength=strength, pipeline_kwargs={"image": fitted, "strength": strength})
    return job


def inpaint(job: Job, input_path: str, mask_path: str | None, mask_blur: int, invert: bool, from_alpha: bool,
            masked_only: bool, padding: int, strength: float, resize_mask: bool, fill: str = "original") -> Job:
    """Repaint the white part of the mask; everything outside the blurred mask stays identical to the input."""
    check_strength(strength, job.steps)
    masked.check(fill)
    if mask_blur < 0 or padding < 0:
        raise UsageError(f"--mask-blur and --padding must be >= 0, got {mask_blur} and {padding}")
    for flag, value in (("--mask-blur", mask_blur), ("--padding", padding)):
        if value > MAX_SIDE:
            raise UsageError(f"{flag} must be at most {MAX_SIDE} pixels, got {value}")
    if bool(mask_path) == from_alpha:
        raise UsageError("give exactly one of --mask FILE or --mask-from-alpha")
    spec = _spec(job)
    if from_alpha:  # transparent pixels filled from the opaque ones around them, not composited on white
        image, mask = images.alpha_input(input_path, invert)
    else:
        image = images.load_image(input_path)
        mask = images.load_mask(mask_path, image.size, resize_mask, invert)
    job.extra.update(input=input_path, mask=mask_path or "alpha", mask_blur=mask_blur, invert_mask=invert,
                     masked_only=masked_only, padding=padding, strength=strength)
    return _inpaint_area(job, spec, image, mask, mask_blur, masked_only, padding, strength, fill)


def _inpaint_area(job: Job, spec: ModelSpec, image, mask, blur: int, masked_only: bool, padding: int, strength: float,
                  fill: str) -> Job:
    """Set up the pipeline inputs and the paste-back that keeps unmasked pixels exact."""
    if mask.getbbox() is None:
        raise UsageError("the mask is empty: nothing to repaint", "white marks the area to repaint (--invert-mask flips it)")
    if job.width and not masked_only:
        raise UsageError(f"--width {job.width} sets the crop size of --masked-only; inpaint otherwise keeps the input's size",
                         "drop --width, or add --masked-only")
    soft = images.blur_mask(mask, blur)
    region = image
    box = (0, 0) + image.size
    if masked_only:
        left, top, right, bottom = mask.getbbox()
        box = (max(0, left - padding), max(0, top - padding), min(image.size[0], right + padding), min(image.size[1], bottom + padding))
        region = image.crop(box)
    native = job.width or spec.sample_size or 512
    side = max(region.size)
    scale = native / side if masked_only else 1.0
    target = images.fit_to_multiple(region, round(region.size[0] * scale), round(region.size[1] * scale), spec.size_multiple, "stretch").size
    if not masked_only:
        _note_resize(job, image.size, target)
    job.width, job.height = target

    def paste_back(generated):
        canvas = image.copy()
        canvas.paste(generated.resize((box[2] - box[0], box[3] - box[1])), box[:2])
        return images.composite(image, canvas, soft)

    start = masked.prefill(region, soft.crop(box), fill)  # what the masked area starts from (--fill)
    job.extra.update(
        fill=fill, postprocess=paste_back,
        pipeline_kwargs={"image": start.resize(target), "mask_image": soft.crop(box).resize(target), "strength": strength},
    )
    return job


def parse_extend(text: str) -> dict[str, int]:
    """'left=128,right=128,top=0,bottom=64' or 'all=64' -> pixels per side."""
    sides = dict.fromkeys(("left", "right", "top", "bottom"), 0)
    for part in filter(None, text.replace(" ", "").split(",")):
        match = re.fullmatch(r"(left|right|top|bottom|all)=(\d+)", part)
        if not match:
            raise UsageError(f"--extend {text!r}: expected side=pixels with side left, right, top, bottom or all, got {part!r}")
        side, digits = match.groups()
        if len(digits) > len(str(MAX_SIDE)) or int(digits) > MAX_SIDE:  # before int() of thousands of digits
            raise UsageError(f"--extend {text!r}: {side}={digits[:12]}{'...' if len(digits) > 12 else ''} is over the "
                             f"{MAX_SIDE} px size limit")
        pixels = int(digits)
        for name in sides if side == "all" else [side]:
            sides[name] = pixels
    if not any(sides.values()):
        raise UsageError(f"--extend {text!r} adds nothing", "e.g. --extend left=128 or --extend all=64")
    return sides


def outpaint(job: Job, input_path: str, extend: str, feather: int, strength: float, fill: str = "fill") -> Job:
    """Pad the canvas (edge pixels stretched outward), mask the new area with a feathered seam, inpaint it starting
    from `fill` (default: the colours around it; `original` keeps the stretched edges)."""
    import numpy as np
    from PIL import Image

    check_strength(strength, job.steps)
    masked.check(fill)
    if not 0 <= feather <= MAX_SIDE:
        raise UsageError(f"--feather must be between 0 and {MAX_SIDE} pixels, got {feather}")
    sides = parse_extend(extend)
    spec = _spec(job)
    image = images.load_image(input_path)
    width, height = image.size[0] + sides["left"] + sides["right"], image.size[1] + sides["top"] + sides["bottom"]
    rounded = (width + -width % spec.size_multiple, height + -height % spec.size_multiple)
    if max(rounded) > MAX_SIDE:  # before the canvas is allocated
        raise UsageError(f"--extend {extend!r} makes a {rounded[0]}x{rounded[1]} canvas from the {image.size[0]}x"
                         f"{image.size[1]} input, over the {MAX_SIDE} px size limit", "extend less, or downscale the input first")
    sides["right"] += -width % spec.size_multiple  # round the canvas up to the model's multiple
    sides["bottom"] += -height % spec.size_multiple
    if -width % spec.size_multiple or -height % spec.size_multiple:
        job.extra["resized"] = (f"canvas {width}x{height} rounded up to {width + -width % spec.size_multiple}x"
                                f"{height + -height % spec.size_multiple} (a multiple of {spec.size_multiple}) on the right and bottom")
    pad = ((sides["top"], sides["bottom"]), (sides["left"], sides["right"]), (0, 0))
    canvas = Image.fromarray(np.pad(np.asarray(image), pad, mode="edge"))
    # The seam: a linear ramp from the new area `feather` pixels into the original; pixels further in are kept exactly.
    ys, xs = np.mgrid[0:image.size[1], 0:image.size[0]]
    edges = {"left": xs, "right": image.size[0] - 1 - xs, "top": ys, "bottom": image.size[1] - 1 - ys}
    depth = np.min([edges[side] for side in edges if sides[side]], axis=0)  # distance from the nearest new edge
    seam = np.clip((feather - depth) / (feather + 1), 0, 1)
    mask = Image.fromarray(np.pad((seam * 255).round().astype(np.uint8), pad[:2], constant_values=255))
    job.extra.update(input=input_path, outpaint=extend, feather=feather, strength=strength)
    return _inpaint_area(job, spec, canvas, mask, 0, False, 0, strength, fill)


UPSCALERS = {"x4": ("sd-x4-upscaler", 4), "latent": ("sd-latent-upscaler", 2)}  # --method -> (family, scale)
# Inputs with a longer side above this (input pixels) are tiled unless --tile says otherwise: the VAE decode at the
# output size is the memory peak (a 512 px input is 2048 px out of the x4 upscaler).
AUTO_TILE = {"x4": 256, "latent": 512}


def max_noise_level(spec: ModelSpec) -> int:
    """The upscaler's max_noise_level (model_index.json), 350 as the SD x4 upscaler when unknown."""
    index = Path(spec.config_dir or spec.location) / "model_index.json"
    return int(read_json(index).get("max_noise_level", 350)) if index.is_file() else 350


def upscale(job: Job, input_path: str, scale: int, method: str, noise_level: int, tile: int | None,
            tile_overlap: int | None) -> Job:
    """x4 (SD x4 upscaler layout, --noise-level) or x2 latent upscaling, optionally in overlapping tiles."""
    if method not in UPSCALERS:
        raise UsageError(f"--method must be one of {', '.join(UPSCALERS)}, got {method!r}")
    family, factor = UPSCALERS[method]
    if scale != factor:
        raise UsageError(f"--scale must be {factor} with --method {method}, got {scale}")
    if method == "x4":
        job.model = job.model or os.environ.get("DIFFCLI_UPSCALE_MODEL") or DEFAULT_UPSCALER
    elif not job.model:
        raise UsageError("--method latent needs --model (an SD x2 latent upscaler, e.g. stabilityai/sd-x2-latent-upscaler)")
    spec = _spec(job)
    if spec.family != family:
        raise UsageError(f"--model {spec.name!r} is a {spec.family} model, not an {method} upscaler",
                         f"use {DEFAULT_UPSCALER} or an SD x4 upscaler" if method == "x4" else "use an SD x2 latent upscaler")
    top = max_noise_level(spec)
    if method == "x4" and not 0 <= noise_level <= top:
        raise UsageError(f"--noise-level must be between 0 and {top} for this model, got {noise_level}")
    if tile is not None and (tile < 0 or tile % 8):
        raise UsageError(f"--tile must be 0 (off) or a positive multiple of 8, got {tile}")
    if tile is not None and tile > MAX_SIDE:  # its default overlap, tile/8, sizes arrays in run_plan
        raise UsageError(f"--tile must be at most {MAX_SIDE} pixels, got {tile}")
    image = images.load_image(input_path)
    fitted = images.fit_to_multiple(image, None, None, 8, "stretch")
    _note_resize(job, image.size, fitted.size)
    if tile is None:  # automatic: whole image when small, bounded tiles when large
        tile = AUTO_TILE[method] if max(fitted.size) > AUTO_TILE[method] else 0
        if tile:
            job.extra["tiling"] = (f"input {fitted.size[0]}x{fitted.size[1]} is larger than {tile} px: upscaling in "
                                   f"{tile} px tiles (--tile 0 turns tiling off)")
    tile_overlap = tile // 8 if tile_overlap is None else tile_overlap
    if tile and not 0 <= tile_overlap < tile // 2:
        raise UsageError(f"--tile-overlap must be between 0 and half the tile ({tile // 2}), got {tile_overlap}")
    job.width, job.height = fitted.size[0] * scale, fitted.size[1] * scale
    if max(job.width, job.height) > MAX_SIDE:
        raise UsageError(f"INPUT {input_path} is {fitted.size[0]}x{fitted.size[1]}: x{scale} would be {job.width}x{job.height}, "
                         f"over the {MAX_SIDE} px limit", "downscale the input first")
    pipeline_kwargs = {"image": fitted, "noise_level": noise_level} if method == "x4" else {"image": fitted}
    job.extra.update(input=input_path, scale=scale, method=method, tile=tile, tile_overlap=tile_overlap,
                     pipeline_kwargs=pipeline_kwargs, **({"noise_level": noise_level} if method == "x4" else {}))
    return job


def _note_resize(job: Job, before: tuple[int, int], after: tuple[int, int]) -> None:
    """Record (and later report) that the input size changed."""
    if before != after:
        job.extra["resized"] = f"input resized from {before[0]}x{before[1]} to {after[0]}x{after[1]}"
