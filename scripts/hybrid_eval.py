"""Judge two base models sharing one sampling run: HIGH predicts at timesteps >= T, LOW below T.

`python scripts/hybrid_eval.py HIGH LOW T [--seed S --n N]` prints `diffcli eval`'s JSON with HIGH's defaults
(sampler, steps, cfg). LOW's prediction is converted to HIGH's schedule as `--distill-below` does in training
(`train.Teacher`), so the figure is the mark a student distilled from LOW below T aims at. Each text encoder reads
the prompt for its own UNet. docs/bundled-model.md ("Sixth fine-tune") records what it showed.
"""

import argparse
import json
import types
from pathlib import Path

import torch

from diffcli.shapes import evaluate, models, train


def hybrid_pipeline(high: Path, low: Path, below: int):
    """HIGH's pipeline whose text encoder returns both encoders' states side by side and whose UNet hands timesteps
    below `below` to LOW."""
    pipe = evaluate.load(high, None, "cpu")
    sched = models.noise_scheduler(models.saved_schedule(high))
    teacher = train.Teacher(low, sched, torch.device("cpu"))
    text, unet = pipe.text_encoder.forward, pipe.unet.forward

    def both_texts(self, ids, *args, **kwargs):
        return (torch.cat([text(ids)[0], teacher.te(ids)[0]], dim=-1),)

    def split_unet(self, x, t, encoder_hidden_states, **kwargs):
        own, other = encoder_hidden_states.chunk(2, dim=-1)
        if int(t) >= below:
            return unet(x, t, encoder_hidden_states=own, **kwargs)
        steps = torch.full((x.shape[0],), int(t), dtype=torch.long)
        x0, noise = teacher.targets(x, steps, states=other)
        out = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, steps)
        return (out,)

    pipe.text_encoder.forward = types.MethodType(both_texts, pipe.text_encoder)
    pipe.unet.forward = types.MethodType(split_unet, pipe.unet)
    return pipe


def main(argv=None):
    """Judge the hybrid and print the JSON; a folder without a UNet exits 2 with one line."""
    ap = argparse.ArgumentParser(prog="python scripts/hybrid_eval.py", description=__doc__.splitlines()[0])
    ap.add_argument("high", type=Path, help="model folder (e.g. RUN/tiny-shapes) used at high noise")
    ap.add_argument("low", type=Path, help="model folder used below T")
    ap.add_argument("below", type=int, metavar="T")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args(argv)
    for folder in (a.high, a.low):
        if not (folder / "unet" / "config.json").is_file():
            ap.error(f"{folder} is not a diffusers model folder (no unet/config.json)")
    result = evaluate.evaluate(a.high, a.n, a.seed, pipe=hybrid_pipeline(a.high, a.low, a.below))
    print(json.dumps({**result, "model": f"{a.high} (t >= {a.below}) + {a.low}"}))


if __name__ == "__main__":
    main()
