"""Where does a two-object layout come from: the caption or the seed? (lab/NOTEBOOK.md, "What limits accuracy")

For 16 seeds, prints where the red object lands against the blue one (L/R/U/D, ? if the judge misses one or neither
axis dominates) for six captions that differ only in relation and word order; then, for the first caption, the same
with the starting noise carrying the trace (sqrt(alphas_cumprod[999]) of the latents) of a rendered scene with red
left and with red right, as the model's training schedule does at t=999 (SD's keeps 0.068; a zero-terminal-SNR one
none, so the two lines are the same). Last, how much the text encoder's output at each token changes when only the
relation word flips ("left of" -> "right of") against when only the second colour does ("blue" -> "green"): the
UNet can place the objects by the caption only if the tokens after the relation word carry it.
`python -m lab.relation_probe [MODEL_DIR]`
"""

import sys

import numpy as np
import torch

from diffcli.shapes import evaluate, judge, world
from lab.plain import load

CAPTIONS = ["a red circle left of a blue square on white", "a red circle right of a blue square on white",
            "a blue square left of a red circle on white", "a blue square right of a red circle on white",
            "a red circle above a blue square on white", "a red circle below a blue square on white"]


MARKS = {"left of": "L", "right of": "R", "above": "U", "below": "D"}


def order(image) -> str:
    """Where the red object sits relative to the blue one, by the judge's relation test."""
    found = judge.analyze(np.round(image * 255))["objects"]
    red = [o for o in found if o["colour"] == "red"]
    blue = [o for o in found if o["colour"] == "blue"]
    if not (red and blue):
        return "?"
    return next((mark for rel, mark in MARKS.items() if judge.relation_holds(red[0], blue[0], rel)), "?")


def traced_noise(pipe, red_x: float, seed: int) -> torch.Tensor:
    """Pure noise plus the t=999 trace of a red circle at x=red_x and a blue square mirrored, on white."""
    c = world.COLOUR_NAMES.index
    objects = [world.Obj(0, c("red"), 1, red_x, 64.0), world.Obj(1, c("blue"), 1, 128 - red_x, 64.0)]
    scene = world.Scene(c("white"), objects)
    with torch.no_grad():
        latents = pipe.vae.encode(world.render(world.to_tensors([scene])) * 2 - 1).latent_dist.mean
    ab = pipe.scheduler.alphas_cumprod[999]
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return ab.sqrt() * latents * pipe.vae.config.scaling_factor + (1 - ab).sqrt() * noise


def token_changes(pipe, caption: str, other: str) -> str:
    """Relative change of the text encoder's output, token by token, between two captions of equal token count."""
    ids = pipe.tokenizer([caption, other], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = pipe.text_encoder(ids)[0]
    words = pipe.tokenizer.convert_ids_to_tokens(ids[1])
    n = int((ids[0] != ids[0, -1]).sum()) + 2  # through the end-of-text token and the first padding token
    return " ".join(f"{w.removesuffix('</w>')}:{((a[j] - b[j]).norm() / a[j].norm()).item():.3f}"
                    for j, w in enumerate(words[1:n], 1))


def main(model="diffcli/bundled/tiny-shapes"):
    d = evaluate.defaults(model)
    pipe = load(model, d["scheduler"])
    run = dict(num_inference_steps=d["steps"], guidance_scale=d["cfg"], height=128, width=128, output_type="np")
    for caption in CAPTIONS:
        images = pipe([caption] * 16, generator=[torch.Generator().manual_seed(i) for i in range(16)], **run).images
        print(f"{caption:62s} {''.join(order(im) for im in images)}")
    for red_x, name in ((32.0, "red left"), (96.0, "red right")):
        marks = [order(pipe(CAPTIONS[0], latents=traced_noise(pipe, red_x, i),
                            generator=torch.Generator().manual_seed(1000 + i), **run).images[0]) for i in range(16)]
        print(f"{CAPTIONS[0] + ', trace ' + name:62s} {''.join(marks)}")
    print("text encoder output change, 'left of' -> 'right of':", token_changes(pipe, CAPTIONS[0], CAPTIONS[1]))
    print("text encoder output change, 'blue' -> 'green':      ",
          token_changes(pipe, CAPTIONS[0], CAPTIONS[0].replace("blue", "green")))


if __name__ == "__main__":
    main(*sys.argv[1:])
