"""Measure `--hires 2` on the bundled tiny-shapes: which --hires-strength / --hires-steps keep its objects.

Usage: python -m lab.hires_defaults [--n 12] [--strengths 0.2,0.3,...] [--steps 14] [--upscalers latent,lanczos]
                                    [--scale 2]
For n held-out captions (diffcli.shapes.evaluate.prompts, half one-object, half two-object) it runs
`diffcli txt2img CAPTION --seed i --hires SCALE ...` through the CLI, reads the larger result (box-filtered to 128 px, the
size the judge's thresholds are for) with the judge and prints
one JSON line per setting: the share of images whose object count is right, whose object colours are right, that the
judge reads fully right (`exact`), and that keep the first pass's objects (same count and colours as the 128 px image
the hires pass started from: `--refiner none`, as a hires run's first pass is). docs/bundled-model.md ("What it does not know") records runs.
"""

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import warnings

import numpy as np
from PIL import Image

from diffcli.cli import main
from diffcli.shapes import judge, world
from diffcli.shapes.evaluate import prompts


def make(caption: str, seed: int, path: Path, *extra: str) -> dict:
    """The judge's reading of the image `diffcli txt2img` makes (quiet, in this process: the pipeline stays cached)."""
    with contextlib.redirect_stdout(io.StringIO()):  # the path diffcli prints
        code = main(["txt2img", caption, "--seed", str(seed), "-o", str(path), "--overwrite", "-q", *extra])
    assert code == 0, f"diffcli exited {code}"
    image = Image.open(path).convert("RGB")  # judged at the world's size: its area thresholds are 128 px ones
    return judge.analyze(np.asarray(image.resize((world.SIZE, world.SIZE), Image.BOX), dtype=np.float32))


def objects(found: dict) -> list:
    """(colour, shape) of each object, sorted: what 'kept' compares."""
    return sorted((o["colour"], o["shape"]) for o in found["objects"])


def main_(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="seed of the caption draw")
    ap.add_argument("--strengths", default="0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--steps", default="14", help="comma list of --hires-steps")
    ap.add_argument("--upscalers", default="latent,lanczos")
    ap.add_argument("--scale", default="2", help="--hires SCALE")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore", RuntimeWarning)  # the judge's 0/0 on a flat image
    items = prompts(a.n, a.seed)
    with tempfile.TemporaryDirectory() as folder:
        first = [make(text, i, Path(folder) / f"first-{i}.png", "--refiner", "none") for i, (text, _) in enumerate(items)]
        wants = [judge.truth(scene) for _, scene in items]
        base = [judge.score(f, w) for f, w in zip(first, wants)]
        print(json.dumps({"setting": "first pass (128 px, --refiner none)", "n": a.n,
                          "count": np.mean([b["count"] for b in base]).round(3),
                          "exact": np.mean([b["exact"] for b in base]).round(3)}), flush=True)
        for upscaler in a.upscalers.split(","):
            for steps in a.steps.split(","):
                for strength in a.strengths.split(","):
                    rows = []
                    for i, (text, _) in enumerate(items):
                        found = make(text, i, Path(folder) / f"hires-{i}.png", "--hires", a.scale, "--hires-upscaler", upscaler,
                                     "--hires-strength", strength, "--hires-steps", steps)
                        score = judge.score(found, wants[i])
                        colours = sorted(o["colour"] for o in found["objects"])
                        asked = sorted(o.get("colour", "?") for o in wants[i]["objects"])
                        rows.append({"count": score["count"], "colours": colours == asked, "exact": score["exact"],
                                     "kept": objects(found) == objects(first[i]), "objects": len(found["objects"])})
                    print(json.dumps({"scale": float(a.scale), "upscaler": upscaler, "hires_steps": int(steps), "hires_strength": float(strength),
                                      "n": a.n, **{k: round(float(np.mean([r[k] for r in rows])), 3)
                                                   for k in ("count", "colours", "exact", "kept", "objects")}}), flush=True)


if __name__ == "__main__":
    main_()
