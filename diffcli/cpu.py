"""The CPU fast path: bf16 weights in channels_last memory where the CPU multiplies bf16 in hardware (Intel AMX, or
AVX512-BF16 as on AMD Zen 4) and the denoiser is large enough to gain, fp32 elsewhere. Chosen for `--dtype auto` from
/proc/cpuinfo's flags and the denoiser's parameter count (read from safetensors headers, before any weights load);
reported in `optimizations`."""

from __future__ import annotations

import functools
import math
from pathlib import Path

# A full-size SD 1.5 U-Net step at 256 px in bf16 + channels_last against fp32 (docs/performance.md, "CPU fast path"):
# 3.6x faster on AMX tiles, 2.1x on an AMD EPYC's AVX512-BF16 (torch 2.13); emulated bf16 (neither) was slower.
# In order of preference for the message.
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")
# Below this a denoiser is overhead-bound: tiny-shapes (9.4 M) ran no faster in bf16 (fp32 keeps its judged quality),
# and faster on one thread than on two (speed.configure_cpu_threads).
MIN_PARAMETERS = 100_000_000
# OpenVINO's f32 against torch fp32 where there is no native bf16, measured with oneDNN held to AVX2 on the AMD EPYC
# (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, a laptop's instructions): 1.56x end to end for SD 1.5 at 256 px,
# the same image (docs/performance.md). In f32 it holds the text encoders twice (torch's and its own), so `auto`
# takes it only where the memory available holds the model's fp32 weights this many times.
OPENVINO_F32_COPIES = 1.5


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: fp32 is then chosen)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(flags: frozenset[str]) -> str | None:
    """The first NATIVE_BF16 flag among `flags` (what the messages name), None if the CPU has none."""
    return next((flag for flag in NATIVE_BF16 if flag in flags), None)


def choose(flags: frozenset[str], parameters: int | None) -> tuple[str, str]:
    """("bf16" or "fp32", why) for a denoiser of `parameters` (None: unknown, taken as large) on a CPU with `flags`."""
    native = native_bf16(flags)
    if native is None:
        return "fp32", "this CPU has no native bf16 instructions (AMX or AVX512-BF16)"
    if parameters is not None and parameters < MIN_PARAMETERS:
        return "fp32", f"the denoiser's {parameters / 1e6:.1f} M parameters are too few for bf16 to pay"
    return "bf16", f"this CPU has {native}"


def openvino_pays(flags: frozenset[str], parameters: int | None, fp32_bytes: int | None, free: int | None) -> bool:
    """Whether `--backend auto` runs OpenVINO (where installed) for a denoiser of `parameters` (None: unknown, taken as
    large): in bf16 where the CPU has native bf16, else in f32 on an x86 CPU with AVX2 where `free` bytes of memory
    hold the model's `fp32_bytes` OPENVINO_F32_COPIES times (either unknown: taken as held)."""
    if parameters is not None and parameters < MIN_PARAMETERS:
        return False
    if native_bf16(flags):
        return True
    return "avx2" in flags and (fp32_bytes is None or free is None or free >= OPENVINO_F32_COPIES * fp32_bytes)


def _safetensors_parameters(files) -> int | None:
    """Elements in the tensors of these safetensors files, from their headers; None if there are none."""
    from diffcli import weights

    total, found = 0, False
    for path in files:
        for name, entry in weights.read_safetensors_header(path).items():
            if name != "__metadata__":
                total += math.prod(entry.get("shape", []))
                found = True
    return total if found else None


def denoiser_parameters(spec) -> int | None:
    """The parameters of `spec`'s U-Net or transformer (a single file: all its tensors; a pickle: its size in fp32
    values), None when unknown (a Hub model not downloaded yet, unreadable headers)."""
    from diffcli import models, weights

    try:
        if spec.source == "single_file" or spec.base:
            path = Path(spec.location)
            fmt = weights.file_format(path)
            if fmt == weights.GGUF:  # its tensor table, memory-mapped: no weights read
                from gguf import GGUFReader

                return sum(int(tensor.n_elements) for tensor in GGUFReader(path).tensors)
            if fmt == weights.SAFETENSORS:
                return _safetensors_parameters([path])
            return path.stat().st_size // 4  # a pickle: at most this many fp32 values (never unpickled here)
        folder = models.folder_of(spec)
        denoiser = folder / models.denoiser_folder(models.read_json(folder / "model_index.json"))
        return _safetensors_parameters(sorted(denoiser.glob("*.safetensors")))
    except Exception:  # noqa: BLE001 (an unreadable model fails with its own message when it loads)
        return None


@functools.lru_cache(maxsize=64)
def auto_dtype(spec) -> tuple[str, str]:
    """What `--dtype auto` is on the CPU for this model, and why."""
    return choose(cpu_flags(), denoiser_parameters(spec))


def _denoiser(pipe):
    """A loaded pipeline's U-Net or transformer, None if it has neither."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def loaded_parameters(pipe) -> int | None:
    """The parameters of a loaded pipeline's denoiser (what denoiser_parameters reads from headers before loading)."""
    denoiser = _denoiser(pipe)
    if denoiser is None:
        return None
    return getattr(denoiser, "diffcli_parameters", None) or sum(p.numel() for p in denoiser.parameters())


def is_small(pipe) -> bool:
    """Whether the pipeline's denoiser is below MIN_PARAMETERS: overhead-bound (fp32, and one CPU thread)."""
    parameters = loaded_parameters(pipe)
    return parameters is not None and parameters < MIN_PARAMETERS


def channels_last(module) -> bool:
    """`module`'s 4-D weights in channels_last, unless it has 5-D ones (Qwen-Image's and Wan's video VAEs: torch refuses
    the format for them); whether it was applied."""
    import torch

    if any(parameter.dim() == 5 for parameter in module.parameters()):
        return False
    module.to(memory_format=torch.channels_last)
    return True


def place(pipe) -> list[str]:
    """channels_last for the convolutions of a bf16 pipeline (oneDNN's fast bf16 layout); what was applied and why."""
    import torch

    denoiser = _denoiser(pipe)
    if denoiser is None or denoiser.dtype != torch.bfloat16:
        dtype, why = choose(cpu_flags(), loaded_parameters(pipe))
        return [f"cpu fp32 ({why})" if dtype == "fp32" else "cpu fp32 (--dtype fp32)"]
    for module in (getattr(pipe, "unet", None), getattr(pipe, "vae", None)):
        if module is not None:
            channels_last(module)
    native = native_bf16(cpu_flags())
    return [f"cpu bf16 + channels_last ({f'this CPU has {native}' if native else 'no native bf16: emulated'})"]
