"""Build and cache diffusers pipelines: device, dtype, scheduler, pipeline class per task."""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from dataclasses import dataclass

from diffcli import cpu, extras, families
from diffcli.errors import ModelError, UsageError, first_line

# Library chatter (deprecations, optional-backend notices) is not for our users; they may override.
for _library in ("TRANSFORMERS", "DIFFUSERS"):
    os.environ.setdefault(f"{_library}_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") if not sys.stderr.isatty() else None
from diffcli.models import ModelSpec


@dataclass(frozen=True)
class SchedulerEntry:
    """A scheduler by name: the diffusers class, its options, and a step count that suits it."""

    class_name: str
    options: tuple = ()  # (key, value) pairs passed to from_config
    steps: int = 30  # default --steps
    label: str = ""  # A1111's sampler name, for the `parameters` metadata
    flow_match: bool = False  # for flow-matching models (families.Family.flow_match: SD3, FLUX.1); else for SD's


SCHEDULERS: dict[str, SchedulerEntry] = {
    "ddim": SchedulerEntry("DDIMScheduler", steps=50, label="DDIM"),
    "pndm": SchedulerEntry("PNDMScheduler", (("skip_prk_steps", True),), steps=50, label="PLMS"),
    "lms": SchedulerEntry("LMSDiscreteScheduler", steps=50, label="LMS"),
    "lms-karras": SchedulerEntry("LMSDiscreteScheduler", (("use_karras_sigmas", True),), 50, "LMS Karras"),
    "heun": SchedulerEntry("HeunDiscreteScheduler", steps=25, label="Heun"),
    "euler": SchedulerEntry("EulerDiscreteScheduler", steps=30, label="Euler"),
    "euler-a": SchedulerEntry("EulerAncestralDiscreteScheduler", steps=30, label="Euler a"),
    "dpm2": SchedulerEntry("KDPM2DiscreteScheduler", steps=25, label="DPM2"),
    "dpm2-a": SchedulerEntry("KDPM2AncestralDiscreteScheduler", steps=25, label="DPM2 a"),
    "dpm++2m": SchedulerEntry("DPMSolverMultistepScheduler", steps=25, label="DPM++ 2M"),
    "dpm++2m-karras": SchedulerEntry(
        "DPMSolverMultistepScheduler", (("use_karras_sigmas", True),), 25, "DPM++ 2M Karras"
    ),
    "dpm++2m-sde": SchedulerEntry("DPMSolverMultistepScheduler", (("algorithm_type", "sde-dpmsolver++"),), 25, "DPM++ 2M SDE"),
    "dpm++2m-sde-karras": SchedulerEntry(
        "DPMSolverMultistepScheduler",
        (("algorithm_type", "sde-dpmsolver++"), ("use_karras_sigmas", True)),
        25,
        "DPM++ 2M SDE Karras",
    ),
    "dpm++sde": SchedulerEntry("DPMSolverSDEScheduler", steps=20, label="DPM++ SDE"),
    "dpm++sde-karras": SchedulerEntry("DPMSolverSDEScheduler", (("use_karras_sigmas", True),), 20, "DPM++ SDE Karras"),
    "unipc": SchedulerEntry("UniPCMultistepScheduler", steps=20, label="UniPC"),
    "deis": SchedulerEntry("DEISMultistepScheduler", steps=25, label="DEIS"),
    "lcm": SchedulerEntry("LCMScheduler", steps=4, label="LCM"),
    "ddpm": SchedulerEntry("DDPMScheduler", steps=100, label="DDPM"),
    # SD3's and FLUX.1's own; "Euler", as Forge labels it in FLUX.1 images
    "flow-euler": SchedulerEntry("FlowMatchEulerDiscreteScheduler", steps=28, label="Euler", flow_match=True),
}

# Default steps and A1111 label for whatever scheduler class a model ships with (plain variant wins).
CLASS_STEPS = {e.class_name: e.steps for e in reversed(SCHEDULERS.values())}
CLASS_LABELS = {e.class_name: e.label for e in reversed(SCHEDULERS.values())}
NEEDS = {"DPMSolverSDEScheduler": "torchsde"}  # scheduler class -> the optional package it imports (extras.py)

