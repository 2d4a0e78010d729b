"""Which steps decide a shape the map alone must give: `python -m lab.control_phase --kinds small-square --at 0-120`.

For `lab.control_check`'s held-out one-object scenes of the kinds named, `diffcli txt2img` draws each from its
colour-only prompt with its canny map (the bundled ControlNet, the model's defaults), except that, while the
timestep is in [LO, HI), the refiner's UNet reads the embedding of the prompt that names the shape (`--swap
colour-then-shape`); `--swap shape-then-colour` is the reverse (the base hears the shape, the refiner in [LO, HI)
does not). Prints how many of each kind the judge reads right. A probe: it patches diffcli.refiner in-process.
"""

import argparse
import json
import tempfile

import numpy as np
import torch
from PIL import Image

from diffcli import refiner
from diffcli.shapes import SEED_STRIDE, evaluate, judge, world
from lab.control_check import scenes
from lab.train_control import BUNDLED, kinds


def probe(wanted, at=(0, 1000), swap="colour-then-shape", n=200, seed=0, model=None, threads=2) -> dict:
    """Right shapes per kind (`wanted`: (size, shape) index pairs) when the refiner's prompt is swapped in `at`."""
    from transformers import CLIPTextModel, CLIPTokenizer

    base = BUNDLED / "tiny-shapes"
    tok, text = CLIPTokenizer.from_pretrained(base / "tokenizer"), CLIPTextModel.from_pretrained(base / "text_encoder")
    colour, shape = scenes(n, seed, "colour"), scenes(n, seed, "shape")
    said, other = (colour, shape) if swap == "colour-then-shape" else (shape, colour)
    chosen = [i for i, (_, s) in enumerate(colour) if (s.objects[0].size, s.objects[0].shape) in wanted]
    with torch.no_grad():
        swapped = {said[i][0]: text(tok([other[i][0]], padding="max_length", max_length=77,
                                        return_tensors="pt").input_ids)[0] for i in chosen}
    current, original = {}, refiner._converted_unet

    def converted(unet, config, base_scheduler, base_config, states):
        inner = original(unet, config, base_scheduler, base_config, states).forward

        def forward(sample, timestep, encoder_hidden_states=None, **kwargs):
            if at[0] <= float(timestep) < at[1]:  # the prompt half of [negative, prompt]
                encoder_hidden_states = encoder_hidden_states.clone()
                encoder_hidden_states[len(encoder_hidden_states) // 2:] = swapped[current["prompt"]]
            return inner(sample, timestep, encoder_hidden_states, **kwargs)
        return refiner._StandIn(forward, base_config)

    right = {f"{world.SIZES[a]}-{world.SHAPES[b]}": [] for a, b in wanted}
    refiner._converted_unet = converted
    try:
        with tempfile.TemporaryDirectory(prefix="control-phase-") as folder:
            t = world.to_tensors([colour[i][1] for i in chosen])
            for i, pixels in zip(chosen, world.render(t).permute(0, 2, 3, 1).numpy()):
                Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(f"{folder}/scene.png")
                current["prompt"] = said[i][0]
                unit = f"canny:{folder}/scene.png" + (f";model={model}" if model else "")
                image, = evaluate._images("txt2img", [dict(prompt=said[i][0], seed=seed * SEED_STRIDE + i,
                                                            model="tiny-shapes", device="cpu", threads=threads,
                                                            control=[unit])])
                o, found = colour[i][1].objects[0], judge.analyze(np.round(image * 255))["objects"]
                right[f"{world.SIZES[o.size]}-{world.SHAPES[o.shape]}"].append(
                    bool(found) and found[0]["shape"] == world.SHAPES[o.shape])
    finally:
        refiner._converted_unet = original
    return {"swap": swap, "at": list(at), "seed": seed, "model": model,
            "right": {k: f"{sum(v)}/{len(v)}" for k, v in right.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="small-square", metavar="SIZE-SHAPE,...")
    p.add_argument("--at", default="0-1000", metavar="LO-HI", help="timesteps where the refiner's prompt is swapped")
    p.add_argument("--swap", choices=("colour-then-shape", "shape-then-colour"), default="colour-then-shape")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a ControlNet folder (default: the bundled one)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    chosen = kinds(p, "--kinds", a.kinds.split(","))
    lo, _, hi = a.at.partition("-")
    if not (lo.isdigit() and hi.isdigit() and int(lo) < int(hi)):
        p.error(f"--at {a.at!r}: expected LO-HI, two timesteps with LO < HI")
    torch.set_num_threads(a.threads)
    print(json.dumps(probe(chosen, (int(lo), int(hi)), a.swap, a.n, a.seed, a.model, a.threads)))


if __name__ == "__main__":
    main()
