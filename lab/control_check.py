"""Judge tiny-shapes' bundled ControlNet: `OMP_NUM_THREADS=1 python -m lab.control_check --n 200 --seed 0`.

For n held-out one-object scenes (`diffcli eval`'s, seeds not drawn in training), render the scene, save it as a
PNG, and make `diffcli txt2img PROMPT --control canny:SCENE.png` through diffcli's own plan and run (the unit's map
made by diffcli's canny at plan time, the default ControlNet and refiner, the model's defaults). The prompt names
the colour and background only (`--prompt colour`), so shape, size and position can come from the map alone; the
judge reads the image and compares with the scene: shape, position (nearest anchor, the judge's tolerance), colour,
size, background, one object. `--source outline` makes the maps of outline drawings of the scenes (dark lines on
a light ground) instead. `--weight 0` gives the uncontrolled images of the same prompts and seeds.
"""

import argparse
import dataclasses
import json
import math
import random
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
from PIL import Image

from diffcli.shapes import SEED_STRIDE, evaluate, judge, world

KEYS = ("shape", "position", "colour", "size", "background", "count", "exact")


UNSAID = {"colour": ("shape0", "size0", "position"), "shape": ("size0", "position"), "other": ("size0", "position")}


def scenes(n: int, seed: int, prompt: str) -> list:
    """(caption, scene) of `diffcli eval`'s held-out one-object scenes; `colour` captions leave shape, size and
    position unsaid (the map's to give), `shape` ones size and position (the issue's "a red star" with an outline),
    `other` ones name another shape than the map's (which one wins), `full` ones say everything."""
    items = evaluate.prompts(n, seed, two_object=False)
    if prompt == "full":
        return items
    rng = random.Random(20_000 + seed)
    captions = []
    for _, s in items:
        said = s
        if prompt == "other":
            o = s.objects[0]
            other = rng.choice([k for k in range(len(world.SHAPES)) if k != o.shape])
            said = dataclasses.replace(s, objects=[dataclasses.replace(o, shape=other)])
        captions.append((world.caption(rng, said, full=True, train=False, drop=UNSAID[prompt]), s))
    return captions


def scores(scene, image: np.ndarray) -> dict:
    """Whether the image's one object has the scene's shape, position, colour and size, and its background."""
    found = judge.analyze(np.round(image * 255))
    o, want = (found["objects"] or [{}])[0], scene.objects[0]
    right = {"shape": o.get("shape") == world.SHAPES[want.shape],
             "position": o.get("position") == world.POSITION_NAMES[scene.position],
             "colour": o.get("colour") == world.COLOUR_NAMES[want.colour],
             "size": o.get("size") == world.SIZES[want.size],
             "background": found["background"] == world.COLOUR_NAMES[scene.background],
             "count": len(found["objects"]) == 1}
    right["exact"] = all(right.values())
    return right


def moved(items: list, offset: float, seed: int) -> list:
    """`items` with each object `offset` px from its place in a random direction, instead of the world's few px of
    jitter: off the five places where every training scene has one object, still nearest the same one while `offset`
    < 16 (the places are 32 px apart)."""
    rng, out = random.Random(30_000 + seed), []
    for text, s in items:
        (x, y), angle = world.POSITIONS[world.POSITION_NAMES[s.position]], rng.uniform(0, 2 * math.pi)
        o = dataclasses.replace(s.objects[0], x=x + offset * math.cos(angle), y=y + offset * math.sin(angle))
        out.append((text, dataclasses.replace(s, objects=[o])))
    return out


def check(n=200, seed=0, prompt="colour", weight=1.0, model="tiny-shapes", threads=1, extra=None, source="scene",
          guess_mode=False, offset=0.0) -> dict:
    """Generate and judge n controlled images, the maps made from the rendered scenes or (`outline`) from outline
    drawings of them, each object moved `offset` px off its place; returns the mean of each score, and the shape's
    per kind of object (`shape_by_kind`)."""
    from lab.train_control import outline_drawing

    items = scenes(n, seed, prompt)
    if offset:
        items = moved(items, offset, seed)
    acc, kinds, t0 = defaultdict(list), defaultdict(list), time.time()
    with tempfile.TemporaryDirectory(prefix="control-check-") as folder:
        t = world.to_tensors([s for _, s in items])
        drawn = outline_drawing(t, random.Random(seed)) if source == "outline" else world.render(t)
        rendered = drawn.permute(0, 2, 3, 1).numpy()
        values = []
        for i, ((text, _), pixels) in enumerate(zip(items, rendered)):
            Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(f"{folder}/scene{i}.png")
            unit = f"canny:{folder}/scene{i}.png;weight={weight:g}" + (f";{extra}" if extra else "")
            values.append(dict(prompt=text, seed=seed * SEED_STRIDE + i, model=model, device="cpu", threads=threads,
                               control=[unit], guess_mode=guess_mode))
        for (_, scene), image in zip(items, evaluate._images("txt2img", values)):
            for key, value in scores(scene, image).items():
                acc[key].append(value)
            o = scene.objects[0]
            kinds[f"{world.SIZES[o.size]} {world.SHAPES[o.shape]}"].append(acc["shape"][-1])
    return {"n": n, "seed": seed, "prompt": prompt, "source": source, "weight": weight, "model": model, "extra": extra,
            "guess_mode": guess_mode, "offset": offset,
            "seconds": round(time.time() - t0, 1), "accuracy": {k: round(float(np.mean(acc[k])), 4) for k in KEYS},
            "shape_by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(kinds.items())}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", choices=("colour", "shape", "other", "full"), default="colour")
    p.add_argument("--source", choices=("scene", "outline"), default="scene", help="the image the canny map is made of")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--model", default="tiny-shapes")
    p.add_argument("--unit", default=None, help="more unit options, e.g. 'model=DIR' or 'end=0.5'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guess-mode", action="store_true", help="the ControlNet sees no prompt (diffcli's --guess-mode)")
    p.add_argument("--offset", type=float, default=0.0,
                   help="put each object this many px (under 16) from its place in the world, in a random direction; "
                        "0: as drawn (within 4 px)")
    a = p.parse_args(argv)
    if not 0 <= a.offset < 16:
        p.error(f"--offset {a.offset:g}: expected at least 0 and under 16 px (16 or more can be nearer another place)")
    result = check(a.n, a.seed, a.prompt, a.weight, a.model, a.threads, a.unit, a.source, a.guess_mode, a.offset)
    print(json.dumps(result), flush=True)
    print(" ".join(f"{k} {v:.3f}" for k, v in result["accuracy"].items()), file=sys.stderr)


if __name__ == "__main__":
    main()
