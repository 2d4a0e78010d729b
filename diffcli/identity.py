"""An image's identity, and the weight hashes it is made of.

`settings_digest` hashes every resolved setting of a plan that changes its pixels; combined with each image's seed
(`image_id`) it is stored in the image's `diffcli` PNG chunk and in a batch's manifest. A rerun adopts or skips an
existing image only when its id is the one the new settings give, so an image made with other settings is never
passed off as new.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from diffcli.hashes import file_hash, model_hash

MAX_INLINE_PATH = 4096  # longer strings are text, not file names


def settings_digest(plan) -> str:
    """sha256 of the plan's resolved settings: prompt, sampling, model and helpers with their weight hashes, size, cfg,
    scheduler, steps, dtype, and task inputs (images, LoRAs, embeddings) by their content."""
    job, spec = plan.job, plan.spec
    settings = {
        "task": job.task, "prompt": job.prompt.text, "negative": job.prompt.negative, "dtype": job.model.dtype,
        "model_config": job.model.config, "safety_checker": job.model.safety_checker,
        "model": model_identity(spec),
        "helpers": {name: model_identity(helper) for name, helper in sorted(plan.helpers.items())},
        "width": plan.width, "height": plan.height, "cfg": plan.cfg, "scheduler": plan.scheduler,
        "steps": job.sampling.steps or spec.defaults.get("steps"),
        "extra": stable(dict(plan.record, loras=plan.adapters.loras, embeddings=plan.adapters.embeddings)),
    }
    if plan.inputs is not None and plan.inputs.postprocess is not None:  # as diffcli 0.1 wrote inpaint's paste-back, so
        settings["extra"]["postprocess"] = "function"  # that version's inpaint/outpaint batches resume, not redo
    if spec.base:  # a transformer-only file's base: only then, so other images keep their ids
        settings["base"] = {"base": spec.base, "revision": spec.revision}
    if plan.vae is not None:  # only then: the ids of images made without --vae stay what they were
        from diffcli import vae

        settings["vae"] = vae.identity(plan.vae)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def image_id(digest: str, seed: int) -> str:
    """The id of the image a plan with this digest makes from `seed`."""
    return hashlib.sha256(f"{digest}:{seed}".encode()).hexdigest()[:16]


def model_identity(spec) -> dict:
    """What names a model's weights: bundled/Hub name (and Hub revision), or the resolved path, with its hash."""
    where = spec.name if spec.source in ("bundled", "hub") else str(Path(spec.location).resolve())
    return {"model": where, "hash": model_hash(spec), "revision": spec.revision, "config": spec.model_config}


def stable(value):
    """JSON-able form of task settings; input files count by their content, not their name."""
    if isinstance(value, dict):
        return {str(k): stable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [stable(v) for v in value]
    if isinstance(value, str) and len(value) < MAX_INLINE_PATH and os.path.isfile(value):
        return "sha256:" + file_hash(Path(value))
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return type(value).__name__
