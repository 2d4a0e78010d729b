"""Plain diffusers loading for lab experiments that reach into a pipeline's parts (relation probes); diffcli's own
`eval`, the sample grid and the CPU bench run through diffcli's plan and run instead."""

import torch


def load(model_dir, scheduler=None, device="cpu", pipeline="StableDiffusionPipeline"):
    """`pipeline`.from_pretrained (fp16 on CUDA, else fp32) with diffcli's named scheduler swapped in."""
    import diffusers

    from diffcli.pipeline import build_scheduler

    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    pipe = getattr(diffusers, pipeline).from_pretrained(model_dir, dtype=dtype)
    if scheduler:
        pipe.scheduler = build_scheduler(pipe.scheduler, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
