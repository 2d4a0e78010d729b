"""Image inputs of img2img / inpaint / outpaint / upscale / edit: checked without a model (check_inputs), then read and
fitted to the model (prepare) before any weights load."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from diffcli import families, images, masked
from diffcli.errors import UsageError
from diffcli.jobs import EditInput, ImageInput, Job, MaskInput, OutpaintInput, UpscaleInput
from diffcli.models import ModelSpec, read_json
from diffcli.options import MAX_SIDE

DEFAULT_UPSCALER = "tiny-shapes-x4"  # bundled; $DIFFCLI_UPSCALE_MODEL or --model overrides
# Inputs with a longer side above this (input pixels) are tiled unless --tile says otherwise: the VAE decode at the
# output size is the memory peak (a 512 px input is 2048 px out of the x4 upscaler).
AUTO_TILE = {"x4": 256, "latent": 512}
MAX_OVERLAP = 0.75  # of --tile: windows every quarter tile (16x the windows of no overlap), the closest to untiled
DEFAULT_NOISE_LEVEL = 20  # the SD x4 upscaler's own default, for models that recommend none


def default_overlap(tile: int) -> int:
    """Half the tile, as Tiled Diffusion's MultiDiffusion defaults (96/48): on the bundled x4 with 32 px tiles, tiled
    vs untiled fell from 0.35 (an eighth of the tile) to 0.12 of what another seed changes, at a quarter more time."""
    return tile // 2


@dataclass
class Prepared:
    """A task's inputs read and fitted to the model: what the pipeline call gets, and what happens after it."""

    size: tuple[int, int]  # the first pass's width and height
    pipeline_kwargs: dict = field(default_factory=dict)
    postprocess: Callable | None = None  # e.g. inpaint's exact paste-back
    notes: dict = field(default_factory=dict)  # "resized", "tiling": decisions the user did not spell out (also metadata)
    record: dict = field(default_factory=dict)  # resolved settings for the metadata (the tile actually used)
    crop: tuple | None = None  # --masked-only: (box, size) of the input's area the pipeline sees (control maps follow)


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


def check_inputs(job: Job) -> None:
    """The task's own settings that need no model (before any input image is read)."""
    inputs = job.inputs
    if isinstance(inputs, UpscaleInput):
        methods = families.upscale_methods()
        if inputs.method not in methods:
            raise UsageError(f"--method must be one of {', '.join(methods)}, got {inputs.method!r}")
        factor = families.upscaler(inputs.method)[1]
        if inputs.scale != factor:
            raise UsageError(f"--scale must be {factor} with --method {inputs.method}, got {inputs.scale}")
        if inputs.tile is not None and (inputs.tile < 0 or inputs.tile % 8):
            raise UsageError(f"--tile must be 0 (off) or a positive multiple of 8, got {inputs.tile}")
        if inputs.tile is not None and inputs.tile > MAX_SIDE:  # its default overlap, tile/8, sizes arrays in the run
            raise UsageError(f"--tile must be at most {MAX_SIDE} pixels, got {inputs.tile}")
        if inputs.method == "latent" and not job.model.name:
            raise UsageError("--method latent needs --model (an SD x2 latent upscaler, e.g. stabilityai/sd-x2-latent-upscaler)")
        return
    if isinstance(inputs, EditInput):  # no strength: the input conditions the model, it is not noised
        return
    check_strength(inputs.strength, None)  # x steps: at plan time, once the model's default steps are known
    if isinstance(inputs, MaskInput):
        masked.check(inputs.fill)
        if inputs.mask_blur < 0 or inputs.padding < 0:
            raise UsageError(f"--mask-blur and --padding must be >= 0, got {inputs.mask_blur} and {inputs.padding}")
        for flag, value in (("--mask-blur", inputs.mask_blur), ("--padding", inputs.padding)):
            if value > MAX_SIDE:
                raise UsageError(f"{flag} must be at most {MAX_SIDE} pixels, got {value}")
        if bool(inputs.mask) == inputs.mask_from_alpha:
            raise UsageError("give exactly one of --mask FILE or --mask-from-alpha")
    elif isinstance(inputs, OutpaintInput):
        masked.check(inputs.fill)
        if not 0 <= inputs.feather <= MAX_SIDE:
            raise UsageError(f"--feather must be between 0 and {MAX_SIDE} pixels, got {inputs.feather}")
        parse_extend(inputs.extend)


