"""`diffcli eval`: generate images for held-out captions through diffcli's own plan and run, score them with the
pixel judge; an x4 upscaler is scored on upscaling 32 px renders instead (PSNR against the 128 px truth, and the judge).
"""

import json
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from diffcli.shapes import SEED_STRIDE, judge, world


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


def run(model: str, n: int, seed: int, steps, cfg, scheduler, device: str, refiner, refiner_start, threads) -> dict:
    """`diffcli eval`'s body: check its options (exit 2 before any model loads), then evaluate the model."""
    from diffcli.errors import UsageError
    from diffcli.jobs import SecondPasses
    from diffcli.models import resolve_model
    from diffcli.options import check_threads, draw_seed
    from diffcli.pipeline import normalize_scheduler_name, resolve_device
    from diffcli.refiner import check_settings

    check_threads(threads)
    seed = draw_seed() if seed == -1 else seed  # random, as everywhere: the report's "seed" says which
    spec = resolve_model(model)
    if not (Path(spec.location) / "diffcli.json").is_file():
        raise UsageError(f"--model {model!r} is not a shapes model (no diffcli.json)", "eval judges tiny-shapes models only")
    name = normalize_scheduler_name(scheduler) if scheduler else None
    device = resolve_device(device)
    if spec.family == "sd-x4-upscaler":
        if cfg is not None:
            raise UsageError("--cfg does not apply to an upscaler's eval", "it upscales without a prompt (cfg 1)")
        return evaluate_upscaler(spec.location, n, seed, steps, None, name, device, threads=threads)
    check_settings(SecondPasses(refiner=refiner, refiner_start=refiner_start))  # the range check
    return evaluate(spec.location, n, seed, steps, cfg, name, device, refiner=refiner, refiner_start=refiner_start,
                    threads=threads)


def defaults(model_dir) -> dict:
    """The model folder's diffcli.json."""
    return json.loads((Path(model_dir) / "diffcli.json").read_text())


def _images(command: str, values: list[dict], batch_size: int = 1) -> list[np.ndarray]:
    """The images of one Job per `values` (jobs.build's keys), planned and run as the CLI runs them, in memory (HxWx3
    floats in [0, 1]); calls of up to `batch_size` images where the plans allow."""
    from diffcli.jobs import build
    from diffcli.plan import plan_job, share_calls
    from diffcli.run import images

    with tempfile.TemporaryDirectory(prefix="diffcli-eval-") as folder:  # plans claim paths; nothing is written
        plans = [plan_job(build(command, dict(each, out=f"{folder}/{i}.png", batch_size=batch_size))[0])
                 for i, each in enumerate(values)]
        made = {id(plan): image for group in share_calls(plans) for plan, _, image, _ in images(group)}
    return [np.asarray(made[id(plan)], dtype=np.float32) / 255 for plan in plans]


def evaluate(model_dir, n=200, seed=0, steps=None, cfg=None, scheduler=None, device="cpu", *, two_object=True,
             batch_size=25, refiner=None, refiner_start=None, threads=None) -> dict:
    """Generate n held-out prompts (seeds seed*100000+i) and return per-attribute accuracies and exact match; the
    model's default refiner (diffcli.json) takes part unless `refiner` names another or "none"."""
    from diffcli import refiner as refiners

    d = defaults(model_dir)
    steps, cfg, scheduler = steps or d["steps"], cfg if cfg is not None else d["cfg"], scheduler or d["scheduler"]
    name = refiner or refiners.default_refiner(d, model_dir)
    name = None if name == refiners.NO_REFINER else name
    start = (refiner_start or d.get("refiner_start", 0.8)) if name else None
    items = prompts(n, seed, two_object)
    common = dict(model=str(model_dir), steps=steps, cfg=cfg, scheduler=scheduler, device=device, threads=threads,
                  width=world.SIZE, height=world.SIZE, refiner=name or refiners.NO_REFINER, refiner_start=start)
    acc, t0 = defaultdict(list), time.time()
    values = [dict(common, prompt=text, seed=seed * SEED_STRIDE + i) for i, (text, _) in enumerate(items)]
    for (_, scene), image in zip(items, _images("txt2img", values, batch_size)):
        _judge(acc, scene, image)
    return {"model": str(model_dir), "n": n, "seed": seed, "steps": steps, "cfg": cfg, "scheduler": scheduler,
            "refiner": name, "refiner_start": start, "device": str(device), "seconds": round(time.time() - t0, 1),
            "accuracy": _means(acc)}


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


def evaluate_upscaler(model_dir, n=32, seed=0, steps=None, noise_level=None, scheduler=None, device="cpu",
                      threads=None) -> dict:
    """Upscale n held-out 32 px scenes x4 and compare with the true 128 px render: mean PSNR (bicubic alongside)
    and the judge's accuracy on the upscaled images."""
    from PIL import Image

    from diffcli.bench import psnr

    d = defaults(model_dir)
    steps, scheduler = steps or d["steps"], scheduler or d["scheduler"]
    noise_level = d["noise_level"] if noise_level is None else noise_level
    scenes = [s for _, s in prompts(n, seed)]
    truth = world.render(world.to_tensors(scenes)).permute(0, 2, 3, 1).numpy()  # n x 128 x 128 x 3 in [0, 1]
    small = torch.nn.functional.interpolate(torch.from_numpy(truth).permute(0, 3, 1, 2), scale_factor=0.25, mode="area")
    lows = [Image.fromarray(np.round(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for x in small]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="diffcli-eval-") as folder:
        for i, low in enumerate(lows):
            low.save(f"{folder}/{i}.png")
        values = [dict(input=f"{folder}/{i}.png", prompt="", model=str(model_dir), steps=steps, cfg=1.0,
                       scheduler=scheduler, noise_level=noise_level, tile=0, device=device, threads=threads,
                       seed=seed * SEED_STRIDE + i)
                  for i in range(n)]
        images = _images("upscale", values)
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
