"""The CUDA fast path and CPU thread settings, applied once when a pipeline is loaded."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def compile_cache_dir() -> Path:
    """Persistent TorchInductor cache, so a second process skips most of the compile."""
    return Path(os.environ.get("DIFFCLI_HOME") or Path.home() / ".cache" / "diffcli") / "inductor"


def optimize_cuda(pipe) -> list[str]:
    """channels_last, fused QKV projections, and the U-Net (or transformer) and VAE decoder compiled with CUDA graphs.

    Follows diffusers' "accelerate inference of text-to-image diffusion models" recipe; returns what was applied.
    """
    import torch

    from diffcli import cpu

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    inductor = torch._inductor.config
    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"  # SD3 and FLUX.1: a transformer
    laid_out = [part for part in (name, "vae") if cpu.channels_last(getattr(pipe, part))]
    applied = [f"channels_last ({', '.join(laid_out)})"] if laid_out else []
    if hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
        applied.append("fused_qkv")
    # fullgraph=False: a graph break costs speed instead of failing the run (not yet measured on a GPU, see docs/performance.md)
    setattr(pipe, name, torch.compile(getattr(pipe, name), mode="reduce-overhead"))
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead")
    applied.append(f"torch.compile({name}, vae.decode, cuda graphs)")
    return applied


MAX_THREADS = 256  # --threads above this is a typo: more threads than cores only slow CPU inference down
LOAD_SAMPLE_S = 0.2  # how long default_threads watches /proc/stat: long enough to see a busy core, short beside loading
# OpenMP runtimes' own wait settings; a user who set any of them chose how threads wait (see set_passive_wait)
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def set_passive_wait() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a wait policy: an idle OpenMP thread sleeps instead of spinning.

    libgomp's default spins about 3 ms at every barrier before it sleeps; with another process on the cores, the
    spinning thread takes the CPU from the thread it waits for, and a step took 1.7 s instead of 40 ms
    (docs/performance.md, "CPU threads under load"). Read once when torch loads OpenMP: call before importing torch.
    """
    if not any(name in os.environ for name in WAIT_SETTINGS):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(busy, total, cpus) jiffies of the whole machine from /proc/stat, None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    return total - idle, total, sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())


def busy_cores(seconds: float = LOAD_SAMPLE_S) -> float | None:
    """Cores' worth of CPU time other processes used over the next `seconds` (/proc/stat minus this process)."""
    import time

    before, own, start = _cpu_ticks(), time.process_time(), time.monotonic()
    if before is None:
        return None
    time.sleep(seconds)
    after, own, elapsed = _cpu_ticks(), time.process_time() - own, time.monotonic() - start
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return None
    return max(0.0, busy / total * (after[2] or 1) - own / elapsed)


def default_threads() -> int:
    """Every core this process may run on, less the cores other processes keep busy right now (at least 1).

    With another process on one of 2 cores, 2 threads wait on each other at every barrier while 1 thread runs at
    full speed on the free core (docs/performance.md, "CPU threads under load").
    """
    cores, busy = cpu_cores(), busy_cores()
    free = cores if busy is None else (os.cpu_count() or 1) - busy  # the machine's cores, not only ours, are busy
    return max(1, min(cores, round(free)))


_DEFAULT: list[int] = []  # default_threads() of this process, chosen at its first placement: torch has one pool


def configure_cpu_threads(threads: int | None = None, small: bool = False) -> int:
    """Set torch's CPU threads: `threads` (--threads) if given, else OMP_NUM_THREADS if set, else 1 for a `small`
    (overhead-bound) model, else default_threads().

    A small model's ops are too short to share: the bundled model took 0.49-0.55 s per image on 1 thread and
    0.95-0.97 s on 2 passively waiting ones on an idle 2-core Xeon (docs/performance.md, "CPU fast path")."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        if small:
            torch.set_num_threads(1)
            return 1
        if not _DEFAULT:
            _DEFAULT.append(default_threads())
        torch.set_num_threads(_DEFAULT[0])
    return torch.get_num_threads()


def cpu_settings(threads: int) -> list[str]:
    """The CPU entries of an image's `optimizations`: the thread count and any OpenMP wait setting in effect."""
    return [f"cpu threads {threads}", *(f"{name}={os.environ[name]}" for name in WAIT_SETTINGS if name in os.environ)]


def check_deep_cache(interval: int | None) -> None:
    """--deep-cache needs the DeepCache package (the `deepcache` extra): checked with the other settings, before any
    model loads."""
    if interval:
        from diffcli import extras

        extras.require("DeepCache", "--deep-cache")


@contextlib.contextmanager
def deep_cache(pipe, interval: int | None):
    """DeepCache (Ma et al. 2023) during the block: every `interval`-th step runs the whole U-Net, the steps
    between reuse its cached deep features and run only the outermost blocks. None or 1: no caching."""
    if not interval or interval < 2:
        yield
        return
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        from diffcli import extras

        raise extras.missing("DeepCache", "--deep-cache") from None

    before = {module: vars(module).get("forward") for module in pipe.unet.modules()}  # e.g. accelerate's offload hooks
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()  # leaves the original bound methods as instance attributes: put back exactly what was there
        for module, forward in before.items():
            if forward is None:
                vars(module).pop("forward", None)
            else:
                module.forward = forward


def reset_peak_memory(device: str) -> None:
    """Start measuring a CUDA device's peak allocation afresh (the CPU's peak is the process's, never reset)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: str) -> float | None:
    """Peak memory in GiB since reset_peak_memory: torch's CUDA allocations, or on the CPU the process's peak resident
    size (Linux and macOS); None where neither is known."""
    if device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)  # bytes on macOS, KiB on Linux
