"""Measure the x4 upscaler on what users feed it: tiny-shapes outputs at 128 px, upscaled through the CLI.

Usage: python -m lab.upscaler_check [--model tiny-shapes-x4] [--n 24] [--mosaics 4] [--work DIR]

Makes n tiny-shapes images (`diffcli txt2img`, bundled model at its defaults, held-out prompts of
`diffcli.shapes.evaluate.prompts(n, 0)`, seeds 0..n-1), then `diffcli upscale`s each at the upscaler's defaults:
untiled with seeds 0 and 1, and with seed 0 in tiles of each `--tiles` size (default 32). Prints one JSON object with the three targets of
docs/bundled-model.md ("The x4 upscaler"):

- fidelity: mean absolute difference (0-255) between the input and the 512 px output box-averaged back to 128 px
  (target: every image <= 6);
- judge: share of images on which the pixel judge (diffcli/shapes/judge.py) reads the same background and objects
  (colour, shape, size, position) on the box-averaged output as on the input (target: 1.0);
- tiling: mean absolute difference (0-255, at 512 px) of tiled against untiled output, same seed, over the mean
  difference two seeds make untiled (target: below 0.2). `--mosaics K` does the same for the default tiling of
  large inputs on K mosaics of 6 inputs (384x256 px, over the 256 px automatic tiling threshold).
Run it with OMP_NUM_THREADS=1 beside other work: 7-8 minutes on one CPU core for the bundled model (5 when tiles were
sampled one by one; 22 for the first weights, whose attention made the mosaics slow).
docs/samples/x4-upscaler-check.jsonl holds the recorded runs.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

FIDELITY_MAX = 6.0  # 0-255, per image, box-averaged output against input
TILING_RATIO_MAX = 0.2  # tiled-vs-untiled difference over seed-vs-seed difference


def pixels(path) -> np.ndarray:
    """An image file as float RGB 0-255."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def box_down(image: np.ndarray, factor: int) -> np.ndarray:
    """Average each factor x factor block (PIL Image.BOX on an exact multiple)."""
    h, w, c = image.shape
    return image.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def reading(image: np.ndarray):
    """What the judge reads: the background and each object's colour, shape, size and position (sorted)."""
    from diffcli.shapes import judge

    found = judge.analyze(np.round(image))
    return found["background"], sorted((o["colour"], o["shape"], o["size"], o["position"]) for o in found["objects"])


def cli(*args) -> None:
    """Run one diffcli command in this process (the pipeline cache is shared between calls); its stdout (the saved
    path) goes to stderr, so stdout holds the report only; stop on failure."""
    from diffcli.cli import main

    with contextlib.redirect_stdout(sys.stderr):
        code = main([str(a) for a in args])
    if code:
        sys.exit(f"diffcli {' '.join(map(str, args))} failed with exit code {code}")


def make_inputs(folder: Path, n: int) -> list[Path]:
    """n tiny-shapes outputs at the bundled model's defaults (made once; reused when present)."""
    from diffcli.shapes.evaluate import prompts

    paths = []
    for i, (text, _) in enumerate(prompts(n, 0)):
        path = folder / f"in-{i:02d}.png"
        if not path.exists():
            cli("txt2img", text, "--seed", i, "-o", path, "--quiet")
        paths.append(path)
    return paths


def upscale(model: str, source: Path, out: Path, seed: int, tile: int | None) -> np.ndarray:
    """`diffcli upscale` at the model's defaults (tile None: the CLI's automatic choice)."""
    if out.exists():
        out.unlink()
    cli("upscale", source, "--model", model, "--seed", seed, "-o", out, "--quiet",
        *(["--tile", tile] if tile is not None else []))
    return pixels(out)


UNTILED: dict = {}  # (model, source, seed) -> untiled output, made once for every tile size


