"""Refiner (A1111's "Refiner", diffusers' ensemble of expert denoisers): the base model denoises the first part of
the schedule and the refiner finishes the remaining steps.

SDXL hands latents over between two pipelines (`denoising_end` / `denoising_start`). SD 1.x/2.x pipelines have no
such arguments, so there the refiner's UNet takes over inside the base pipeline's loop, as A1111 swaps models
mid-sampling; its prediction is converted to the base scheduler's schedule and prediction type, so a zero-SNR
v-prediction base can hand over to an epsilon refiner. A refiner folder without a text encoder ("sd-refiner")
reads the base model's prompt embeddings.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from diffcli import families
from diffcli.errors import UsageError

NO_REFINER = "none"  # --refiner none: no refiner, not even the model's default one


def check_settings(second) -> None:
    """--refiner and --refiner-start (jobs.SecondPasses), checked without loading anything."""
    if second.refiner_start is not None and not 0.0 < second.refiner_start < 1.0:
        raise UsageError(f"--refiner-start must be between 0 and 1 (exclusive), got {second.refiner_start:g}")
    if second.refiner is not None and second.refiner != NO_REFINER:
        from diffcli.options import check_path

        check_path("--refiner", second.refiner)


def default_refiner(defaults: dict, folder) -> str | None:
    """The refiner a model folder's diffcli.json names: the sibling folder of that name when there is one outside
    the package (a bundle copied elsewhere), else the name as --model takes it."""
    from diffcli.models import BUNDLED_DIR

    name = defaults.get("refiner")
    sibling = Path(folder).resolve().parent / name if name else None
    return str(sibling) if sibling and sibling.is_dir() and sibling.parent != BUNDLED_DIR.resolve() else name


def apply_default(job, spec) -> None:
    """A txt2img job on a model whose diffcli.json names a refiner gets it, unless --refiner was given or --hires
    (not combined with a refiner yet) asks for a second pass; fills in --refiner-start (the model's, else 0.8) and
    refuses one without a refiner."""
    second = job.second
    if job.task == "txt2img" and second.refiner is None and not second.hires and spec.defaults.get("refiner"):
        second.refiner = default_refiner(spec.defaults, spec.location)
        if second.refiner_start is None:
            second.refiner_start = spec.defaults.get("refiner_start", 0.8)
    if active(second) is None:
        if second.refiner_start is not None:
            raise UsageError("--refiner-start needs a refiner", "name one with --refiner, or use a model that has one")
    elif second.refiner_start is None:
        second.refiner_start = 0.8


def active(second) -> str | None:
    """The refiner that runs: None for none (not asked, or --refiner none)."""
    return None if second.refiner in (None, NO_REFINER) else second.refiner


def check(job, spec):
    """The refiner's spec; a base or refiner that cannot take part is refused before any weights load."""
    from diffcli.models import resolve_model

    if job.task != "txt2img":
        raise UsageError(f"--refiner works with txt2img, not {job.task}")
    takes = families.refiners_of(spec.family)
    if not takes:
        raise UsageError(f"--refiner needs an SD 1.x, 2.x or XL base model; {spec.name!r} is a {spec.family} model")
    if job.second.hires:
        raise UsageError("--refiner and --hires cannot be combined yet", "run the hires pass with img2img afterwards")
    refiner = resolve_model(job.second.refiner, None, job.model.allow_pickle, "--refiner")
    if refiner.family not in takes or refiner.inpaint:
        kind = "an SDXL refiner or SDXL model" if spec.family == "sdxl" else "an SD 1.x/2.x text-to-image model"
        raise UsageError(f"--refiner {refiner.name!r} is a {refiner.family} model, not {kind} (the base is {spec.family})")
    return refiner


def check_steps(steps: int, start: float) -> None:
    """Both models must get at least one step."""
    base_steps = int(steps * start)
    if base_steps < 1 or steps - base_steps < 1:
        raise UsageError(f"--refiner-start {start:g} with --steps {steps} leaves one of the two models no step",
                         "raise --steps or move --refiner-start toward 0.5")


def finish_sdxl(plan, latents, generators, steps: int, on_step_end):
    """SDXL: finish the base model's latents with the refiner from --refiner-start on; returns float images."""
    from diffcli import prompts
    from diffcli.pipeline import load_for_job

    job = plan.job
    pipe = load_for_job(plan.helpers["refiner"], "img2img", job.model, plan.scheduler)
    return pipe(image=latents, denoising_start=job.second.refiner_start, num_inference_steps=steps,
                guidance_scale=plan.cfg, generator=generators, output_type="np", callback_on_step_end=on_step_end,
                **prompts.pipeline_inputs(pipe, [job.prompt] * len(generators))).images


_LOADED: dict = {}  # (sd-refiner folder, device, dtype) -> its UNet and scheduler config


def load_sd(spec, load_pipeline, device: str, dtype):
    """(UNet, scheduler config, pipeline to encode prompts or None) of an SD 1.x/2.x refiner. `load_pipeline(spec)`
    loads a whole model; an sd-refiner folder has no text encoder, so only its UNet is read."""
    if spec.family != "sd-refiner":
        pipe = load_pipeline(spec)
        return pipe.unet, dict(getattr(pipe, "diffcli_scheduler", pipe.scheduler).config), pipe  # the model's own
    key = (spec.location, device, str(dtype))
    if key not in _LOADED:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(spec.location, subfolder="unet", torch_dtype=dtype).to(device).eval()
        _LOADED[key] = unet, json.loads((Path(spec.location) / "scheduler" / "scheduler_config.json").read_text())
    return (*_LOADED[key], None)


def clean_and_noise(pred, sample, own_alpha, own_v: bool, alpha):
    """(clean latents, noise) that a prediction made at alphas_cumprod `own_alpha` (v or epsilon) implies for
    `sample`, the noise written for the schedule whose alphas_cumprod is `alpha` (Salimans & Ho 2022, v = sqrt(a) eps
    - sqrt(1-a) x0)."""
    if own_v:
        x0 = own_alpha.sqrt() * sample - (1 - own_alpha).sqrt() * pred
    else:
        x0 = (sample - (1 - own_alpha).sqrt() * pred) / own_alpha.sqrt()
    return x0, (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()


def matched_timesteps(alphas, own_alphas):
    """For each timestep of the schedule with `alphas` (alphas_cumprod), the timestep of the one with `own_alphas`
    whose noise level is nearest."""
    return (alphas[:, None] - own_alphas[None, :]).abs().argmin(dim=1)


def alphas_cumprod(config: dict):
    """A scheduler config's alphas_cumprod (zero-terminal-SNR rescaling included)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config).alphas_cumprod


def _converted_unet(unet, config: dict, base_scheduler, base_config, states):
    """A stand-in for the base UNet in the pipeline's loop: the refiner's UNet at the timestep with the nearest
    alphas_cumprod, its output rewritten in the base scheduler's prediction type; `states` replace the base's prompt
    embeddings when the refiner has its own text encoder."""
    base_alphas = alphas_cumprod(dict(base_scheduler.config)).to(unet.device)
    own_alphas = alphas_cumprod(config).to(unet.device)
    own_timestep = matched_timesteps(base_alphas, own_alphas)
    own_v, base_v = config.get("prediction_type") == "v_prediction", base_scheduler.config.prediction_type == "v_prediction"

    def forward(sample, timestep, encoder_hidden_states, **kwargs):
        t = int(round(float(timestep)))
        pred = unet(sample, own_timestep[t], encoder_hidden_states if states is None else states, **kwargs)[0]
        alpha, own = base_alphas[t].to(sample.dtype), own_alphas[own_timestep[t]].to(sample.dtype)
        x0, noise = clean_and_noise(pred, sample, own, own_v, alpha)
        return (alpha.sqrt() * noise - (1 - alpha).sqrt() * x0 if base_v else noise,)

    return _StandIn(forward, base_config)


class _StandIn:
    """Callable as the pipeline calls its UNet; `config` is the base UNet's, which the pipeline still reads."""

    def __init__(self, forward, config):
        self.forward, self.config = forward, config

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


@contextlib.contextmanager
def sd_handover(pipe, unet, config: dict, start: float, inputs: dict | None, on_step_end):
    """A callback_on_step_end for an SD 1.x/2.x pipeline call: it runs `on_step_end`, then, once the next timestep
    is below (1 - start) x num_train_timesteps (diffusers' `denoising_end` cut), makes the pipeline call the refiner's
    UNet instead of its own. `inputs` (prompt_embeds and negative_prompt_embeds from the refiner's text encoder) or
    None to share the base's. The base UNet is put back on exit."""
    import torch

    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise UsageError(f"--refiner: prediction type {config['prediction_type']!r} is not supported",
                         "SD 1.x/2.x refiners must predict epsilon or v")
    width = pipe.text_encoder.config.hidden_size
    if inputs is None and unet.config.cross_attention_dim != width:
        raise UsageError(f"--refiner: its UNet reads {unet.config.cross_attention_dim}-wide prompt embeddings and has "
                         f"no text encoder of its own; the base model's are {width} wide")
    base = pipe.unet
    cutoff = round(pipe.scheduler.config.num_train_timesteps * (1 - start))

    def callback(p, step, timestep, tensors):
        tensors = on_step_end(p, step, timestep, tensors) if on_step_end else tensors
        timesteps = p.scheduler.timesteps
        if p.unet is base and step + 1 < len(timesteps) and timesteps[step + 1] < cutoff:
            states = None
            if inputs is not None:
                states = inputs["prompt_embeds"]
                if p.do_classifier_free_guidance:  # the pipeline's own embeddings are [negative, positive] then
                    states = torch.cat([inputs["negative_prompt_embeds"], states])
            # the loop calls self.unet at every step; set it past DiffusionPipeline.__setattr__, which would also
            # rewrite the pipeline's config
            object.__setattr__(p, "unet", _converted_unet(unet, config, p.scheduler, base.config, states))
        return tensors

    try:
        yield callback
    finally:
        object.__setattr__(pipe, "unet", base)