def model_name(job: Job) -> str | None:
    """The --model a task runs: upscale --method x4 defaults to $DIFFCLI_UPSCALE_MODEL, else the bundled upscaler."""
    if isinstance(job.inputs, UpscaleInput) and job.inputs.method == "x4":
        return job.model.name or os.environ.get("DIFFCLI_UPSCALE_MODEL") or DEFAULT_UPSCALER
    return job.model.name


def prepare(job: Job, spec: ModelSpec) -> Prepared:
    """Read the task's input images and fit them to the model (no weights)."""
    inputs = job.inputs
    if isinstance(inputs, ImageInput):
        return _img2img(job, spec, inputs)
    if isinstance(inputs, MaskInput):
        return _inpaint(job, spec, inputs)
    if isinstance(inputs, OutpaintInput):
        return _outpaint(job, spec, inputs)
    if isinstance(inputs, EditInput):
        return _edit(job, spec, inputs)
    return _upscale(job, spec, inputs)


def _edit(job: Job, spec: ModelSpec, inputs: EditInput) -> Prepared:
    """IMAGE kept at its size (rounded to the model's multiple) or fitted to --width/--height, then the --image
    references of models that read several; Kontext keeps that size (max_area its area, no resize of the input)."""
    family = families.get(spec.family)
    if inputs.image and not family.edit_references:
        count = len(inputs.image)
        raise UsageError(f"--image: {spec.name!r} ({spec.family}) edits one image, got {count} reference"
                         f"{'s' if count > 1 else ''}", "drop --image, or use a Qwen-Image-Edit Plus (2509 or later) or FLUX.2 model")
    image = images.load_image(inputs.input)
    fitted = images.fit_to_multiple(image, job.sampling.width, job.sampling.height, spec.size_multiple, inputs.resize)
    references = [images.load_image(path, "--image") for path in inputs.image]
    style = families.call_style(family.pipelines["edit"])
    if style.reference:
        for flag, each in [("INPUT", fitted)] + [("--image", reference) for reference in references]:
            _check_reference(flag, each, spec)
    kwargs: dict = {"image": [fitted, *references] if references else fitted}
    if style.max_area:
        kwargs.update(max_area=fitted.size[0] * fitted.size[1], _auto_resize=False)
    return Prepared(fitted.size, kwargs, notes=_resized(image.size, fitted.size))


def _img2img(job: Job, spec: ModelSpec, inputs: ImageInput) -> Prepared:
    """The input kept at its size (rounded to the model's multiple) or resized to --width/--height."""
    image = images.load_image(inputs.input)
    fitted = images.fit_to_multiple(image, job.sampling.width, job.sampling.height, spec.size_multiple, inputs.resize)
    if families.call_style(families.of(spec).pipelines.get("img2img", "")).reference:  # FLUX.2
        if inputs.strength != ImageInput.strength:
            raise UsageError(f"--strength: {spec.name!r} ({spec.family}) takes INPUT as a reference image, which it "
                             f"does not noise, so no strength, got {inputs.strength:g}",
                             "leave --strength out (the prompt says what to keep or change)")
        _check_reference("INPUT", fitted, spec)
        return Prepared(fitted.size, {"image": fitted}, notes=_resized(image.size, fitted.size))
    return Prepared(fitted.size, {"image": fitted, "strength": inputs.strength}, notes=_resized(image.size, fitted.size))


# FLUX.2's image processor refuses reference images smaller than this on a side, or longer than this to one
# (diffusers' Flux2ImageProcessor.check_image_input): said here, before any weights load.
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8


def _check_reference(flag: str, image, spec: ModelSpec) -> None:
    """A reference image a FLUX.2 pipeline takes: at least 64 px a side, at most 8:1."""
    width, height = image.size
    if min(width, height) < REFERENCE_MIN_SIDE or max(width, height) > REFERENCE_MAX_ASPECT * min(width, height):
        raise UsageError(f"{flag}: {spec.family} pipelines take reference images of at least {REFERENCE_MIN_SIDE} px a "
                         f"side and at most {REFERENCE_MAX_ASPECT}:1, got {width}x{height}",
                         "use a larger image (or larger --width/--height)")