def normalize_scheduler_name(name: str) -> str:
    """Map user spellings ('DPM++ 2M Karras', 'euler_a', 'Euler a') onto table keys; a scheduler whose optional
    package is not installed (the SDE ones without torchsde) is a UsageError naming the pip command."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower()).replace("dpm++-", "dpm++")
    key = {"euler-ancestral": "euler-a", "plms": "pndm"}.get(key, key)
    compact = key.replace("-", "")
    found = next((known for known in SCHEDULERS if known.replace("-", "") == compact), None) or next(
        (known for known, entry in SCHEDULERS.items() if entry.label.lower().replace(" ", "") == compact), None)
    if found is None:
        raise UsageError(f"--scheduler {name!r} is unknown", f"choose one of: {', '.join(SCHEDULERS)} (see `diffcli schedulers`)")
    needs = NEEDS.get(SCHEDULERS[found].class_name)
    if needs:  # checked with the name, before any model loads
        extras.require(needs, f"--scheduler {name}")
    return found


def check_scheduler(name: str, spec: ModelSpec) -> None:
    """A scheduler table name fits the model's kind: flow-matching ones for SD3/FLUX.1, the others for SD 1.x/2.x/XL."""
    flow_match = families.of(spec).flow_match  # (the generic family: its scheduler config's kind)
    if SCHEDULERS[name].flow_match == flow_match:
        return
    flow = ", ".join(known for known, entry in SCHEDULERS.items() if entry.flow_match)
    takes = flow if flow_match else f"every scheduler but {flow}"
    kind = "a flow-matching" if flow_match else "a noise-prediction"
    raise UsageError(f"--scheduler: {spec.name!r} is {kind} model ({spec.family}) and takes {takes}, got {name}",
                     "leave --scheduler out for the model's own (see `diffcli schedulers`)")


def pipeline_class_name(spec: ModelSpec, task: str) -> str:
    """The diffusers class that runs `task` on this model, or a UsageError."""
    family = families.of(spec)
    name = family.pipelines.get(task)
    if name is None:
        raise UsageError(f"{task} does not work with {spec.name!r} ({spec.family} model)", family.task_hint)
    return name


