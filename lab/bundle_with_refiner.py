"""Bundle a trained base model with a refiner that shares its text encoder (ensemble of expert denoisers).

`python -m lab.bundle_with_refiner BASE REFINER START OUT`: OUT/tiny-shapes is BASE (a training run's
tiny-shapes folder) whose diffcli.json names `tiny-shapes-refiner` as its refiner from START on; OUT/tiny-shapes-refiner
is REFINER (e.g. the bundled tiny-shapes) without text encoder and tokenizer, so it reads BASE's prompt embeddings
(its model_index names none: diffcli loads it as an "sd-refiner", plain diffusers with text_encoder=/tokenizer= from
BASE). lab/NOTEBOOK.md records how the bundled pair was made.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

BASE, REFINER = "tiny-shapes", "tiny-shapes-refiner"


def main(argv=None):
    """Check the inputs, then write OUT's two folders via a draft folder; bad input exits 2 with one line."""
    ap = argparse.ArgumentParser(prog="python -m lab.bundle_with_refiner", description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("refiner", type=Path)
    ap.add_argument("start", type=float, help="fraction of the schedule before the refiner takes over, 0 to 1")
    ap.add_argument("out", type=Path, help="a folder to create (e.g. /tmp/bundle), then copy into diffcli/bundled")
    args = ap.parse_args(argv)
    if not 0 < args.start < 1:
        ap.error(f"START must be between 0 and 1 (exclusive), got {args.start}")
    for folder in (args.base, args.refiner):
        if not (folder / "unet" / "config.json").is_file() or not (folder / "diffcli.json").is_file():
            ap.error(f"{folder} is not a tiny-shapes model folder (unet/config.json and diffcli.json)")
    if args.out.exists():
        ap.error(f"{args.out} exists; choose a new folder")
    base_dim = json.loads((args.base / "text_encoder" / "config.json").read_text())["hidden_size"]
    if json.loads((args.refiner / "unet" / "config.json").read_text())["cross_attention_dim"] != base_dim:
        ap.error(f"{args.refiner}'s UNet cannot read {args.base}'s text encoder (width {base_dim})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draft = Path(tempfile.mkdtemp(prefix=".draft-", dir=args.out.parent))
    shutil.copytree(args.base, draft / BASE, ignore=shutil.ignore_patterns("log_*"))
    defaults = json.loads((args.refiner / "diffcli.json").read_text())  # the refiner's sampler settings stay the pair's
    defaults.update(description="Tiny text-to-image model of coloured shapes trained by diffcli; tiny-shapes-refiner "
                                "finishes its images (docs/bundled-model.md)", refiner=REFINER, refiner_start=args.start)
    (draft / BASE / "diffcli.json").write_text(json.dumps(defaults, indent=1))
    shutil.copytree(args.refiner, draft / REFINER, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    index = json.loads((draft / REFINER / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None])
    (draft / REFINER / "model_index.json").write_text(json.dumps(index, indent=2))
    (draft / REFINER / "diffcli.json").write_text(json.dumps({
        "description": f"Low-noise expert of {BASE}: finishes its images from --refiner-start {args.start} on, "
                       f"reading {BASE}'s text encoder (docs/bundled-model.md)"}, indent=1))
    draft.rename(args.out)


if __name__ == "__main__":
    main()
