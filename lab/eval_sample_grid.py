"""Draw a 4x4 grid of bundled tiny-shapes generations (its refiner included) with their captions:
docs/samples/tiny-shapes-grid.png (the model card's picture). `python -m lab.eval_sample_grid` after a retrain."""

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffcli.shapes.evaluate import _images, defaults, prompts

ROOT = Path(__file__).resolve().parents[1]
MODEL, OUT = ROOT / "diffcli" / "bundled" / "tiny-shapes", ROOT / "docs" / "samples" / "tiny-shapes-grid.png"
CELL, TEXT = 128, 40


def main():
    """Generate 16 held-out prompts (seeds 0..15) at the model's defaults and save the captioned grid."""
    d = defaults(MODEL)
    items = prompts(16, seed=1)
    values = [dict(prompt=text, model=str(MODEL), seed=i, device="cpu", steps=d["steps"], cfg=d["cfg"],
                   scheduler=d["scheduler"]) for i, (text, _) in enumerate(items)]
    images = _images("txt2img", values, batch_size=16)  # diffcli's own plan and run, its refiner included
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
