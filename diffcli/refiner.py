"""SDXL refiner (A1111's "Refiner", diffusers' ensemble of experts): the base model denoises the first part of
the schedule and hands its latents to the refiner, which finishes the remaining steps."""

from __future__ import annotations

from diffcli.errors import UsageError

REFINER_FAMILIES = ("sdxl-refiner", "sdxl")  # a dedicated refiner, or any SDXL model used as one


def refiner_settings(model: str | None, start: float) -> dict:
    """Job.extra entries for --refiner and --refiner-start, checked without loading anything."""
    if model is None:
        return {}
    if not 0.0 < start < 1.0:
        raise UsageError(f"--refiner-start must be between 0 and 1 (exclusive), got {start:g}")
    return {"refiner": model, "refiner_start": start}


def check(job, spec):
    """The refiner's spec; a base or refiner that cannot take part is refused before any weights load."""
    from diffcli.models import resolve_model

    if job.task != "txt2img":
        raise UsageError(f"--refiner works with txt2img, not {job.task}")
    if spec.family != "sdxl":
        raise UsageError(f"--refiner needs an SDXL base model; {spec.name!r} is a {spec.family} model")
    if job.extra.get("hires_scale"):
        raise UsageError("--refiner and --hires cannot be combined yet", "run the hires pass with img2img afterwards")
    refiner = resolve_model(job.extra["refiner"], None, job.allow_pickle)
    if refiner.family not in REFINER_FAMILIES:
        raise UsageError(f"--refiner {refiner.name!r} is a {refiner.family} model, not an SDXL refiner or SDXL model")
    return refiner


def check_steps(steps: int, start: float) -> None:
    """Both models must get at least one step."""
    base_steps = int(steps * start)
    if base_steps < 1 or steps - base_steps < 1:
        raise UsageError(f"--refiner-start {start:g} with --steps {steps} leaves one of the two models no step",
                         "raise --steps or move --refiner-start toward 0.5")


def refine(job, plan, latents, generators, steps: int, on_step_end):
    """Finish the base model's latents with the refiner from --refiner-start on; returns float images (N, H, W, 3)."""
    from diffcli import prompts
    from diffcli.pipeline import load_for_job

    pipe = load_for_job(plan.helpers["refiner"], "img2img", job, plan.scheduler)
    return pipe(image=latents, denoising_start=job.extra["refiner_start"], num_inference_steps=steps,
                guidance_scale=plan.cfg, generator=generators, output_type="np", callback_on_step_end=on_step_end,
                **prompts.pipeline_inputs(pipe, [job] * len(generators))).images
