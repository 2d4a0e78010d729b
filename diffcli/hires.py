"""Hires fix (A1111's enable_hr): generate, upscale (latents or pixels), refine with img2img on the same components."""

from __future__ import annotations

import os

from diffcli.errors import UsageError

HIRES_UPSCALERS = ("latent", "lanczos", "x4")  # x4: an SD x4 upscaler model, then Lanczos down to the target size
DEFAULT_STRENGTH = 0.7  # A1111's default denoising strength for the hires pass, for models that recommend none


def check_settings(second) -> None:
    """Check --hires and its companions (jobs.SecondPasses); --hires-upscaler x4 without a model gets the default one."""
    scale, steps, strength, upscaler, model = (second.hires, second.hires_steps, second.hires_strength,
                                               second.hires_upscaler, second.hires_upscaler_model)
    if scale is None:
        if steps is not None:
            raise UsageError("--hires-steps needs --hires SCALE")
        if model is not None:
            raise UsageError("--hires-upscaler-model needs --hires SCALE --hires-upscaler x4")
        return
    if not 1.0 < scale <= 4.0:
        raise UsageError(f"--hires must be between 1 (exclusive) and 4, got {scale:g}")
    if steps is not None and not 1 <= steps <= 1000:  # as --steps
        raise UsageError(f"--hires-steps must be between 1 and 1000, got {steps}")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise UsageError(f"--hires-strength must be between 0 (exclusive) and 1, got {strength:g}")
    if upscaler not in HIRES_UPSCALERS:
        raise UsageError(f"--hires-upscaler must be one of {', '.join(HIRES_UPSCALERS)}, got {upscaler!r}")
    if steps is not None and strength is not None and int(steps * strength) < 1:
        raise UsageError(f"--hires-strength {strength:g} x --hires-steps {steps} is less than one denoising step")
    if upscaler == "x4":
        from diffcli.options import check_path
        from diffcli.tasks import DEFAULT_UPSCALER

        if model is not None:
            check_path("--hires-upscaler-model", model)
        second.hires_upscaler_model = model or os.environ.get("DIFFCLI_UPSCALE_MODEL") or DEFAULT_UPSCALER
    elif model is not None:
        raise UsageError(f"--hires-upscaler-model needs --hires-upscaler x4, not {upscaler}")


def apply_default(job, spec) -> None:
    """--hires without --hires-strength takes the model's recommendation (diffcli.json `hires_strength`, else
    DEFAULT_STRENGTH) and then, without --hires-steps, its `hires_steps` too; the pair must make a denoising step."""
    second = job.second
    if not second.hires or second.hires_strength is not None:
        return
    second.hires_strength = spec.defaults.get("hires_strength", DEFAULT_STRENGTH)
    if second.hires_steps is None and spec.defaults.get("hires_steps"):
        second.hires_steps = spec.defaults["hires_steps"]
    steps = second.hires_steps or job.sampling.steps or spec.defaults.get("steps")
    if steps and int(steps * second.hires_strength) < 1:
        raise UsageError(f"{spec.name}'s hires strength {second.hires_strength:g} x {steps} steps is less than one "
                         "denoising step", "raise --hires-steps, or give --hires-strength")


def check_upscaler(job):
    """The x4 upscaler model's spec; it must exist and be one (checked before any weights load)."""
    from diffcli.models import resolve_model

    spec = resolve_model(job.second.hires_upscaler_model, None, job.model.allow_pickle, "--hires-upscaler-model")
    if spec.family != "sd-x4-upscaler":
        raise UsageError(f"--hires-upscaler-model {spec.name!r} is a {spec.family} model, not an SD x4 upscaler")
    return spec


def check_target(width: int, height: int, scale: float, multiple: int) -> None:
    """The second pass's size stays within options.MAX_SIDE (checked when the first pass's size is known)."""
    from diffcli.options import MAX_SIDE

    target = target_size(width, height, scale, multiple)
    if max(target) > MAX_SIDE:
        raise UsageError(f"--hires {scale:g} makes {target[0]}x{target[1]} from {width}x{height}, over the {MAX_SIDE} px "
                         "size limit", "lower --hires, or --width/--height")


def target_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """The second pass's size: the first pass's times `scale`, rounded down to the model's multiple."""
    return int(width * scale) // multiple * multiple, int(height * scale) // multiple * multiple


def second_pass(pipe, plan, seeds: list[int], steps: int, latents, images):
    """Upscale the first pass and run img2img over it at the larger size; returns float images (N, H, W, 3)."""
    import torch
    from PIL import Image

    from diffcli import prompts
    from diffcli.images import to_pil
    from diffcli.pipeline import load_for_job

    job = plan.job
    second = job.second
    width, height = target_size(plan.width, plan.height, second.hires, plan.spec.size_multiple)
    img2img = load_for_job(plan.spec, "img2img", job.model, plan.scheduler, job.model.safety_checker, plan.vae)  # the run's components
    if second.hires_upscaler == "latent":
        factor = plan.spec.size_multiple
        image = torch.nn.functional.interpolate(latents, size=(height // factor, width // factor), mode="bilinear")
    elif second.hires_upscaler == "x4":
        upscaled = _x4(job, plan.helpers["hires_upscaler"], images, seeds)
        image = [each.resize((width, height), Image.LANCZOS) for each in upscaled]
    else:
        image = [to_pil(array).resize((width, height), Image.LANCZOS) for array in images]
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return img2img(image=image, strength=second.hires_strength, num_inference_steps=second.hires_steps or steps,
                   guidance_scale=plan.cfg, generator=generators, output_type="np",
                   **prompts.pipeline_inputs(img2img, [job.prompt] * len(seeds))).images


def _x4(job, spec, images, seeds: list[int]) -> list:
    """Upscale each first-pass image x4 with the SD x4 upscaler `spec` at its own defaults, in tiles when large."""
    import torch

    from diffcli import prompts, tiles
    from diffcli.images import to_pil
    from diffcli.pipeline import default_steps, load_for_job
    from diffcli.tasks import AUTO_TILE, DEFAULT_NOISE_LEVEL, default_overlap

    defaults = spec.defaults
    pipe = load_for_job(spec, "upscale", job.model, defaults.get("scheduler"))
    settings = dict(num_inference_steps=defaults.get("steps") or default_steps(pipe.scheduler),
                    guidance_scale=defaults.get("cfg", 7.5), noise_level=defaults.get("noise_level", DEFAULT_NOISE_LEVEL),
                    output_type="np", **prompts.pipeline_inputs(pipe, [job.prompt]))

    def call(extra: dict, generator):
        return pipe(generator=[generator], **settings, **extra).images[0]

    upscaled = []
    for array, seed in zip(images, seeds):
        low = to_pil(array)
        tile = AUTO_TILE["x4"]
        if max(low.size) > tile:
            result = tiles.upscale_with_tiles(pipe, low, seed, tile, default_overlap(tile), 4, call)
        else:
            result = call({"image": low}, torch.Generator("cpu").manual_seed(seed))
        upscaled.append(to_pil(result))
    return upscaled