def resolve_device(requested: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a UsageError."""
    import torch

    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda_count else "mps" if mps else "cpu"
    if requested.startswith("cuda"):
        index = int(requested.partition(":")[2] or 0)
        if index >= cuda_count:
            found = f"{cuda_count} CUDA device(s) found" if cuda_count else "no CUDA device found"
            raise UsageError(f"--device {requested} is not available ({found})", "use --device cpu or auto")
    if requested == "mps" and not mps:
        raise UsageError("--device mps is not available on this machine", "use --device cpu or auto")
    return requested


def resolve_dtype(requested: str, device: str, spec: ModelSpec | None = None):
    """'auto' is fp16 on CUDA/MPS, but bf16 on a CUDA GPU that has it for a transformer family (FLUX, SD3, Qwen-Image,
    Z-Image...: published in bf16; FLUX.1's T5 and transformer overflow fp16 to NaN); on the CPU, bf16 where the CPU
    fast path pays for `spec` (cpu.auto_dtype), else fp32. Unsupported combinations are UsageErrors."""
    import torch

    kind = device.split(":")[0]
    name = requested
    if requested == "auto" and kind == "cpu":
        name = cpu.auto_dtype(spec)[0] if spec is not None else "fp32"
    elif requested == "auto":
        transformer = spec is not None and families.of(spec).denoiser == "transformer"
        name = "bf16" if transformer and kind == "cuda" and torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and kind == "cpu":
        raise UsageError("--dtype fp16 is not supported on the CPU", "use --dtype fp32 (default) or bf16")
    if name == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bf16 is not supported by {torch.cuda.get_device_name(device)}", "use --dtype fp16")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build_scheduler(current, name: str | None):
    """A fresh scheduler of the named kind (default: the model's own) from the model's config."""
    import diffusers

    if name is None:
        return type(current).from_config(current.config)

    entry = SCHEDULERS[normalize_scheduler_name(name)]  # (also checks the scheduler's optional package is installed)
    if entry.class_name in NEEDS:
        try:
            importlib.import_module(NEEDS[entry.class_name])
        except ImportError:
            raise extras.missing(NEEDS[entry.class_name], f"--scheduler {name}") from None
    return getattr(diffusers, entry.class_name).from_config(current.config, **dict(entry.options))


def default_steps(scheduler) -> int:
    """A sensible --steps default for the scheduler actually in use."""
    return CLASS_STEPS.get(type(scheduler).__name__, 30)


_CACHE: dict[tuple, dict] = {}  # (model, device, dtype, loading options, threads, --vae, backend) -> {task: pipeline}


def load_pipeline(spec: ModelSpec, task: str, device: str, dtype, safety_checker: bool = False,
                  allow_pickle: bool = False, optimize: bool = True, low_vram: bool | None = None,
                  threads: int | None = None, vae=None, backend: str = "torch"):
    """Load a model once per process; other tasks of the same model share its components. `threads` (--threads) is
    set when a pipeline is placed on the CPU; torch has one thread pool per process, and a command's jobs share one.
    `vae` (a vae.VaeSpec, --vae) replaces the model's VAE: a model is cached once per VAE. `backend` "openvino" (a
    resolved backend.resolve): the weights load in fp32 and OpenVINO runs the U-Net, text encoders and VAE decoder in `dtype`."""
    key = (spec, device, str(dtype), safety_checker, allow_pickle, optimize, low_vram, threads, vae, backend)  # None: auto
    loaded = _CACHE[key] = _CACHE.pop(key, None) or {}  # most recently used last (trim_cache drops the first)
    if task not in loaded:
        import diffusers

        cls = getattr(diffusers, pipeline_class_name(spec, task))
        base = next(iter(loaded.values()), None)
        if base is not None:
            pipe = _from_pipe(cls, base)
            pipe.diffcli_optimizations = base.diffcli_optimizations
            pipe.diffcli_backend = getattr(base, "diffcli_backend", "torch")
        else:
            import torch

            low_vram = memory_plan(spec, device, dtype, low_vram, backend)  # before any weights load: may not fit
            if backend == "openvino":  # fp32 weights to export from; a U-Net already exported is not loaded
                from diffcli import openvino_unet

                pipe = _load_weights(cls, spec, torch.float32, safety_checker, allow_pickle, vae,
                                     without_unet=openvino_unet.skips_unet(spec, vae, openvino_unet.hint_of(dtype)))
                engine = openvino_unet.apply(pipe, spec, dtype, vae)
                pipe.diffcli_optimizations = _place(pipe, device, optimize, low_vram, threads)[:-1] + [engine]
            else:
                pipe = _load_weights(cls, spec, dtype, safety_checker, allow_pickle, vae)
                pipe.diffcli_optimizations = _place(pipe, device, optimize, low_vram, threads)
        pipe.set_progress_bar_config(disable=True)
        pipe.diffcli_scheduler = pipe.scheduler  # each job builds its scheduler afresh from this one
        loaded[task] = pipe
    return loaded[task]


def _from_pipe(cls, base):
    """`cls.from_pipe(base)`, which casts every component to one dtype: a quantized (GGUF) transformer refuses that, so
    such a pipeline's other tasks are built from its components as they are."""
    if not getattr(getattr(base, "transformer", None), "is_quantized", False):
        return cls.from_pipe(base)
    import inspect

    takes = inspect.signature(cls.__init__).parameters
    return cls(**{name: part for name, part in base.components.items() if name in takes})


def trim_cache(keep: int) -> list[str]:
    """Drop all but the `keep` most recently used models from memory (a server's small LRU); their names."""
    import gc

    dropped = []
    while len(_CACHE) > max(keep, 0):
        key = next(iter(_CACHE))
        del _CACHE[key]
        dropped.append(key[0].name)
    if dropped:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return dropped


def job_device(settings) -> str:
    """The device a job's model settings run on: --device resolved; --backend openvino with --device auto: the CPU."""
    return resolve_device("cpu" if settings.backend == "openvino" and settings.device == "auto" else settings.device)


def load_for_job(spec: ModelSpec, task: str, job, scheduler: str | None, safety_checker: bool = False, vae=None,
                 backend: str = "torch"):
    """The cached pipeline of `spec` for `task` under the job's device, dtype and loading options (the key the job's
    own model was loaded under, so shared components are not loaded again), with a fresh `scheduler`; `vae`: the
    plan's --vae (Plan.vae), for the job's own model only; `backend`: backend.resolve's choice."""
    device = job_device(job)
    pipe = load_pipeline(spec, task, device, resolve_dtype(job.dtype, device, spec), safety_checker, job.allow_pickle,
                         job.optimize, job.low_vram, job.threads, vae, backend)
    if device == "cpu":  # OpenMP's thread count is per calling thread: a server's worker sets its own, as the loader did
        from diffcli import speed

        speed.configure_cpu_threads(job.threads, cpu.is_small(pipe))
    pipe.scheduler = build_scheduler(pipe.diffcli_scheduler, scheduler)
    return pipe


def is_loaded(spec: ModelSpec, job, safety_checker: bool = False, vae=None, backend: str = "torch") -> bool:
    """Whether load_for_job would find the model's weights in memory already (nothing to load, nothing to report)."""
    device = job_device(job)
    low_vram = job.low_vram  # None: the automatic memory plan, decided once when the model loads
    key = (spec, device, str(resolve_dtype(job.dtype, device, spec)), safety_checker, job.allow_pickle, job.optimize, low_vram,
           job.threads, vae, backend)
    return bool(_CACHE.get(key))


def memory_plan(spec: ModelSpec, device: str, dtype, low_vram: bool | None, backend: str = "torch"):
    """--low-vram as given (True: the savers, False: none), else the automatic memory.Plan from the weights' headers and
    the memory free now (a UsageError, exit 2, when even the cheapest placement cannot fit); weights or free memory
    unknown: needs_low_vram's size threshold. OpenVINO loads fp32 weights."""
    if low_vram is not None:
        return low_vram
    import torch

    from diffcli import memory

    plan = memory.plan_for(spec, device, torch.float32 if backend == "openvino" else dtype)
    return needs_low_vram(spec, device) if plan is None else plan


def needs_low_vram(spec: ModelSpec, device: str) -> bool:
    """Whether a CUDA device is too small for the model at full speed, by its total memory and the family's
    low_vram_gib (used where memory.plan_for cannot read the weights' sizes)."""
    if not device.startswith("cuda"):
        return False
    import torch

    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return total_gib < families.get(spec.family).low_vram_gib


def _place(pipe, device: str, optimize: bool, low_vram, threads: int | None = None) -> list[str]:
    """Move to the device with the memory savers (--low-vram True), the automatic memory plan (a memory.Plan: offload
    and VAE tiling, recorded on the VAE for memory.fit_vae), the CUDA fast path, or CPU thread settings (`threads`:
    --threads, None for speed.configure_cpu_threads' default)."""
    from diffcli import memory, speed

    plan = low_vram if isinstance(low_vram, memory.Plan) else None
    cuda = device.startswith("cuda")
    pipe.diffcli_memory = plan
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.diffcli_memory = plan  # shared with the model's other tasks' pipelines (memory.fit_vae reads it)
        if plan is not None and plan.vae_tiling:
            pipe.vae.enable_tiling()
    if plan is not None and cuda and plan.offload != "none":
        return memory.apply(pipe, plan, device)  # offloaded: not compiled
    entry = [plan.label(device)] if plan is not None and (cuda or plan.vae_tiling) else []
    if low_vram is True and cuda:
        pipe.enable_attention_slicing()
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        pipe.enable_model_cpu_offload(device=device)
        return ["attention slicing", "VAE slicing and tiling", "model CPU offload"]
    pipe.to(device)
    if cuda and optimize:
        return speed.optimize_cuda(pipe) + entry
    if device == "cpu":
        threads = speed.configure_cpu_threads(threads, cpu.is_small(pipe))
        return speed.cpu_settings(threads) + entry + cpu.place(pipe)  # the path last: run.py says it on stderr
    return entry


def _load_weights(cls, spec: ModelSpec, dtype, safety_checker: bool, allow_pickle: bool, vae=None,
                  without_unet: bool = False):
    """from_pretrained / from_single_file with honest errors; pickle files only when allowed; `vae` (--vae) loaded
    first and passed in place of the model's own; `without_unet`: a diffusers folder's U-Net left out (pipe.unet None:
    OpenVINO's replaces it)."""
    kwargs = {"torch_dtype": dtype}
    if without_unet:
        kwargs["unet"] = None
    if not safety_checker and families.of(spec).safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if vae is not None:
        from diffcli import vae as vaes

        kwargs["vae"] = vaes.load(vae, dtype, allow_pickle)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.base:  # a transformer-only file completed by its base
                from diffcli import transformer_files

                pipe = transformer_files.load(cls, spec, allow_pickle, **kwargs)
            elif spec.source == "single_file":
                from diffcli import checkpoints, weights

                info = checkpoints.inspect_checkpoint(spec.location, spec.model_config, allow_pickle)
                extra = checkpoints.single_file_kwargs(info, spec.model_config)
                location = weights.named_for_loader(spec.location, weights.file_format(spec.location))
                pipe = cls.from_single_file(location, **extra, **kwargs)
            else:
                pipe = cls.from_pretrained(spec.location, use_safetensors=None if allow_pickle else True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as exc:
        raise ModelError(f"cannot load model {spec.name!r}: {first_line(exc)}") from exc
    if safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise UsageError(f"--safety-checker: model {spec.name!r} has no safety checker")
    return pipe
