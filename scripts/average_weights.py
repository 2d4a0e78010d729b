"""Average the UNet and text encoder of two fine-tunes of one model ("model soup", Wortsman et al. 2022).

`python scripts/average_weights.py A B FRACTION OUT`: OUT is a copy of model folder A whose unet/ and
text_encoder/ weights are (1 - FRACTION) * A + FRACTION * B, stored in A's dtype. A and B must share the
architecture (both fine-tuned from the same weights). docs/bundled-model.md records where the bundled model used it.
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def fail(message: str):
    """One line on stderr, exit code 2."""
    print(message, file=sys.stderr)
    sys.exit(2)


def main(a: str, b: str, fraction: str, out: str):
    """Write the averaged model folder."""
    a, b, out, w = Path(a), Path(b), Path(out), float(fraction)
    if out.exists():
        fail(f"{out} exists; choose a new folder")
    shutil.copytree(a, out)
    for name in WEIGHTS:
        x, y = load_file(a / name), load_file(b / name)
        if x.keys() != y.keys() or any(x[k].shape != y[k].shape for k in x):
            shutil.rmtree(out)
            fail(f"{name}: {a} and {b} have different architectures")
        save_file({k: (x[k].float() * (1 - w) + y[k].float() * w).to(x[k].dtype) for k in x}, out / name,
                  metadata={"format": "pt"})


if __name__ == "__main__":
    if len(sys.argv) != 5:
        fail("usage: python scripts/average_weights.py A B FRACTION OUT")
    main(*sys.argv[1:])
