"""Draw a 4x4 grid of bundled tiny-shapes generations (its refiner included) with their captions:
docs/samples/tiny-shapes-grid.png (the model card's picture). `python -m lab.eval_sample_grid` after a retrain."""

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffcli.shapes.evaluate import defaults, generate, load, load_refiner, prompts

ROOT = Path(__file__).resolve().parents[1]
MODEL, OUT = ROOT / "diffcli" / "bundled" / "tiny-shapes", ROOT / "docs" / "samples" / "tiny-shapes-grid.png"
CELL, TEXT = 128, 40


def main():
    """Generate 16 held-out prompts (seeds 0..15) at the model's defaults and save the captioned grid."""
    d = defaults(MODEL)
    pipe = load(MODEL, d["scheduler"], "cpu")
    items = prompts(16, seed=1)
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(16)]
    images = generate(pipe, [t for t, _ in items], gens, d["steps"], d["cfg"], load_refiner(MODEL, "cpu"))
    grid = Image.new("RGB", (4 * CELL, 4 * (CELL + TEXT)), "white")
    draw = ImageDraw.Draw(grid)
    for i, ((text, _), img) in enumerate(zip(items, images)):
        x, y = (i % 4) * CELL, (i // 4) * (CELL + TEXT)
        grid.paste(Image.fromarray((np.asarray(img) * 255).round().astype(np.uint8)), (x, y))
        draw.multiline_text((x + 2, y + CELL + 1), "\n".join(textwrap.wrap(text, 24)[:3]), fill="black", spacing=0)
    grid.save(OUT, optimize=True)
    print(OUT)


if __name__ == "__main__":
    main()
