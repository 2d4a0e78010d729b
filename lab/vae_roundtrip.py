"""Judge a VAE's own round trip of rendered one-object scenes: the best a UNet could do with that decoder.

Usage: python -m lab.vae_roundtrip VAE_FOLDER [--n 1500] [--seed 5]
Encodes each render, decodes the latent mean, and prints one JSON line per (size, shape) and one for all: the
share of round trips the judge reads fully right (every attribute of the scene). lab/NOTEBOOK.md records runs.
"""

import argparse
import collections
import json
import random
from pathlib import Path

import torch

from diffcli.shapes import world
from diffcli.shapes.evaluate import judged


def roundtrip_accuracy(vae_folder, n: int = 1500, seed: int = 5, batch: int = 100) -> dict:
    """{"size shape": (right, count)} plus "all", for n random one-object scenes."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, False) for _ in range(n)]
    counts = collections.defaultdict(lambda: [0, 0])
    with torch.inference_mode():
        for i in range(0, n, batch):
            part = scenes[i : i + batch]
            images = world.render(world.to_tensors(part))
            decoded = ((vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
            for scene, image in zip(part, decoded):
                right = judged(scene, image.permute(1, 2, 0).numpy())["exact"]
                obj = scene.objects[0]
                for key in (f"{world.SIZES[obj.size]} {world.SHAPES[obj.shape]}", "all"):
                    counts[key][0] += right
                    counts[key][1] += 1
    return {key: tuple(value) for key, value in sorted(counts.items())}


def main():
    """Print the round trip's accuracy per size and shape."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vae", help="a diffusers AutoencoderKL folder, e.g. diffcli/bundled/tiny-shapes/vae")
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=5)
    a = ap.parse_args()
    if not (Path(a.vae) / "config.json").is_file():
        ap.error(f"{a.vae} is not a diffusers VAE folder (no config.json)")
    if a.n < 1:
        ap.error(f"--n must be at least 1, got {a.n}")
    for key, (right, count) in roundtrip_accuracy(a.vae, a.n, a.seed).items():
        print(json.dumps({"objects": key, "n": count, "all_right": round(right / count, 3)}))


if __name__ == "__main__":
    main()
