"""Running a job: plan it (no weights), load the pipeline, seed, call, check numerics, save."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from diffcli import __version__, adapters, hires, identity, limits, masked, output, refiner, speed
from diffcli.errors import RuntimeFailure, UsageError
from diffcli.models import ModelSpec, resolve_model
from diffcli.options import RANDOM_SEED, Job, check_size_multiple, draw_seed, validate
from diffcli.pipeline import CLASS_LABELS, SCHEDULERS, normalize_scheduler_name


TASKS_SIZED_BY_IMAGE = ("img2img", "upscale")  # their pipelines take the size from the input image


@dataclass(frozen=True)
class CallStyle:
    """How a diffusers pipeline class takes the per-call inputs run_plan passes (the upscalers differ)."""

    prompt_embeds: bool = True  # our (weighted) embeddings; False: plain strings, the pipeline encodes them itself
    repeat_image: bool = False  # one input image per generator: the pipeline does not repeat it for a prompt batch
    step_end_callback: bool = True  # callback_on_step_end; False: the older per-step `callback(i, t, latents)`


CALL_STYLES = {  # by pipeline class name; others get CallStyle()
    "StableDiffusionUpscalePipeline": CallStyle(repeat_image=True, step_end_callback=False),
    # its text encoding (last hidden states + pooled) is its own, so it gets the prompt strings
    "StableDiffusionLatentUpscalePipeline": CallStyle(prompt_embeds=False, repeat_image=True, step_end_callback=False),
    # its VAE encodes one input image with the first generator only: repeated, image i is encoded with generator i, so a
    # batch image equals the same seed run alone
    "StableDiffusionInpaintPipeline": CallStyle(repeat_image=True),
    "StableDiffusionXLInpaintPipeline": CallStyle(repeat_image=True),
}


@dataclass
class Plan:
    """A job with every default resolved and every output path decided, before any weights load."""

    job: Job
    spec: ModelSpec
    seeds: list[int]
    paths: list[Path]
    width: int
    height: int
    cfg: float
    scheduler: str | None  # table name, or None for the model's own scheduler
    warnings: list[str] = field(default_factory=list)
    helpers: dict[str, ModelSpec] = field(default_factory=dict)  # second-pass models: "refiner", "hires_upscaler"
    name_template: str = ""  # output.name_template of --out, and the fields the paths were made with: with {index},
    name_fields: dict = field(default_factory=dict)  # a name another run took meanwhile moves to the next free number
    identity: str = ""  # identity.settings_digest: with a seed, the id of each image (manifest, PNG metadata)
    vae: object = None  # vae.VaeSpec of --vae, resolved and checked; None: the model's own VAE


def plan_job(job: Job, index_offset: int = 0) -> Plan:
    """Validate a job and resolve model, size, seeds and output paths; loads no weights."""
    if job.seed == RANDOM_SEED:  # --seed -1 not drawn by the command: random here, then reported as any drawn seed
        job.seed = draw_seed()
    validate(job)
    adapters.resolve(job)  # LoRA and embedding files checked now, loaded in run_plan
    if job.scheduler is not None:
        job.scheduler = normalize_scheduler_name(job.scheduler)
    spec = resolve_model(job.model, job.model_config, job.allow_pickle)
    helpers = {}  # resolved once here, loaded by the second pass
    refiner.apply_default(job, spec)
    hires.apply_default(job, spec)  # --hires without --hires-strength: the model's recommendation
    if job.extra.get("refiner"):
        helpers["refiner"] = refiner.check(job, spec)
    if job.extra.get("hires_upscaler") == "x4":
        helpers["hires_upscaler"] = hires.check_upscaler(job)
    vae = None
    if job.extra.get("vae"):  # found, format and trust checked, latent channels the model's
        from diffcli import vae as vaes

        vae = vaes.resolve(job.extra["vae"], spec, job.allow_pickle)
    defaults = spec.defaults
    width = job.width or defaults.get("width") or spec.sample_size or 512
    height = job.height or defaults.get("height") or spec.sample_size or 512
    check_size_multiple(width, height, spec.size_multiple)
    if job.extra.get("hires_scale"):  # the second pass's size too, before any weights load
        hires.check_target(width, height, job.extra["hires_scale"], spec.size_multiple)
    warnings = limits.check(spec, job, width, height)  # what the model was not trained for (its diffcli.json)
    if job.seed is None:
        job.seed = draw_seed()
    seeds = [job.seed + i for i in range(job.num_images)]
    cfg = job.cfg if job.cfg is not None else defaults.get("cfg", 7.5)
    scheduler = job.scheduler or defaults.get("scheduler")
    if "strength" in job.extra:  # against the steps run_plan will take, --steps or not
        from diffcli.tasks import check_strength

        check_strength(job.extra["strength"], job.steps or default_steps_of(spec, scheduler), default=not job.steps)
    fields = {
        "slug": output.slugify(job.prompt),
        "prompt": job.prompt[:80],
        "model": output.slugify(Path(spec.name).stem, 30),
        "steps": job.steps or defaults.get("steps") or "",
        "cfg": f"{cfg:g}",
        "scheduler": scheduler or "default",
        "width": width,
        "height": height,
    }
    try:
        paths = output.plan_paths(job.out, seeds, fields, job.overwrite, index_offset)
    except OSError as exc:  # a name the file system refuses (too long, a loop of links, no permission)
        raise UsageError(f"--out {job.out or output.DEFAULT_DIR!r}: cannot use {exc.filename or 'it'}: {exc.strerror or exc}",
                         "choose another --out") from None
    plan = Plan(job, spec, seeds, paths, width, height, cfg, scheduler, warnings=warnings, helpers=helpers,
                name_template=output.name_template(job.out, len(seeds)), name_fields=fields,
                vae=vae)
    plan.identity = identity.settings_digest(plan)
    return plan


def default_steps_of(spec: ModelSpec, scheduler: str | None) -> int | None:
    """The steps run_plan takes without --steps, known before loading: the model's recommendation, else the default
    of the scheduler class it will run (the named one, else the model's own); None when its config is not at hand."""
    from diffcli.pipeline import CLASS_STEPS

    if spec.defaults.get("steps"):
        return spec.defaults["steps"]
    if scheduler in SCHEDULERS:
        return CLASS_STEPS.get(SCHEDULERS[scheduler].class_name, 30)
    config = Path(spec.config_dir or spec.location) / "scheduler" / "scheduler_config.json"
    try:
        class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return CLASS_STEPS.get(class_name, 30) if isinstance(class_name, str) else None


def plan_jobs(jobs: list[Job]) -> list[Plan]:
    """Plan several jobs of one run (a sweep): {index} names continue across them and no two images share a path."""
    plans, seen = [], {}
    for job in jobs:
        plan = plan_job(job, sum(len(p.seeds) for p in plans))
        for path in plan.paths:
            if path in seen:
                raise UsageError(f"--out {job.out or output.DEFAULT_DIR!r} gives several images the name {path}",
                                 "use a folder, or a template with {index}, or with {cfg}, {steps}, {seed} or {scheduler} for a sweep")
            seen[path] = True
        plans.append(plan)
    return plans


def default_cache_dir() -> Path:
    """Where diffcli keeps small caches (model hashes); $DIFFCLI_HOME overrides."""
    import os

    return Path(os.environ.get("DIFFCLI_HOME") or Path.home() / ".cache" / "diffcli")


def versions() -> dict:
    """Library versions recorded with every image."""
    import diffusers
    import torch
    import transformers

    return {"diffcli": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def run_plan(plan: Plan, on_image: Callable[[dict], None], progress: bool = False, step_hook=None,
             notify: Callable[[str], None] = lambda message: None) -> None:
    """Load the model, generate every image in batches, save each as soon as its batch is done."""
    run_plans([plan], on_image, progress, step_hook, notify)


# Settings a job brings that its own pipeline calls need (input images, second passes, per-job noise): such a
# job's images never share a call with another job's.
OWN_CALLS = ("pipeline_kwargs", "postprocess", "tile", "hires_scale", "variation_seed")


def shared_call_key(plan: Plan):
    """Plans with equal keys differ only in prompt, negative prompt, seeds and paths, so their images can share
    pipeline calls; None for a plan whose settings need calls of its own, or that asked for one image per call."""
    job = plan.job
    if job.batch_size == 1 or any(job.extra.get(name) is not None for name in OWN_CALLS):
        return None
    if job.extra.get("refiner") and plan.spec.family == "sdxl":  # its refiner pass reads one job's prompt
        return None
    settings = {k: v for k, v in job.settings().items() if k not in ("prompt", "negative", "seed", "num_images", "out", "overwrite")}
    return plan.spec, plan.width, plan.height, plan.cfg, plan.scheduler, json.dumps(settings, sort_keys=True, default=str)


def run_plans(plans: list[Plan], on_image: Callable[[dict], None], progress: bool = False, step_hook=None,
              notify: Callable[[str], None] = lambda message: None) -> None:
    """Generate the images of plans that share a shared_call_key (or of one plan), --batch-size images per call.

    Images of different plans share a call only when their prompts encode to the same length, so each image
    is the one its plan alone would make (up to batching noise).
    """
    from diffcli import prompts
    from diffcli.pipeline import default_steps, is_loaded, load_for_job, resolve_device, resolve_dtype

    plan = plans[0]
    job = plan.job
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    started = time.perf_counter()
    with _loading(plan.spec.name, not is_loaded(plan.spec, job, job.safety_checker, plan.vae), progress, notify):
        pipe = load_for_job(plan.spec, job.task, job, plan.scheduler, job.safety_checker, plan.vae)
    adapters.activate(pipe, job)  # exactly this job's LoRAs on, at their scales
    load_s = time.perf_counter() - started
    steps = job.steps or plan.spec.defaults.get("steps") or default_steps(pipe.scheduler)
    if "strength" in job.extra:
        from diffcli.tasks import check_strength

        check_strength(job.extra["strength"], steps)
    if job.extra.get("refiner"):
        refiner.check_steps(steps, job.extra["refiner_start"])
    common = {
        "task": job.task,
        "steps": steps,
        "cfg": plan.cfg,
        "width": plan.width,
        "height": plan.height,
        "scheduler": plan.scheduler or type(pipe.scheduler).__name__,
        "sampler": SCHEDULERS[plan.scheduler].label if plan.scheduler else CLASS_LABELS.get(type(pipe.scheduler).__name__, ""),
        "model": plan.spec.name,
        "model_hash": output_hash(plan.spec),
        "model_family": plan.spec.family,
        **({"vae_hash": _vae_hash(plan.vae)} if plan.vae else {}),  # and "vae" (as given) from job.extra below
        "device": device,
        "generator_device": "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "optimizations": pipe.diffcli_optimizations,
        "versions": versions(),
        **{k: v for k, v in job.extra.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    groups: dict[int, list] = {}  # images by prompt length in chunks (one group for one plan), first-appearance order
    for each in plans:
        length = prompts.chunk_count(pipe, each.job) if len(plans) > 1 else 0
        groups.setdefault(length, []).extend((each, index) for index in range(len(each.seeds)))
    calls = [group[i : i + job.batch_size] for group in groups.values() for i in range(0, len(group), job.batch_size)]
    for call in calls:
        began = time.perf_counter()
        pixels, warnings = _with_oom_ladder(
            pipe, [(each.seeds[index], each.job) for each, index in call],
            lambda part: _generate_batch(pipe, plan, part, steps, progress, step_hook), notify
        )
        generate_s = (time.perf_counter() - began) / len(call)
        for image, (each, index) in zip(pixels, call):
            meta = dict(common, prompt=each.job.prompt, negative=each.job.negative, seed=each.seeds[index], index=index,
                        id=identity.image_id(each.identity, each.seeds[index]), warnings=each.warnings + warnings)
            if job.extra.get("variation_seed") is not None:  # image i varies toward variation_seed + i
                meta["variation_seed"] = job.extra["variation_seed"] + meta["seed"] - job.seed
            path = each.paths[index]
            began = time.perf_counter()
            data = output.encode_image(image, path, meta)
            with output.signals_held():  # an image on disk is always also reported
                written = output.write_new(path, data, job.overwrite,
                                           output.renumber(each.name_template, each.name_fields, each.seeds[index], index + 1))
                if written != path:
                    notify(f"{path} was taken meanwhile (another run writing there?); wrote {written}")
                    each.paths[index] = path = written
                timings = {"load_s": round(load_s, 3), "generate_s": round(generate_s, 3),
                           "save_s": round(time.perf_counter() - began, 3)}
                on_image(dict(meta, path=str(path), timings=timings))
            load_s = 0.0


@contextmanager
def _loading(name: str, loading: bool, progress: bool, notify: Callable[[str], None]):
    """Say that a model is loading (7-10 s on 2 CPU cores) and how long it took: a spinner when stderr is a terminal
    (`progress`), else the two lines "loading model NAME..." and "loaded in X.Xs"; nothing when it is loaded already."""
    if not loading:
        yield
        return
    began = time.perf_counter()
    if progress:
        from rich.console import Console

        with Console(file=sys.stderr).status(f"loading model {name}..."):
            yield
        notify(f"loading model {name}... loaded in {time.perf_counter() - began:.1f}s")
        return
    notify(f"loading model {name}...")
    yield
    notify(f"loaded in {time.perf_counter() - began:.1f}s")


def _vae_hash(vae) -> str:
    """The --vae's A1111 hash, computed once per process per VAE."""
    from diffcli import vae as vaes

    if vae not in _HASHES:
        _HASHES[vae] = vaes.vae_hash(vae)
    return _HASHES[vae]


def output_hash(spec: ModelSpec) -> str:
    """The model hash, computed once per process per model."""
    from diffcli.models import model_hash

    if spec not in _HASHES:
        _HASHES[spec] = model_hash(spec, default_cache_dir())
    return _HASHES[spec]


_HASHES: dict[ModelSpec, str] = {}


OOM_LADDER = ("attention slicing", "VAE tiling", "one image per call", "model CPU offload")


def _with_oom_ladder(pipe, items: list, generate_batch, notify):
    """Run a batch of (seed, job) items; on CUDA out-of-memory free memory and retry with the next, cheaper setting."""
    import gc

    import torch

    applied: list[str] = []
    while True:
        try:
            if "one image per call" in applied:
                parts = [generate_batch([item]) for item in items]
                images, warnings = [image for part in parts for image in part[0]], parts[0][1]
            else:
                images, warnings = generate_batch(items)
            return images, warnings + [f"out of memory: retried with {step}" for step in applied]
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(applied) == len(OOM_LADDER):
                raise RuntimeFailure(
                    f"out of GPU memory even with {', '.join(OOM_LADDER)}",
                    "lower --width/--height, or use --device cpu",
                ) from None
            step = OOM_LADDER[len(applied)]
            applied.append(step)
            notify(f"out of GPU memory: retrying with {step}")
            if step == "attention slicing":
                pipe.enable_attention_slicing()
            elif step == "VAE tiling":
                pipe.vae.enable_tiling()
            elif step == "model CPU offload":
                pipe.enable_model_cpu_offload()


def _call_with_sd_refiner(pipe, plan: Plan, prompt_jobs: list, call, on_step_end):
    """`call(step_end)` with the plan's SD 1.x/2.x refiner taking over at --refiner-start; its own text encoder (if
    any) reads the same prompts."""
    from diffcli import prompts
    from diffcli.pipeline import load_pipeline, resolve_device, resolve_dtype

    job = plan.job
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    unet, config, own = refiner.load_sd(  # the cached pipeline as it is: the base may be that very pipeline
        plan.helpers["refiner"], lambda spec: load_pipeline(spec, "txt2img", device, dtype, False, job.allow_pickle,
                                                            job.optimize, job.low_vram, job.threads), device, dtype)
    inputs = prompts.pipeline_inputs(own, prompt_jobs) if own is not None else None
    with refiner.sd_handover(pipe, unet, config, job.extra["refiner_start"], inputs, on_step_end) as step_end:
        return call(step_end)


def _generate_batch(pipe, plan: Plan, items: list[tuple[int, Job]], steps: int, progress: bool, step_hook):
    """One pipeline call for `items` (seed, job of its prompt), one CPU generator each, with a non-finite check
    and fp32 VAE retry."""
    import numpy as np
    import torch

    from diffcli import noise, prompts, tiles

    job = plan.job
    seeds, prompt_jobs = [seed for seed, _ in items], [each for _, each in items]
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    last = {}
    bar = _progress_bar(steps) if progress else None

    def on_step_end(pipeline, step, timestep, tensors):
        if step_hook is not None:
            step_hook(step, tensors)
        last["latents"] = tensors["latents"]
        if bar is not None:
            bar.advance(bar.task_ids[0])
        return tensors

    kwargs = dict(job.extra.get("pipeline_kwargs", {}))
    if job.task not in TASKS_SIZED_BY_IMAGE:
        kwargs.update(width=plan.width, height=plan.height)
    if job.extra.get("variation_seed") is not None:  # image i: seed+i noise slerped toward variation_seed+i
        variation_seeds = [job.extra["variation_seed"] + seed - job.seed for seed in seeds]
        kwargs["latents"] = noise.variation_latents(pipe, generators, variation_seeds, job.extra["variation_strength"],
                                                    plan.width, plan.height, pipe.unet.dtype)
    style = CALL_STYLES.get(type(pipe).__name__, CallStyle())
    encoded: dict[int, dict] = {}  # prompt inputs by batch size: tiles and retries reuse them

    def call(call_kwargs: dict, call_generators: list, output_type: str = "np", step_end=on_step_end):
        count = len(call_generators)
        call_jobs = prompt_jobs if count == len(prompt_jobs) else [job] * count  # tiles: one image of one job
        if style.prompt_embeds:
            if count not in encoded:
                encoded[count] = prompts.pipeline_inputs(pipe, call_jobs)
            call_kwargs = dict(call_kwargs, **encoded[count])
        else:
            negatives = [each.negative for each in call_jobs]
            call_kwargs = dict(call_kwargs, prompt=[each.prompt for each in call_jobs], negative_prompt=negatives if any(negatives) else None)
        if style.repeat_image:
            call_kwargs["image"] = [call_kwargs["image"]] * count
        if style.step_end_callback:
            call_kwargs["callback_on_step_end"] = step_end
        else:
            call_kwargs.update(callback=lambda i, t, latents: on_step_end(pipe, i, t, {"latents": latents}), callback_steps=1)
        return pipe(num_inference_steps=steps, guidance_scale=plan.cfg, generator=call_generators, output_type=output_type,
                    **call_kwargs).images

    def first_pass():
        if job.extra.get("tile"):  # each tile gets its region of the untiled call's noise; overlaps blended
            if bar is not None:  # one pipeline call per tile and image
                count = tiles.tile_count(pipe, kwargs["image"].size, job.extra["tile"], job.extra["tile_overlap"])
                bar.update(bar.task_ids[0], total=steps * count * len(seeds))
            return np.stack([
                tiles.upscale_with_tiles(pipe, kwargs["image"], seed, job.extra["tile"], job.extra["tile_overlap"], job.extra["scale"],
                                         lambda extra, generator: call(dict(kwargs, **extra), [generator])[0])
                for seed in seeds
            ])
        if job.extra.get("refiner") and plan.spec.family == "sdxl":  # the refiner finishes the base's latents
            latents = call(dict(kwargs, denoising_end=job.extra["refiner_start"]), generators, output_type="latent")
            return refiner.refine(job, plan, latents, generators, steps, on_step_end)
        if job.extra.get("refiner"):  # SD 1.x/2.x: the refiner's UNet takes over inside this call
            return _call_with_sd_refiner(pipe, plan, prompt_jobs, lambda step_end: call(kwargs, generators, step_end=step_end),
                                         on_step_end)
        return call(kwargs, generators)

    try:
        if bar is not None:
            bar.start()
        with speed.deep_cache(pipe, job.extra.get("deep_cache")), \
                masked.latent_content(pipe, job.extra.get("fill"), kwargs.get("mask_image")):  # inpaint --fill latent-*
            images = first_pass()
    finally:
        if bar is not None:
            bar.stop()
    warnings = []
    if not np.isfinite(images).all():
        latents = last.get("latents")
        if latents is None or not torch.isfinite(latents).all():
            raise RuntimeFailure(
                "the model produced NaN/Inf values; no image was saved",
                "try --dtype fp32 (or bf16), another --scheduler, or a lower --cfg",
            )
        images = _decode_fp32(pipe, latents)
        warnings.append("vae decode retried in fp32 after non-finite pixels")
        if not np.isfinite(images).all():
            raise RuntimeFailure("the VAE produced NaN/Inf pixels even in fp32; no image was saved")
    if job.extra.get("hires_scale"):
        images = hires.refine(pipe, job, plan, seeds, steps, last["latents"], images)
        if not np.isfinite(images).all():
            raise RuntimeFailure("the hires pass produced NaN/Inf values; no image was saved", "try --dtype fp32 or bf16")
    postprocess = job.extra.get("postprocess") or (lambda image: image)  # e.g. inpaint's exact paste-back
    return [postprocess(to_pil(image)) for image in images], warnings


def _decode_fp32(pipe, latents):
    """Decode latents with the VAE upcast to fp32 (fixes the fp16 SD/SDXL VAE overflow)."""
    import torch

    vae = pipe.vae
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        with torch.no_grad():
            decoded = vae.decode(latents.to(torch.float32) / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        vae.to(dtype)
    return pipe.image_processor.postprocess(decoded, output_type="np")


def to_pil(array):
    """float [0,1] HxWxC -> 8-bit PIL image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"))


def _progress_bar(steps: int):
    """A rich progress bar on stderr (only used when stderr is a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("steps"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(), console=Console(file=sys.stderr), transient=True)
    bar.add_task("steps", total=steps)
    return bar
