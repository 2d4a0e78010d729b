"""Average the UNet and text encoder of two fine-tunes of one model ("model soup", Wortsman et al. 2022).

`python -m lab.average_weights A B FRACTION OUT` (from the repo root): OUT is a copy of model folder A whose unet/ and
text_encoder/ weights are (1 - FRACTION) * A + FRACTION * B, stored in A's dtype. A and B must share the
architecture (both fine-tuned from the same weights). lab/NOTEBOOK.md records where the bundled model used it.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def main(argv=None):
    """Check every input, then write the averaged model folder; bad input exits 2 with one line."""
    ap = argparse.ArgumentParser(prog="python -m lab.average_weights", description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("fraction", type=float, help="share of B, 0 to 1")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    if not 0 <= args.fraction <= 1:
        ap.error(f"FRACTION must be between 0 and 1, got {args.fraction}")
    if args.out.exists():
        ap.error(f"{args.out} exists; choose a new folder")
    averaged = {}
    for name in WEIGHTS:
        missing = [str(p) for p in (args.a / name, args.b / name) if not p.is_file()]
        if missing:
            ap.error(f"not a model folder with {name}: {', '.join(missing)}")
        x, y = load_file(args.a / name), load_file(args.b / name)
        if x.keys() != y.keys() or any(x[k].shape != y[k].shape for k in x):
            ap.error(f"{name}: {args.a} and {args.b} have different architectures")
        w = args.fraction
        averaged[name] = {k: (x[k].float() * (1 - w) + y[k].float() * w).to(x[k].dtype) for k in x}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draft = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=f".{args.out.name}-")) / "model"
    shutil.copytree(args.a, draft)
    for name, tensors in averaged.items():
        save_file(tensors, draft / name, metadata={"format": "pt"})
    draft.rename(args.out)  # appears whole or not at all
    draft.parent.rmdir()


if __name__ == "__main__":
    main()
