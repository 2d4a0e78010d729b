"""Scale a ControlNet's residuals: `python -m lab.scale_control SRC DST --scale S` (or `--scales A,B,...`).

Multiplies the output ("zero") convolutions, `controlnet_down_blocks.*` and `controlnet_mid_block`, weights and
biases, by S: the saved ControlNet at weight w acts as SRC at weight w x S, and weight 0 is still no control.
`--scales` gives one factor per output instead, the down blocks in order then the mid block (tiny-shapes-control:
6 + 1; the first three are at the latent's full resolution and half of it, where small shapes' edges are).
Training grows those convolutions from zero slowly; the scale is chosen on held-out scenes of another seed than the
one the model card reports (lab/NOTEBOOK.md).
"""

import argparse
from pathlib import Path

import torch

OUTPUTS = ("controlnet_down_blocks.", "controlnet_mid_block.")


def factor_of(name: str, factors: list[float], blocks: int) -> float:
    """The factor for output parameter `name`: factors[i] for down block i, factors[blocks] for the mid block."""
    if name.startswith(OUTPUTS[1]):
        return factors[blocks]
    return factors[int(name.split(".")[1])]


def scale(src: Path, dst: Path, factor: float | list[float]) -> Path:
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(src, torch_dtype=torch.float32)
    blocks = len(net.controlnet_down_blocks)
    factors = factor if isinstance(factor, list) else [factor] * (blocks + 1)
    if len(factors) != blocks + 1:
        raise SystemExit(f"--scales needs {blocks + 1} factors ({blocks} down blocks, then the mid block)")
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith(OUTPUTS):
                parameter.mul_(factor_of(name, factors, blocks))
    net.to(torch.float16).save_pretrained(dst, safe_serialization=True)
    return dst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--scale", type=float)
    which.add_argument("--scales", help="one factor per output, comma-separated: the down blocks, then the mid block")
    a = p.parse_args(argv)
    print(scale(a.src, a.dst, a.scale if a.scales is None else [float(f) for f in a.scales.split(",")]))


if __name__ == "__main__":
    main()
