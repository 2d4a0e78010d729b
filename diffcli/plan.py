"""Plan a job: every input check, every default resolved, every output path claimed, before any weights load.

`plan_job(job)` is diffcli's single check_inputs (as a diffusers pipeline's): bad input stops here with exit 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffcli import adapters, backend, controlnet, hires, identity, ip_adapter, jobs, limits, output, refiner, support, tasks
from diffcli.errors import UsageError
from diffcli.jobs import Job
from diffcli.models import ModelSpec, resolve_model
from diffcli.options import MAX_SIDE, RANDOM_SEED, check_size_multiple, draw_seed


@dataclass
class Plan:
    """A job with every default resolved and every output path decided, before any weights load."""

    job: Job  # the plan's own copy: seed drawn, scheduler named, second-pass defaults filled in
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
    adapters: adapters.Resolved = field(default_factory=adapters.Resolved)
    inputs: tasks.Prepared | None = None  # the task's input images, read and fitted
    controls: controlnet.Resolved = field(default_factory=controlnet.Resolved)  # --control units with their maps
    ip: ip_adapter.Resolved = field(default_factory=ip_adapter.Resolved)  # --ip-adapter files, encoder and images
    record: dict = field(default_factory=dict)  # settings beyond the core ones, for the metadata

    @property
    def notes(self) -> list[str]:
        """Size and tiling decisions the user did not spell out: said once before the run."""
        return list(self.inputs.notes.values()) if self.inputs else []


def check_job(job: Job) -> Job:
    """Every setting that needs no model; raises UsageError naming the flag and value."""
    from diffcli import noise
    from diffcli.options import check_core

    check_core(job)
    noise.check_variation(job.sampling)
    hires.check_settings(job.second)
    refiner.check_settings(job.second)
    if job.inputs is not None:
        tasks.check_inputs(job)
    controlnet.check_texts(job.controls.units)
    ip_adapter.parse(job.adapters)
    return job


def plan_job(job: Job, index_offset: int = 0) -> Plan:
    """Check a job and resolve model, size, seeds and output paths; loads no weights."""
    job = job.copy()
    sampling = job.sampling
    if sampling.seed == RANDOM_SEED:  # --seed -1 not drawn by the command: random here, then reported as any drawn seed
        sampling.seed = draw_seed()
    check_job(job)
    resolved_adapters = adapters.resolve(job)  # LoRA and embedding files checked now, loaded by the run
    if sampling.scheduler is not None:
        from diffcli.pipeline import normalize_scheduler_name

        sampling.scheduler = normalize_scheduler_name(sampling.scheduler)
    spec = resolve_model(tasks.model_name(job), job.model.config, job.model.allow_pickle, base=job.model.base)
    # what the model's family cannot do stops here; what it reads otherwise is said
    family_warnings = support.check(job, spec, sampling.scheduler or spec.defaults.get("scheduler"), resolved_adapters)
    backend.check(job, spec)  # an explicit --backend openvino the job cannot use
    refiner.apply_default(job, spec)
    hires.apply_default(job, spec)  # --hires without --hires-strength: the model's recommendation
    helpers = {}  # resolved once here, loaded by the second pass
    if refiner.active(job.second):
        helpers["refiner"] = refiner.check(job, spec)
    if job.second.hires and job.second.hires_upscaler == "x4":
        helpers["hires_upscaler"] = hires.check_upscaler(job)
    vae = None
    if job.model.vae:  # found, format and trust checked, latent channels the model's
        from diffcli import vae as vaes

        vae = vaes.resolve(job.model.vae, spec, job.model.allow_pickle)
    prepared = tasks.prepare(job, spec) if job.inputs is not None else None
    defaults = spec.defaults
    if prepared:
        width, height = prepared.size
    elif sampling.aspect:
        width, height = size_for_aspect(sampling.aspect, sampling.width, sampling.height,
                                        defaults.get("width") or spec.sample_size or 512, spec.size_multiple)
    else:
        width, height = (sampling.width or defaults.get("width") or spec.sample_size or 512,
                         sampling.height or defaults.get("height") or spec.sample_size or 512)
    check_size_multiple(width, height, spec.size_multiple)
    if job.second.hires:  # the second pass's size too, before any weights load
        hires.check_target(width, height, job.second.hires, spec.size_multiple)
    warnings = family_warnings + limits.check(spec, job, width, height)  # and what it was not trained for (diffcli.json)
    controls = controlnet.resolve(job, spec, width, height, prepared.crop if prepared else None)  # maps made now: a bad image stops the run before loading
    ip = ip_adapter.resolve(job, spec)  # adapter headers against the model, the encoder's config, the images read
    if sampling.seed is None:
        sampling.seed = draw_seed()
    seeds = [sampling.seed + i for i in range(sampling.num_images)]
    cfg = sampling.cfg if sampling.cfg is not None else defaults.get("cfg", 7.5)
    scheduler = sampling.scheduler or defaults.get("scheduler")
    if scheduler and not sampling.scheduler:  # the model's recommended scheduler: checked (and its package) too
        from diffcli.pipeline import normalize_scheduler_name

        normalize_scheduler_name(scheduler)
    if prepared is not None and "strength" in prepared.pipeline_kwargs:  # against the steps the run will take, --steps or
        # not (FLUX.2's img2img takes its input as a reference: no strength)
        tasks.check_strength(job.inputs.strength, sampling.steps or default_steps_of(spec, scheduler),
                             default=not sampling.steps)
    fields = {
        "slug": output.slugify(job.prompt.text),
        "prompt": job.prompt.text[:80],
        "model": output.slugify(Path(spec.name).stem, 30),
        "steps": sampling.steps or defaults.get("steps") or "",
        "cfg": f"{cfg:g}",
        "scheduler": scheduler or "default",
        "width": width,
        "height": height,
    }
    out = job.output.out
    try:
        paths = output.plan_paths(out, seeds, fields, job.output.overwrite, index_offset)
    except OSError as exc:  # a name the file system refuses (too long, a loop of links, no permission)
        raise UsageError(f"--out {out or output.DEFAULT_DIR!r}: cannot use {exc.filename or 'it'}: {exc.strerror or exc}",
                         "choose another --out") from None
    record = dict(jobs.record(job), **resolved_adapters.record(), **controls.record(), **ip.record())
    if spec.guidance != "cfg":  # --cfg is FLUX.1's distilled guidance (A1111 text: Distilled CFG Scale), or unused
        record["guidance"] = spec.guidance
    if prepared:
        record.update(prepared.record, **prepared.notes)
        if "strength" not in prepared.pipeline_kwargs:  # FLUX.2's img2img: a reference, no strength to record
            record.pop("strength", None)
    plan = Plan(job, spec, seeds, paths, width, height, cfg, scheduler, warnings=warnings, helpers=helpers,
                name_template=output.name_template(out, len(seeds)), name_fields=fields, vae=vae,
                adapters=resolved_adapters, inputs=prepared, controls=controls, ip=ip, record=record)
    plan.identity = identity.settings_digest(plan)
    return plan


def size_for_aspect(aspect: str, width: int | None, height: int | None, native: int, multiple: int) -> tuple[int, int]:
    """--aspect W:H (or a ratio like 1.5): with --width or --height the other side, else about native x native pixels
    in that shape; each side rounded to the nearest multiple the model takes."""
    try:
        ratio = float(aspect) if ":" not in aspect else (lambda w, h: float(w) / float(h))(*aspect.split(":", 1))
    except (ValueError, ZeroDivisionError):
        ratio = float("nan")
    if not 0.1 <= ratio <= 10:  # (nan fails too)
        raise UsageError(f"--aspect must be W:H or a ratio between 0.1 and 10, got {aspect!r}", "e.g. 16:9, 2:3 or 1.5")
    if width and height:
        raise UsageError(f"--aspect {aspect} with both --width and --height: one of the three is too many")
    fit = lambda side: max(multiple, round(side / multiple) * multiple)  # noqa: E731
    if width:
        size = width, fit(width / ratio)
    elif height:
        size = fit(height * ratio), height
    else:
        size = fit(native * ratio ** 0.5), fit(native / ratio ** 0.5)
    if max(size) > MAX_SIDE:
        raise UsageError(f"--aspect {aspect} makes the image {size[0]}x{size[1]}, over the {MAX_SIDE} px limit",
                         "a smaller --width/--height, or another --aspect")
    return size


def default_steps_of(spec: ModelSpec, scheduler: str | None) -> int | None:
    """The steps the run takes without --steps, known before loading: the model's recommendation, else the default
    of the scheduler class it will run (the named one, else the model's own); None when its config is not at hand."""
    from diffcli.pipeline import CLASS_STEPS, SCHEDULERS

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


def plan_jobs(jobs_: list[Job]) -> list[Plan]:
    """Plan several jobs of one run (a sweep): {index} names continue across them and no two images share a path."""
    plans, seen = [], set()
    for job in jobs_:
        plan = plan_job(job, sum(len(p.seeds) for p in plans))
        output.check_distinct(plan.paths, seen, job.output.out)
        plans.append(plan)
    return plans


def shared_call_key(plan: Plan):
    """Plans with equal keys differ only in prompt, negative prompt, seeds and paths, so their images can share
    pipeline calls; None for a plan whose settings need calls of its own (input images, second passes, per-job noise),
    or that asked for one image per call."""
    job = plan.job
    if (job.sampling.batch_size == 1 or plan.inputs is not None or job.second.hires or job.sampling.variation_seed is not None
            or plan.controls.units):
        return None
    if refiner.active(job.second) and plan.spec.family == "sdxl":  # its refiner pass reads one job's prompt
        return None
    settings = dict(plan.record, model=vars(job.model), steps=job.sampling.steps, batch_size=job.sampling.batch_size,
                    adapters=[plan.adapters.loras, plan.adapters.embeddings])  # (the record holds weighting, clip skip)
    return plan.spec, plan.width, plan.height, plan.cfg, plan.scheduler, json.dumps(settings, sort_keys=True, default=str)


def share_calls(items: list, plan_of=lambda item: item) -> list[list]:
    """`items` (plans, or what `plan_of` finds a plan in) whose images can share pipeline calls, grouped in order of
    first appearance (equal shared_call_key); every other item alone."""
    groups: dict = {}
    for item in items:
        key = shared_call_key(plan_of(item))
        groups.setdefault(key if key is not None else id(item), []).append(item)
    return list(groups.values())
