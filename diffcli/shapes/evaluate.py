"""Generate images for held-out captions with a model folder and score them with the judge.

`python -m diffcli.shapes.evaluate --model DIR --n 200 --seed 0 [--steps --cfg --scheduler --device]`;
an x4 upscaler folder is scored on upscaling 32 px renders instead (PSNR against the 128 px truth, and the judge).
"""

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from diffcli.models import resolve_model
from diffcli.shapes import judge, world

SCHEDULERS = {  # diffcli name -> (diffusers class, extra config)
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}), "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}
GRID = [("dpm++2m", st, c) for st in (8, 12, 20) for c in (2.0, 4.0, 6.0)] + \
    [("unipc", 8, 4.0), ("unipc", 12, 4.0), ("euler-a", 12, 4.0), ("dpm++2m-karras", 12, 4.0)]


def prompts(n: int, seed: int, two_object: bool = True):
    """Held-out evaluation scenes with full captions (two-object ones leave sizes unsaid): half of each kind."""
    rng = random.Random(10_000 + seed)
    out = []
    for i in range(n):
        two = two_object and i % 2 == 1
        while True:
            s = world.sample_scene(rng, two)
            a = s.objects[0]
            key = (a.colour, a.shape, a.size, s.position, s.background) if not two else \
                (a.colour, a.shape, s.relation, s.objects[1].colour, s.objects[1].shape, s.background)
            if world.heldout(key):
                break
        text = world.caption(rng, s, full=True, train=False, drop=("size0", "size1") if two else ())
        out.append((text, s))
    return out


def load(model_dir, scheduler=None, device="cpu", pipeline="StableDiffusionPipeline"):
    """Plain diffusers `pipeline`.from_pretrained (fp16 on CUDA, else fp32), with a named scheduler swapped in."""
    import diffusers

    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    pipe = getattr(diffusers, pipeline).from_pretrained(model_dir, dtype=dtype)
    if scheduler:
        cls, extra = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def defaults(model_dir) -> dict:
    """The model folder's diffcli.json."""
    return json.loads((Path(model_dir) / "diffcli.json").read_text())


def evaluate(model_dir, n=200, seed=0, steps=None, cfg=None, scheduler=None, device="cpu", *, two_object=True,
             batch_size=25, pipe=None, refiner=None, refiner_start=None) -> dict:
    """Generate n held-out prompts (seeds seed*100000+i) and return per-attribute accuracies and exact match; the
    model's default refiner (diffcli.json) takes part unless `refiner` names another or "none"."""
    d = defaults(model_dir)
    steps, cfg, scheduler = steps or d["steps"], cfg if cfg is not None else d["cfg"], scheduler or d["scheduler"]
    pipe = pipe or load(model_dir, scheduler, device)
    expert = load_refiner(model_dir, device, refiner, refiner_start)
    items = prompts(n, seed, two_object)
    acc, t0 = defaultdict(list), time.time()
    for start in range(0, n, batch_size):
        chunk = items[start:start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed * 100_000 + start + i) for i in range(len(chunk))]
        for (_, s), img in zip(chunk, generate(pipe, [t for t, _ in chunk], gens, steps, cfg, expert)):
            _judge(acc, s, img)
    res = _means(acc)
    return {"model": str(model_dir), "n": n, "seed": seed, "steps": steps, "cfg": cfg, "scheduler": scheduler,
            "refiner": expert and expert["name"], "refiner_start": expert and expert["start"],
            "device": str(device), "seconds": round(time.time() - t0, 1), "accuracy": res}


def load_refiner(model_dir, device, name=None, start=None) -> dict | None:
    """The refiner that finishes the model's images: diffcli.json's unless `name` names another, none for "none";
    a dict of its name, switch, UNet, scheduler config and pipeline (None when it reads the base's embeddings)."""
    from diffcli import refiner

    d = defaults(model_dir)
    name = name or refiner.default_refiner(d, model_dir)
    if name is None or name == refiner.NO_REFINER:
        return None
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    unet, config, own = refiner.load_sd(resolve_model(name), lambda spec: load(spec.location, None, device), device, dtype)
    return {"name": name, "start": start or d.get("refiner_start", 0.8), "unet": unet, "config": config, "pipe": own}


def generate(pipe, texts, generators, steps, cfg, expert=None):
    """One pipeline call at the world's size, as float images; `expert` (load_refiner) finishes them."""
    import contextlib

    from diffcli import refiner

    handover = contextlib.nullcontext(None)
    if expert is not None:
        inputs, own = None, expert["pipe"]
        if own is not None:  # its own text encoder reads the prompts
            embeds, negative = own.encode_prompt(texts, own.device, 1, cfg > 1)
            inputs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
        handover = refiner.sd_handover(pipe, expert["unet"], expert["config"], expert["start"], inputs, None)
    with handover as callback:
        return pipe(texts, num_inference_steps=steps, guidance_scale=cfg, generator=generators, height=world.SIZE,
                    width=world.SIZE, output_type="np", callback_on_step_end=callback).images


