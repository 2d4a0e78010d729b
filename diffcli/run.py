"""Run planned jobs, in numbered steps as a diffusers `__call__` reads: load, adapters, steps, then per pipeline call:
noise, first pass, NaN recovery, second passes; each image saved as soon as its call is done."""

from __future__ import annotations

import time
import traceback
from typing import Callable

from diffcli import __version__, adapters, families, hashes, hires, identity, ip_adapter, masked, output, progress, refiner, speed, tasks
from diffcli.errors import RuntimeFailure, UsageError, first_line
from diffcli.images import to_pil
from diffcli.plan import Plan

TASKS_SIZED_BY_IMAGE = ("img2img", "upscale")  # their pipelines take the size from the input image
OOM_LADDER = ("attention slicing", "VAE tiling", "one image per call", "model CPU offload")


def versions() -> dict:
    """Library versions recorded with every image."""
    import diffusers
    import torch
    import transformers

    return {"diffcli": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def run_plan(plan: Plan, on_image: Callable[[dict], None], progress_bar: bool = False,
             notify: Callable[[str], None] = lambda message: None) -> None:
    """Load the model, generate every image of one plan in batches, save each as soon as its batch is done."""
    run_plans([plan], on_image, progress_bar, notify)


def run_plans(plans: list[Plan], on_image: Callable[[dict], None], progress_bar: bool = False,
              notify: Callable[[str], None] = lambda message: None) -> None:
    """Generate the images of plans that share a plan.shared_call_key (or of one plan) and save each as soon as its
    pipeline call is done: atomic, never over another file unless --overwrite, metadata inside, one record out."""
    for plan, index, image, meta in images(plans, progress_bar, notify):
        _save(plan, index, image, meta, on_image, notify)


def images(plans: list[Plan], progress_bar: bool = False, notify: Callable[[str], None] = lambda message: None,
           on_step: Callable[[int, int, object], None] | None = None):
    """Yield (plan, index, PIL image, metadata) for every image of plans that share a plan.shared_call_key (or of one
    plan), --batch-size images per call; nothing is saved (run_plans saves; `diffcli eval` judges them in memory;
    the server encodes them). `on_step(step, steps, latents)` is called after each denoising step; an exception it
    raises stops the run (the server's interrupt and skip).

    Images of different plans share a call only when their prompts encode to the same length, so each image
    is the one its plan alone would make (up to batching noise).
    """
    from diffcli import prompts
    from diffcli import backend
    from diffcli import memory
    from diffcli.pipeline import default_steps, is_loaded, job_device, load_for_job, memory_plan, resolve_dtype

    plan = plans[0]
    job = plan.job
    device = job_device(job.model)
    dtype = resolve_dtype(job.model.dtype, device, plan.spec)
    # 1. The pipeline, loaded once per process, with this plan's scheduler and VAE, on torch or OpenVINO.
    started = time.perf_counter()
    engine = backend.resolve(job, plan.spec, device)
    loading = not is_loaded(plan.spec, job.model, job.model.safety_checker, plan.vae, engine)
    if loading:  # a model too large for the memory free stops here, before its weights load (exit 2)
        memory_plan(plan.spec, device, dtype, job.model.low_vram, engine)
    if loading and engine == "openvino":
        backend.say_export(plan.spec, plan.vae, dtype, notify)
    with progress.loading(plan.spec.name, loading, progress_bar, notify):
        pipe = load_for_job(plan.spec, job.task, job.model, plan.scheduler, job.model.safety_checker, plan.vae, engine)
    if loading and device == "cpu":  # the CPU path chosen (bf16 or fp32, and why), once per model
        notify(f"{plan.spec.name}: {pipe.diffcli_optimizations[-1]}")
    if loading and (chosen := memory.note(pipe, device)):  # the automatic memory plan on CUDA, once per model
        notify(f"{plan.spec.name}: {chosen}")
    memory.fit_vae(pipe, device, plan.width, plan.height, notify)  # VAE tiling when this size's decode would not fit
    # 2. Exactly this job's LoRAs, embeddings and IP-Adapters; its ControlNets.
    adapters.activate(pipe, plan.adapters)
    ip_adapter.activate(pipe, plan.ip, device, dtype, job.model.allow_pickle)
    if plan.controls.units:
        from diffcli import controlnet

        pipe = controlnet.pipeline(pipe, job.task, plan.spec.family, plan.controls, device, dtype, job.model.allow_pickle)
    load_s = time.perf_counter() - started
    # 3. Steps: --steps, else the model's recommendation, else what suits the scheduler; checks that need them.
    steps = job.sampling.steps or plan.spec.defaults.get("steps") or default_steps(pipe.scheduler)
    if plan.inputs is not None and "strength" in plan.inputs.pipeline_kwargs:  # (not FLUX.2's reference img2img)
        tasks.check_strength(job.inputs.strength, steps)
    if refiner.active(job.second):
        refiner.check_steps(steps, job.second.refiner_start)
    common = {id(each): _metadata(each, pipe, steps, device, dtype) for each in plans}
    # 4. Calls: images grouped by prompt length in chunks (one group for one plan), --batch-size per call.
    groups: dict[int, list] = {}
    for each in plans:
        length = prompts.chunk_count(pipe, each.job.prompt) if len(plans) > 1 else 0
        groups.setdefault(length, []).extend((each, index) for index in range(len(each.seeds)))
    size = job.sampling.batch_size if families.call_style(type(pipe).__name__).batch else 1
    calls = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
    for call in calls:
        began = time.perf_counter()
        speed.reset_peak_memory(device)
        pixels, warnings = _with_oom_ladder(pipe, [(each.seeds[index], each) for each, index in call],
                                            lambda part: _generate_batch(pipe, plan, part, steps, progress_bar, on_step),
                                            notify)
        generate_s = (time.perf_counter() - began) / len(call)
        peak = speed.peak_memory_gib(device)  # CUDA: this call's allocations; CPU: the process's resident peak
        for image, (each, index) in zip(pixels, call):
            timings = {"load_s": round(load_s, 3), "generate_s": round(generate_s, 3), "peak_memory_gib": peak}
            meta = _as_made(dict(common[id(each)], warnings=each.warnings + warnings, timings=timings), image,
                            notify if index == 0 else lambda message: None)  # said once per plan
            yield each, index, image, meta
            load_s = 0.0


def _as_made(meta: dict, image, notify) -> dict:
    """The record with the size the image has: a generic pipeline may pick its own (HiDream generates at its native
    area, keeping the aspect ratio), and the record must say what was made, so that a replay asks for that."""
    if "pipeline" not in meta or image.size == (meta["width"], meta["height"]):
        return meta
    width, height = image.size
    note = (f"{meta['pipeline']} made {width}x{height} for --width {meta['width']} --height {meta['height']} (it "
            "chooses its own size); recorded as made")
    notify(note)
    return dict(meta, width=width, height=height, warnings=[*meta["warnings"], note])


def _metadata(plan: Plan, pipe, steps: int, device: str, dtype) -> dict:
    """What every image of a plan records about how it was made (replay reads it back)."""
    from diffcli.pipeline import CLASS_LABELS, SCHEDULERS

    scheduler = plan.scheduler
    meta = {
        "task": plan.job.task, "steps": steps, "cfg": plan.cfg, "width": plan.width, "height": plan.height,
        "scheduler": scheduler or type(pipe.scheduler).__name__,
        "sampler": SCHEDULERS[scheduler].label if scheduler else CLASS_LABELS.get(type(pipe.scheduler).__name__, ""),
        "model": plan.spec.name, "model_hash": hashes.model_hash(plan.spec), "model_family": plan.spec.family,
        **({"pipeline": type(pipe).__name__} if plan.spec.pipeline else {}),  # the generic family: the class run
        "device": device, "generator_device": "cpu", "dtype": str(dtype).removeprefix("torch."),
        "optimizations": pipe.diffcli_optimizations, "versions": versions(),
        "prompt": plan.job.prompt.text, "negative": plan.job.prompt.negative,
    }
    if getattr(pipe, "diffcli_backend", "torch") == "openvino":  # replay runs it again on OpenVINO
        import openvino

        meta.update(backend="openvino", versions=dict(meta["versions"], openvino=openvino.__version__.split("-")[0]))
    if plan.vae:
        from diffcli import vae as vaes

        meta["vae_hash"] = vaes.vae_hash(plan.vae)  # and "vae" (as given) from the record
    return dict(meta, **plan.record)


def image_record(plan: Plan, index: int, meta: dict) -> dict:
    """`meta` (from images) completed with image `index`'s own seed, index and id: what its file records."""
    seed = plan.seeds[index]
    meta = dict(meta, seed=seed, index=index, id=identity.image_id(plan.identity, seed))
    variation = plan.job.sampling.variation_seed
    if variation is not None:  # image i varies toward variation_seed + i
        meta["variation_seed"] = variation + seed - plan.job.sampling.seed
    return meta


def _save(plan: Plan, index: int, image, meta: dict, on_image, notify) -> None:
    seed, path = plan.seeds[index], plan.paths[index]
    timings = meta.pop("timings")
    meta = image_record(plan, index, meta)
    began = time.perf_counter()
    data = output.encode_image(image, path, meta)
    with output.signals_held():  # an image on disk is always also reported
        written = output.write_new(path, data, plan.job.output.overwrite,
                                   output.renumber(plan.name_template, plan.name_fields, seed, index + 1))
        if written != path:
            notify(f"{path} was taken meanwhile (another run writing there?); wrote {written}")
            plan.paths[index] = path = written
        on_image(dict(meta, path=str(path), timings=dict(timings, save_s=round(time.perf_counter() - began, 3))))


def _with_oom_ladder(pipe, items: list, generate_batch, notify):
    """Run a batch of (seed, plan) items; on CUDA out-of-memory free memory and retry with the next, cheaper setting."""
    import gc

    import torch

    # IP-Adapters' attention processors have no sliced form (diffusers would put plain ones back): that step is left out
    ladder = [step for step in OOM_LADDER if not (step == "attention slicing" and ip_adapter.loaded(pipe))]
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
            if len(applied) == len(ladder):
                raise RuntimeFailure(f"out of GPU memory even with {', '.join(ladder)}",
                                     "lower --width/--height, or use --device cpu") from None
            step = ladder[len(applied)]
            applied.append(step)
            notify(f"out of GPU memory: retrying with {step}")
            if step == "attention slicing":
                pipe.enable_attention_slicing()
            elif step == "VAE tiling":
                pipe.vae.enable_tiling()
            elif step == "model CPU offload":
                pipe.enable_model_cpu_offload()


def _generate_batch(pipe, plan: Plan, items: list, steps: int, progress_bar: bool, on_step=None):
    """One pipeline call for `items` (seed, plan of its prompt): one CPU generator each, a non-finite check with an
    fp32 VAE retry, the second passes, and the task's postprocessing."""
    import numpy as np
    import torch

    job = plan.job
    seeds = [seed for seed, _ in items]
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    last = {}
    bar = progress.step_bar(steps) if progress_bar else None

    def on_step_end(pipeline, step, timestep, tensors):
        last["latents"] = tensors["latents"]
        if bar is not None:
            bar.advance(bar.task_ids[0])
        if on_step is not None:
            on_step(step + 1, steps, tensors["latents"])
        return tensors

    # 1. The call's inputs: the task's images, the size, variation noise.
    kwargs = dict(plan.inputs.pipeline_kwargs) if plan.inputs else {}
    if job.task not in TASKS_SIZED_BY_IMAGE:
        kwargs.update(width=plan.width, height=plan.height)
    if plan.controls.units:
        from diffcli import controlnet

        kwargs.update(controlnet.call_kwargs(pipe, plan.controls))
    if plan.ip.adapters:
        kwargs.update(ip_adapter.call_kwargs(plan.ip))
    variation = job.sampling.variation_seed
    if variation is not None:  # image i: seed+i noise slerped toward variation_seed+i
        from diffcli import noise

        variation_seeds = [variation + seed - job.sampling.seed for seed in seeds]
        kwargs["latents"] = noise.variation_latents(pipe, generators, variation_seeds, job.sampling.variation_strength,
                                                    plan.width, plan.height, pipe.unet.dtype)
    # 2. The first pass (tiled, handed to a refiner, or plain), with DeepCache and inpaint's latent fill around it.
    rows = [each.job.prompt for _, each in items]
    call = _caller(pipe, rows, job.prompt, steps, plan.cfg, on_step_end, job.sampling.true_cfg)
    try:
        if bar is not None:
            bar.start()
        if families.call_style(type(pipe).__name__).global_rng:  # (one image per call: batch=False)
            torch.manual_seed(seeds[0])
        with speed.deep_cache(pipe, job.model.deep_cache), \
                masked.latent_content(pipe, getattr(job.inputs, "fill", None), kwargs.get("mask_image")):
            images = _first_pass(pipe, plan, call, rows, kwargs, generators, steps, bar, on_step_end)
    finally:
        if bar is not None:
            bar.stop()
    # 3. NaN recovery: decode the last latents again with the VAE in fp32 (SD's: a transformer family's latents are
    # packed or normalised its own way, and it runs in bf16 by default).
    warnings = []
    if not np.isfinite(images).all():
        latents = last.get("latents")
        if latents is None or not torch.isfinite(latents).all():
            raise RuntimeFailure("the model produced NaN/Inf values; no image was saved",
                                 "try --dtype fp32 (or bf16), another --scheduler, or a lower --cfg")
        if families.of(plan.spec).denoiser != "unet":
            raise RuntimeFailure("the VAE produced NaN/Inf pixels; no image was saved", "try --dtype bf16 or fp32")
        images = _decode_fp32(pipe, latents)
        warnings.append("vae decode retried in fp32 after non-finite pixels")
        if not np.isfinite(images).all():
            raise RuntimeFailure("the VAE produced NaN/Inf pixels even in fp32; no image was saved")
    # 4. Second passes: hires fix.
    if job.second.hires:
        images = hires.second_pass(pipe, plan, seeds, steps, last["latents"], images)
        if not np.isfinite(images).all():
            raise RuntimeFailure("the hires pass produced NaN/Inf values; no image was saved", "try --dtype fp32 or bf16")
    # 5. The task's postprocessing (inpaint's exact paste-back).
    postprocess = (plan.inputs.postprocess if plan.inputs else None) or (lambda image: image)
    return [postprocess(to_pil(image)) for image in images], warnings


def _caller(pipe, prompts_of_images: list, one: object, steps: int, cfg: float, on_step_end, true_cfg=None):
    """`call(kwargs, generators, output_type, step_end)`: the pipeline called the way its class takes inputs
    (families.call_style), the prompts encoded once per batch size (tiles and retries reuse them); `true_cfg`: FLUX.1's
    true_cfg_scale (--true-cfg), which makes it read the negative prompt."""
    from diffcli import families, prompts, t5_prompts

    style = families.call_style(type(pipe).__name__)
    encoded: dict[int, dict] = {}

    def call(call_kwargs: dict, call_generators: list, output_type: str = "np", step_end=on_step_end):
        count = len(call_generators)
        rows = prompts_of_images if count == len(prompts_of_images) else [one] * count  # tiles: one image of one job
        if style.prompt_embeds:
            if count not in encoded:
                encoded[count] = prompts.pipeline_inputs(pipe, rows)
            call_kwargs = dict(call_kwargs, **encoded[count])
        else:  # the strings, without <lora:> tags (they chose the adapters)
            with_true_cfg = style.takes_true_cfg and true_cfg is not None
            texts = [prompts.strip_extra_networks(each.text) for each in rows]
            negatives = ([prompts.strip_extra_networks(each.negative) for each in rows]
                         if style.negative_prompt or with_true_cfg else [])
            # true CFG runs only with a negative prompt, even an empty one; without one SD3 encodes "" itself
            negatives = negatives if any(negatives) or style.true_cfg else None
            weighted = one.weighting and any(map(prompts.is_weighted, texts + (negatives or [])))
            if style.weighted_t5 and weighted:  # SD3, FLUX.1: diffcli's weighted embeddings
                if count not in encoded:
                    encoded[count] = t5_prompts.pipeline_inputs(pipe, texts, negatives, one.clip_skip,
                                                                one.max_sequence_length)
                call_kwargs = dict(call_kwargs, **encoded[count])
            else:
                call_kwargs = dict(call_kwargs, prompt=texts)
                if negatives is not None:
                    call_kwargs["negative_prompt"] = negatives
                if style.clip_skip and (one.clip_skip or 1) > 1:
                    call_kwargs["clip_skip"] = one.clip_skip - 1  # diffusers counts layers skipped, A1111 the layer used
                if style.max_sequence_length is not None and one.max_sequence_length:
                    call_kwargs["max_sequence_length"] = one.max_sequence_length
            if with_true_cfg:  # FLUX.1: a second, unconditional pass when above 1 (with the negative prompt)
                call_kwargs["true_cfg_scale"] = true_cfg
        if style.size and "image" in call_kwargs and "width" not in call_kwargs:  # the input's size, not the native
            call_kwargs.update(width=call_kwargs["image"].width, height=call_kwargs["image"].height)
        if style.repeat_image:
            call_kwargs["image"] = [call_kwargs["image"]] * count
        if not style.strength:  # (Z-Image's ControlNet inpaint: from noise, at the strength 1 plan time allowed)
            call_kwargs.pop("strength", None)
        if style.step_end_callback:
            call_kwargs["callback_on_step_end"] = step_end
        else:
            call_kwargs.update(callback=lambda i, t, latents: on_step_end(pipe, i, t, {"latents": latents}), callback_steps=1)
        call_kwargs = dict(num_inference_steps=steps, generator=call_generators, output_type=output_type,
                           **style.guidance(cfg), **call_kwargs)
        if style.takes is not None:  # a generic pipeline: only what its __call__ names; the size asked (not binned to
            # its trained aspect ratios and resized back: PixArt, Sana) and the prompt as written (no caption cleaning)
            call_kwargs = {key: value for key, value in dict(call_kwargs, use_resolution_binning=False,
                                                             clean_caption=False).items() if key in style.takes}
        try:
            return pipe(**call_kwargs).images
        except ValueError as exc:  # a pipeline's own check of its inputs (a generic one's sizes are known only now)
            if not any(frame.name == "check_inputs" for frame in traceback.extract_tb(exc.__traceback__)):
                raise
            raise UsageError(f"{type(pipe).__name__} refused the inputs: {first_line(exc)[:300]}") from None

    return call


def _first_pass(pipe, plan: Plan, call, rows: list, kwargs: dict, generators: list, steps: int, bar, on_step_end):
    """Tiles (one call, the UNet and VAE in overlapping windows: tiles.lockstep), an SDXL refiner finishing the base's
    latents, an SD 1.x/2.x refiner's UNet taking over inside the call, or the plain call."""
    from diffcli import tiles

    job = plan.job
    tile = plan.record.get("tile")
    if tile:  # one call, its UNet and VAE decoder in overlapping windows
        with tiles.lockstep(pipe, kwargs["image"].size, tile, plan.record["tile_overlap"], plan.record["tile_stats"]):
            return call(kwargs, generators)
    if refiner.active(job.second) and plan.spec.family == "sdxl":
        latents = call(dict(kwargs, denoising_end=job.second.refiner_start), generators, output_type="latent")
        return refiner.finish_sdxl(plan, latents, generators, steps, on_step_end)
    if refiner.active(job.second):
        return _call_with_sd_refiner(pipe, plan, rows, lambda step_end: call(kwargs, generators, step_end=step_end),
                                     on_step_end)
    return call(kwargs, generators)


def _call_with_sd_refiner(pipe, plan: Plan, rows: list, call, on_step_end):
    """`call(step_end)` with the plan's SD 1.x/2.x refiner taking over at --refiner-start; its own text encoder (if
    any) reads the same prompts."""
    from diffcli import prompts
    from diffcli.pipeline import load_pipeline, resolve_device, resolve_dtype

    settings = plan.job.model
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, plan.spec)  # the refiner's UNet computes with the base's
    unet, config, own = refiner.load_sd(  # the cached pipeline as it is: the base may be that very pipeline
        plan.helpers["refiner"], lambda spec: load_pipeline(spec, "txt2img", device, dtype, False, settings.allow_pickle,
                                                            settings.optimize, settings.low_vram, settings.threads),
        device, dtype)
    inputs = prompts.pipeline_inputs(own, rows) if own is not None else None
    with refiner.sd_handover(pipe, unet, config, plan.job.second.refiner_start, inputs, on_step_end) as step_end:
        return call(step_end)


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
