"""`--backend`: which engine computes the U-Net, text encoders and VAE decoder of an SD 1.x/2.x/XL pipeline on the CPU:
torch, or OpenVINO (diffcli/openvino_unet.py), whose CPU plugin made a full-size SD 1.5 image in about half torch bf16's
time on AMX, and a U-Net step in 0.76x of it on an AMD EPYC's AVX512-BF16 (docs/performance.md, "CPU fast path").

`auto` picks OpenVINO for a large denoiser (cpu.openvino_pays: in bf16 where the CPU has native bf16, else in f32 on an
AVX2 CPU with the memory for it, 1.56x torch fp32 there), where the package is installed (`diffcli[openvino]`) and the
job uses nothing that changes the U-Net at run time; else torch.
An explicit `--backend openvino` that cannot run a job is refused when the job is planned, before any weights load.
"""

from __future__ import annotations

import functools

from diffcli import extras
from diffcli.errors import UsageError

BACKENDS = ("auto", "torch", "openvino")
FAMILIES = ("sd1", "sd2", "sdxl")  # U-Nets of the SD layout (SDXL: with its added text and time conditioning)


def unsupported(job, spec) -> list[str]:
    """What in the job the OpenVINO path cannot run: another family, or flags that change the U-Net at run time."""
    reasons = []
    if spec.family not in FAMILIES:
        reasons.append(f"{spec.name!r} is a {spec.family} model (OpenVINO runs {', '.join(FAMILIES)})")
    used = {"--lora": job.adapters.lora, "<lora:...> tags": "<lora:" in job.prompt.text,
            "--control": job.controls.units, "--deep-cache": job.model.deep_cache,
            "--refiner": job.second.refiner not in (None, "none"), "--ip-adapter": job.adapters.ip_adapter}
    return reasons + [f"{flag} changes the U-Net at run time" for flag, value in used.items() if value]


def require(requested: str) -> None:
    """A known --backend, and for openvino its package (UsageError, exit 2): what check and the bench both need."""
    if requested not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "openvino":
        extras.require("openvino", "--backend openvino")


def check(job, spec) -> None:
    """Refuse an explicit --backend openvino the job cannot use (UsageError, exit 2); nothing for auto and torch."""
    requested = job.model.backend
    require(requested)
    if requested != "openvino":
        return
    reasons = unsupported(job, spec)
    if job.model.device not in ("auto", "cpu"):
        reasons.insert(0, f"it runs on the CPU, not on --device {job.model.device}")
    if job.model.dtype not in ("auto", "bf16", "fp32"):
        reasons.append(f"--dtype {job.model.dtype} (OpenVINO computes in bf16 or fp32 on the CPU)")
    if reasons:
        raise UsageError(f"--backend openvino cannot run this job: {reasons[0]}", "leave --backend out")


def resolve(job, spec, device: str) -> str:
    """"torch" or "openvino" for a checked job on `device` (resolved)."""
    requested = job.model.backend
    if requested != "auto":
        return requested if device == "cpu" else "torch"
    if device != "cpu" or job.model.dtype != "auto" or unsupported(job, spec) or not extras.available("openvino"):
        return "torch"
    return "openvino" if openvino_pays(spec) else "torch"


@functools.lru_cache(maxsize=64)
def openvino_pays(spec) -> bool:
    """cpu.openvino_pays for `spec`, decided once per process: the memory available falls once the model has loaded,
    and a later job of a batch or server must not pick the other engine (and load the model a second time)."""
    from diffcli import cpu, memory

    sizes = memory.weight_sizes(spec, 4)
    return cpu.openvino_pays(cpu.cpu_flags(), cpu.denoiser_parameters(spec), sizes.total if sizes else None,
                             memory.host_available())


def say_export(spec, vae, dtype, notify) -> None:
    """Say (before loading) that the model's modules are about to be converted to OpenVINO for `dtype`, once, if they
    are."""
    from diffcli import openvino_unet

    where = openvino_unet.folder(spec, vae, openvino_unet.hint_of(dtype))
    if not openvino_unet.is_cached(where):
        notify(f"{spec.name}: converting its U-Net, text encoders and VAE decoder to OpenVINO, once (kept in {where.parent})")
