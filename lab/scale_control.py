"""Scale a ControlNet's residuals: `python -m lab.scale_control SRC DST --scale S`.

Multiplies the output ("zero") convolutions, `controlnet_down_blocks.*` and `controlnet_mid_block`, weights and
biases, by S: the saved ControlNet at weight w acts as SRC at weight w x S, and weight 0 is still no control.
Training grows those convolutions from zero slowly; the scale is chosen on held-out scenes of another seed than the
one the model card reports (lab/NOTEBOOK.md).
"""

import argparse
from pathlib import Path

import torch

OUTPUTS = ("controlnet_down_blocks.", "controlnet_mid_block.")


def scale(src: Path, dst: Path, factor: float) -> Path:
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(src, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith(OUTPUTS):
                parameter.mul_(factor)
    net.to(torch.float16).save_pretrained(dst, safe_serialization=True)
    return dst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--scale", type=float, required=True)
    a = p.parse_args(argv)
    print(scale(a.src, a.dst, a.scale))


if __name__ == "__main__":
    main()