def untiled_output(model: str, source: Path, out: Path, seed: int) -> np.ndarray:
    if (model, source, seed) not in UNTILED:
        UNTILED[model, source, seed] = upscale(model, source, out, seed, 0)
    return UNTILED[model, source, seed]


def tiling(model: str, sources: list[Path], work: Path, tile: int | None, tag: str) -> tuple[dict, dict]:
    """Tiled vs untiled (seed 0) and seed 0 vs seed 1 (untiled), mean absolute differences at the output size, as a
    report; and the untiled seed-0 outputs by source."""
    tiled, seeds, untiled = [], [], {}
    for k, source in enumerate(sources):
        whole = untiled_output(model, source, work / f"{tag}-{k:02d}-s0.png", 0)
        other = untiled_output(model, source, work / f"{tag}-{k:02d}-s1.png", 1)
        cut = upscale(model, source, work / f"{tag}-{k:02d}-tiled{tile or ''}.png", 0, tile)
        tiled.append(np.abs(cut - whole).mean())
        seeds.append(np.abs(other - whole).mean())
        untiled[source] = whole
    ratio = float(np.mean(tiled) / max(np.mean(seeds), 1e-9))
    return {"tiled_vs_untiled": round(float(np.mean(tiled)), 3), "seed0_vs_seed1": round(float(np.mean(seeds)), 3),
            "ratio": round(ratio, 3), "ok": ratio < TILING_RATIO_MAX,
            "per_image": [[round(float(a), 2), round(float(b), 2)] for a, b in zip(tiled, seeds)]}, untiled


def mosaic(paths: list[Path], out: Path) -> Path:
    """Six inputs side by side, 3 x 2 (384 x 256 px)."""
    tiles = [Image.open(p).convert("RGB") for p in paths]
    sheet = Image.new("RGB", (3 * 128, 2 * 128))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % 3) * 128, (i // 3) * 128))
    sheet.save(out)
    return out


def main(argv=None) -> None:
    """Make the inputs, upscale them, print the report as one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-shapes-x4", help="x4 upscaler: bundled name or folder")
    ap.add_argument("--n", type=int, default=24, help="tiny-shapes outputs to upscale")
    ap.add_argument("--mosaics", type=int, default=4,
                    help="384x256 mosaics for the default (automatic) tiling; 0: skip")
    ap.add_argument("--tiles", default="32", help="comma-separated --tile sizes to compare with the untiled output")
    ap.add_argument("--work", type=Path, default=Path("upscaler-check"), help="folder for inputs and outputs")
    a = ap.parse_args(argv)
    import torch

    torch.manual_seed(0)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    inputs = make_inputs(a.work, a.n)
    sizes = [int(t) for t in a.tiles.split(",")]
    tiled = {size: tiling(a.model, inputs, a.work, size, "x4") for size in sizes}
    untiled = tiled[sizes[0]][1]
    fidelity, same = [], []
    for source in inputs:
        x, down = pixels(source), box_down(untiled[source], 4)
        fidelity.append(float(np.abs(down - x).mean()))
        same.append(reading(x) == reading(down))
    report = {
        "model": a.model, "n": a.n,
        "fidelity_mad": {"mean": round(float(np.mean(fidelity)), 3), "max": round(max(fidelity), 3),
                         "ok": max(fidelity) <= FIDELITY_MAX, "per_image": [round(v, 2) for v in fidelity]},
        "judge_same": {"share": round(float(np.mean(same)), 3), "ok": all(same),
                       "differ": [i for i, s in enumerate(same) if not s]},
        **{f"tiling_tile{size}": report for size, (report, _) in tiled.items()},
    }
    if a.mosaics:
        sheets = [mosaic([inputs[(6 * k + j) % len(inputs)] for j in range(6)], a.work / f"mosaic-{k}.png")
                  for k in range(a.mosaics)]
        report["tiling_default_large"] = tiling(a.model, sheets, a.work, None, "mosaic")[0]
    report["minutes"] = round((time.time() - t0) / 60, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