def _inpaint(job: Job, spec: ModelSpec, inputs: MaskInput) -> Prepared:
    """Repaint the white part of the mask; everything outside the blurred mask stays identical to the input."""
    if inputs.mask_from_alpha:  # transparent pixels filled from the opaque ones around them, not composited on white
        image, mask = images.alpha_input(inputs.input, inputs.invert_mask)
    else:
        image = images.load_image(inputs.input)
        mask = images.load_mask(inputs.mask, image.size, inputs.resize_mask, inputs.invert_mask)
    return _inpaint_area(job, spec, image, mask, inputs.mask_blur, inputs.masked_only, inputs.padding, inputs.strength,
                         inputs.fill)


def _inpaint_area(job: Job, spec: ModelSpec, image, mask, blur: int, masked_only: bool, padding: int, strength: float,
                  fill: str, notes: dict | None = None) -> Prepared:
    """The pipeline inputs and the paste-back that keeps unmasked pixels exact."""
    if mask.getbbox() is None:
        raise UsageError("the mask is empty: nothing to repaint", "white marks the area to repaint (--invert-mask flips it)")
    width = job.sampling.width
    if width and not masked_only:
        raise UsageError(f"--width {width} sets the crop size of --masked-only; inpaint otherwise keeps the input's size",
                         "drop --width, or add --masked-only")
    soft = images.blur_mask(mask, blur)
    region = image
    box = (0, 0) + image.size
    if masked_only:
        left, top, right, bottom = mask.getbbox()
        box = (max(0, left - padding), max(0, top - padding), min(image.size[0], right + padding), min(image.size[1], bottom + padding))
        region = image.crop(box)
    native = width or spec.sample_size or 512
    scale = native / max(region.size) if masked_only else 1.0
    target = images.fit_to_multiple(region, round(region.size[0] * scale), round(region.size[1] * scale), spec.size_multiple, "stretch").size
    if notes is None:
        notes = {} if masked_only else _resized(image.size, target)

    def paste_back(generated):
        canvas = image.copy()
        canvas.paste(generated.resize((box[2] - box[0], box[3] - box[1])), box[:2])
        return images.composite(image, canvas, soft)

    start = masked.prefill(region, soft.crop(box), fill)  # what the masked area starts from (--fill)
    kwargs = {"image": start.resize(target), "mask_image": soft.crop(box).resize(target), "strength": strength}
    return Prepared(target, kwargs, paste_back, notes, crop=(box, image.size) if masked_only else None)


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


def _outpaint(job: Job, spec: ModelSpec, inputs: OutpaintInput) -> Prepared:
    """Pad the canvas (edge pixels stretched outward), mask the new area with a feathered seam, inpaint it starting
    from --fill (default: the colours around it; `original` keeps the stretched edges)."""
    import numpy as np
    from PIL import Image

    sides, feather, multiple = parse_extend(inputs.extend), inputs.feather, spec.size_multiple
    image = images.load_image(inputs.input)
    width, height = image.size[0] + sides["left"] + sides["right"], image.size[1] + sides["top"] + sides["bottom"]
    rounded = (width + -width % multiple, height + -height % multiple)
    if max(rounded) > MAX_SIDE:  # before the canvas is allocated
        raise UsageError(f"--extend {inputs.extend!r} makes a {rounded[0]}x{rounded[1]} canvas from the {image.size[0]}x"
                         f"{image.size[1]} input, over the {MAX_SIDE} px size limit", "extend less, or downscale the input first")
    sides["right"] += -width % multiple  # round the canvas up to the model's multiple
    sides["bottom"] += -height % multiple
    notes = {}
    if rounded != (width, height):
        notes["resized"] = (f"canvas {width}x{height} rounded up to {rounded[0]}x{rounded[1]} (a multiple of {multiple}) "
                            "on the right and bottom")
    pad = ((sides["top"], sides["bottom"]), (sides["left"], sides["right"]), (0, 0))
    canvas = Image.fromarray(np.pad(np.asarray(image), pad, mode="edge"))
    # The seam: a linear ramp from the new area `feather` pixels into the original; pixels further in are kept exactly.
    ys, xs = np.mgrid[0:image.size[1], 0:image.size[0]]
    edges = {"left": xs, "right": image.size[0] - 1 - xs, "top": ys, "bottom": image.size[1] - 1 - ys}
    depth = np.min([edges[side] for side in edges if sides[side]], axis=0)  # distance from the nearest new edge
    seam = np.clip((feather - depth) / (feather + 1), 0, 1)
    mask = Image.fromarray(np.pad((seam * 255).round().astype(np.uint8), pad[:2], constant_values=255))
    return _inpaint_area(job, spec, canvas, mask, 0, False, 0, inputs.strength, inputs.fill, notes)


