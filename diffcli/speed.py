"""The CUDA fast path and CPU thread settings, applied once when a pipeline is loaded."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def compile_cache_dir() -> Path:
    """Persistent TorchInductor cache, so a second process skips most of the compile."""
    return Path(os.environ.get("DIFFCLI_HOME") or Path.home() / ".cache" / "diffcli") / "inductor"


def optimize_cuda(pipe) -> list[str]:
    """channels_last, fused QKV projections, and the U-Net and VAE decoder compiled with CUDA graphs.

    Follows diffusers' "accelerate inference of text-to-image diffusion models" recipe; returns what was applied.
    """
    import torch

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    inductor = torch._inductor.config
    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True
    applied = ["channels_last"]
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
        applied.append("fused_qkv")
    # fullgraph=False: a graph break costs speed instead of failing the run (not yet measured on a GPU, see docs/performance.md)
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead")
    applied.append("torch.compile(unet, vae.decode, cuda graphs)")
    return applied


def configure_cpu_threads() -> int:
    """Use every core this process may run on (torch defaults to physical cores, sometimes fewer)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores)
    return torch.get_num_threads()


@contextlib.contextmanager
def deep_cache(pipe, interval: int | None):
    """DeepCache (Ma et al. 2023) during the block: every `interval`-th step runs the whole U-Net, the steps
    between reuse its cached deep features and run only the outermost blocks. None or 1: no caching."""
    if not interval or interval < 2:
        yield
        return
    from DeepCache import DeepCacheSDHelper

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