def judged(scene, image: np.ndarray) -> dict:
    """The judge's per-attribute scores (and `exact`) of one image (HxWx3 floats in [0, 1]) against its scene."""
    return judge.score(judge.analyze(np.round(image * 255)), judge.truth(scene))


def _judge(acc: dict, scene, image: np.ndarray) -> None:
    """Append the judge's per-attribute scores of one generated image (HxWx3 in [0, 1]) to `acc`."""
    kind = "one" if len(scene.objects) == 1 else "two"
    for k, v in judged(scene, image).items():
        acc[f"{kind}.{k}"].append(v)


def _means(acc: dict) -> dict:
    """Mean of each attribute's scores."""
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(acc.items())}


def evaluate_upscaler(model_dir, n=32, seed=0, steps=None, noise_level=None, scheduler=None, device="cpu") -> dict:
    """Upscale n held-out 32 px scenes x4 and compare with the true 128 px render: mean PSNR (bicubic alongside)
    and the judge's accuracy on the upscaled images."""
    from PIL import Image

    from diffcli.bench import psnr

    d = defaults(model_dir)
    steps, scheduler = steps or d["steps"], scheduler or d["scheduler"]
    noise_level = d["noise_level"] if noise_level is None else noise_level
    pipe = load(model_dir, scheduler, device, "StableDiffusionUpscalePipeline")
    scenes = [s for _, s in prompts(n, seed)]
    truth = world.render(world.to_tensors(scenes)).permute(0, 2, 3, 1).numpy()  # n x 128 x 128 x 3 in [0, 1]
    small = torch.nn.functional.interpolate(torch.from_numpy(truth).permute(0, 3, 1, 2), scale_factor=0.25, mode="area")
    lows = [Image.fromarray(np.round(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for x in small]
    t0 = time.time()
    gens = [torch.Generator("cpu").manual_seed(seed * 100_000 + i) for i in range(n)]
    images = pipe([""] * n, image=lows, num_inference_steps=steps, guidance_scale=1.0, noise_level=noise_level,
                  generator=gens, output_type="np").images
    seconds = time.time() - t0
    bicubic = [np.asarray(low.resize((world.SIZE, world.SIZE), Image.BICUBIC), dtype=np.float32) / 255 for low in lows]
    acc = defaultdict(list)
    for s, img in zip(scenes, images):
        _judge(acc, s, img)
    return {"model": str(model_dir), "n": n, "seed": seed, "steps": steps, "noise_level": noise_level,
            "scheduler": scheduler, "device": str(device), "seconds": round(seconds, 1),
            "psnr_db": round(float(np.mean([psnr(a, b) for a, b in zip(images, truth)])), 2),
            "bicubic_psnr_db": round(float(np.mean([psnr(a, b) for a, b in zip(bicubic, truth)])), 2),
            "accuracy": _means(acc)}


def main(argv=None):
    """CLI: print the evaluation as JSON on stdout."""
    ap = argparse.ArgumentParser(prog="python -m diffcli.shapes.evaluate", description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grid", action="store_true", help="also try a few steps/cfg/scheduler settings")
    ap.add_argument("--noise-level", type=int, help="x4 upscaler models only")
    ap.add_argument("--refiner", help="SD refiner (as --model) finishing each image; 'none' turns off the model's own")
    ap.add_argument("--refiner-start", type=float, help="fraction of the schedule before the refiner takes over")
    a = ap.parse_args(argv)
    upscaler = resolve_model(a.model).family == "sd-x4-upscaler"
    if (upscaler and (a.cfg is not None or a.grid)) or (not upscaler and a.noise_level is not None):
        ap.error("--cfg and --grid are for text-to-image models, --noise-level for x4 upscalers")
    if upscaler:
        print(json.dumps(evaluate_upscaler(a.model, a.n, a.seed, a.steps, a.noise_level, a.scheduler, a.device)))
        return
    print(json.dumps(evaluate(a.model, a.n, a.seed, a.steps, a.cfg, a.scheduler, a.device, refiner=a.refiner,
                              refiner_start=a.refiner_start)), flush=True)
    if a.grid:
        for sched, steps, cfg in GRID:
            pipe = load(a.model, sched, a.device)
            print(json.dumps(evaluate(a.model, a.n, a.seed, steps, cfg, sched, a.device, pipe=pipe, batch_size=100)),
                  flush=True)

if __name__ == "__main__":
    main()