def max_noise_level(spec: ModelSpec) -> int:
    """The upscaler's max_noise_level (model_index.json), 350 as the SD x4 upscaler when unknown."""
    index = Path(spec.config_dir or spec.location) / "model_index.json"
    return int(read_json(index).get("max_noise_level", 350)) if index.is_file() else 350


def _upscale(job: Job, spec: ModelSpec, inputs: UpscaleInput) -> Prepared:
    """x4 (SD x4 upscaler layout, --noise-level) or x2 latent upscaling, optionally in overlapping tiles."""
    method, scale = inputs.method, inputs.scale
    family = families.upscaler(method)[0]
    if spec.family != family:
        raise UsageError(f"--model {spec.name!r} is a {spec.family} model, not an {method} upscaler",
                         f"use {DEFAULT_UPSCALER} or an SD x4 upscaler" if method == "x4" else "use an SD x2 latent upscaler")
    top = max_noise_level(spec)
    noise = spec.defaults.get("noise_level", DEFAULT_NOISE_LEVEL) if inputs.noise_level is None else inputs.noise_level
    if method == "x4" and not 0 <= noise <= top:
        raise UsageError(f"--noise-level must be between 0 and {top} for this model, got {noise}")
    image = images.load_image(inputs.input)
    fitted = images.fit_to_multiple(image, None, None, 8, "stretch")
    notes = _resized(image.size, fitted.size)
    tile = inputs.tile
    if tile is None:  # automatic: whole image when small, bounded tiles when large
        tile = AUTO_TILE[method] if max(fitted.size) > AUTO_TILE[method] else 0
        if tile:
            notes["tiling"] = (f"input {fitted.size[0]}x{fitted.size[1]} is larger than {tile} px: upscaling in {tile} px "
                               "tiles (--tile 0 turns tiling off)")
    overlap = default_overlap(tile) if inputs.tile_overlap is None else inputs.tile_overlap
    if tile and not 0 <= overlap <= MAX_OVERLAP * tile:
        raise UsageError(f"--tile-overlap must be between 0 and three quarters of the tile ({int(MAX_OVERLAP * tile)}), "
                         f"got {overlap}")
    size = fitted.size[0] * scale, fitted.size[1] * scale
    if max(size) > MAX_SIDE:
        raise UsageError(f"INPUT {inputs.input} is {fitted.size[0]}x{fitted.size[1]}: x{scale} would be {size[0]}x{size[1]}, "
                         f"over the {MAX_SIDE} px limit", "downscale the input first")
    kwargs = {"image": fitted, "noise_level": noise} if method == "x4" else {"image": fitted}
    stats = {"tile_stats": max(tile, AUTO_TILE[method])} if tile else {}  # the statistics pass's tile (tiles.lockstep)
    record = {"tile": tile, "tile_overlap": overlap, **stats, **({"noise_level": noise} if method == "x4" else {})}
    return Prepared(size, kwargs, notes=notes, record=record)


def _resized(before: tuple[int, int], after: tuple[int, int]) -> dict:
    """The note that the input size changed (reported, and kept in the metadata)."""
    return {"resized": f"input resized from {before[0]}x{before[1]} to {after[0]}x{after[1]}"} if before != after else {}
