"""From a request's values to plans, as a batch line becomes plans: the same Flag conversion and Job builder, plus
what a server must add. Images arrive as base64 and are decoded into the request's own folder; models are names from
the catalog; no request sets trust, files, devices or output paths; the server's per-request limits hold.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path

from diffcli.controlnet import UNIT_KEYS
from diffcli.errors import UsageError

# Keys a request may not set: trust and weight files come from the server's command line, devices and threads are the
# workers', and the server writes no files (the client names and writes them).
REFUSED = {"allow_pickle": "trust comes from the server's command line only",
           "model_config": "files are the server's: name a model from GET /sdapi/v1/sd-models",
           "vae": "files are the server's", "base": "files are the server's: name a complete model from GET /sdapi/v1/sd-models",
           "lora": "use <lora:NAME:WEIGHT> in the prompt (the server's --lora-dir)",
           "lora_dir": "the server's --lora-dir is used", "embedding": "files are the server's",
           "embedding_dir": "files are the server's", "device": "the server's workers choose the device",
           "threads": "the server's --threads is used", "optimize": "the server's setting", "low_vram": "the server's setting",
           "backend": "the server's setting (auto)",
           "out": "the client names and writes the files", "overwrite": "the client names and writes the files",
           "control": "ControlNet through the server is not available yet: run --control locally",
           "ip_image": "send each image inside its ip_adapter unit", "ip_scale": "send each scale inside its ip_adapter unit",
           "ip_encoder": "files are the server's: the image_encoder folder beside the adapter in its --controlnet-dir"}
MODEL_KEYS = ("model", "refiner", "hires_upscaler_model")  # names from the catalog, never paths
IMAGE_KEYS = ("input", "mask")  # base64 image data (a data: URL prefix is allowed)
DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


class TooLarge(UsageError):
    """A body or image over --max-body-mb (HTTP 413)."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds (server flags): a request over one is refused before it is queued."""

    max_steps: int = 150
    max_pixels: int = 2048 * 2048  # width x height of one image
    max_images: int = 16  # images one request makes (batch size x iterations, a sweep's cells)
    max_body_mb: float = 64.0  # request body, base64 images included


@dataclass
class Served:
    """What the server's command line gives every request: its models, limits, LoRA folder, threads and trust."""

    catalog: object  # catalog.Catalog
    limits: Limits
    lora_dir: str | None = None
    threads: int | None = None
    allow_pickle: bool = False  # --allow-pickle of `diffcli serve`: its catalog's pickle files load, nothing else


def decode_image(data, field: str, folder: Path, name: str, limits: Limits) -> str:
    """Base64 image data written to folder/name; its format is judged later, from its bytes, by images.open_image."""
    if not isinstance(data, str) or not data.strip():
        raise UsageError(f"{field}: expected base64 image data, got {type(data).__name__}")
    text = DATA_URL.sub("", data.strip(), count=1)
    if len(text) * 3 / 4 > limits.max_body_mb * 2**20:
        raise TooLarge(f"{field}: image data over {limits.max_body_mb:g} MB")
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{field}: not valid base64 data") from None
    path = folder / name
    path.write_bytes(raw)
    return str(path)


def build(command: str, values: dict, served: Served, folder: Path) -> list:
    """The request's Jobs (jobs.build through the batch line conversion): images decoded into `folder`, names looked
    up, refused keys refused; `values` keyed by option name or flag spelling, as a batch line."""
    from diffcli.batch.files import Entry
    from diffcli.batch.lines import TASKS, build_jobs
    from diffcli.flags import LOCAL_ONLY

    served_tasks = [task for task in TASKS if task not in LOCAL_ONLY]
    if command not in served_tasks:
        hint = "run `diffcli edit` locally" if command in LOCAL_ONLY else f"available: {', '.join(served_tasks)}"
        raise UsageError(f"command {command!r} cannot run on the server", hint)
    values = dict(values)
    spelled = {str(key).lstrip("-").replace("-", "_"): key for key in values}  # --ip-adapter, ip-adapter, ip_adapter
    ip_units = values.pop(spelled["ip_adapter"]) if "ip_adapter" in spelled else None
    units = values.pop(spelled["controlnet"]) if "controlnet" in spelled else None
    for key in list(values):
        name = str(key).lstrip("-").replace("-", "_")
        if name in REFUSED:
            raise UsageError(f"{key!r} cannot be set in a request", REFUSED[name])
        if name in MODEL_KEYS and values[key] is not None:
            values[key] = served.catalog.find(values[key], key).spec
        if name in IMAGE_KEYS and values[key] is not None:
            values[key] = decode_image(values[key], key, folder, f"{name}.img", served.limits)
        if name == "image" and values[key] is not None:  # edit's reference images: the request's own, never paths
            if not isinstance(values[key], list):
                raise UsageError(f"{key}: expected a list of base64 images")
            values[key] = [decode_image(data, f"{key}[{i}]", folder, f"image-{i}.img", served.limits)
                           for i, data in enumerate(values[key])]
    if units is not None:  # after the refusals: these --control texts name the request's own files only
        values["control"] = control_texts(units, served, folder)
    if ip_units is not None:  # the server's adapter files and the request's own images only
        values.update(ip_values(ip_units, served, folder))
    if command != "upscale":  # upscale's default is its own (the bundled x4 upscaler)
        values.setdefault("model", served.catalog.default.spec)
    made = [job for _, job in build_jobs([Entry(1, values, "request")], command, {}, [])]
    for job in made:
        job.output.out, job.output.overwrite = str(folder / "{index}.png"), True  # paths are planned, never written
        job.adapters.lora_dir, job.model.threads = served.lora_dir, served.threads
        job.model.allow_pickle = served.allow_pickle
    return made


def control_texts(units, served: Served, folder: Path) -> list[str]:
    """A request's ControlNet units ({"type", "params", "image" (base64), "model" (a --controlnet-dir name; none: the
    bundled model's own), "weight", "start", "end", "resize"}) as the --control texts of the request's files and the
    server's ControlNets."""
    if not isinstance(units, list):
        raise UsageError("controlnet: expected a list of units")
    texts = []
    for index, unit in enumerate(units):
        where = f"controlnet[{index}]"
        if not isinstance(unit, dict) or not isinstance(unit.get("type"), str):
            raise UsageError(f"{where}: expected an object with type and image (and model, unless the model has a "
                             "bundled ControlNet)")
        image = decode_image(unit.get("image"), f"{where}.image", folder, f"control-{index}.img", served.limits)
        params = unit.get("params") or {}
        if not isinstance(params, dict):
            raise UsageError(f"{where}.params: expected an object of the type's parameters")
        taken = [key for key in params if str(key).strip().lower() in UNIT_KEYS]
        if taken:  # the model above all: only the server's catalog names it (a path here would escape its folder)
            raise UsageError(f"{where}.params: {taken[0]!r} is a unit field, not a parameter of the type")
        if not re.fullmatch(r"[a-z_]+", unit["type"].strip().lower()):
            raise UsageError(f"{where}.type: a preprocessor name (canny, none...), got {unit['type'][:40]!r}")
        options = {**({"model": served.catalog.controlnet(unit["model"])} if unit.get("model") else {}),
                   **{key: unit[key] for key in ("weight", "start", "end", "resize", "mode") if unit.get(key) is not None},
                   **params}
        if any(";" in str(value) or "=" in str(key) or ";" in str(key) for key, value in options.items()):
            raise UsageError(f"{where}: values may not contain ';'")
        texts.append(f"{unit['type']}:{image};" + ";".join(f"{key}={value}" for key, value in options.items()))
    return texts


def ip_values(units, served: Served, folder: Path) -> dict:
    """A request's IP-Adapter units ({"model" (a file name in the server's --controlnet-dir), "image" (base64),
    "scale"}) as the ip_adapter/ip_image/ip_scale values of the server's files and the request's images."""
    if not isinstance(units, list):
        raise UsageError("ip_adapter: expected a list of units ({model, image, scale})")
    values: dict = {"ip_adapter": [], "ip_image": [], "ip_scale": []}
    for index, unit in enumerate(units):
        where = f"ip_adapter[{index}]"
        if not isinstance(unit, dict) or not isinstance(unit.get("model"), str):
            raise UsageError(f"{where}: expected an object with model, image and scale")
        values["ip_adapter"].append(served.catalog.ip_adapter(unit["model"]))
        values["ip_image"].append(decode_image(unit.get("image"), f"{where}.image", folder, f"ip-{index}.img", served.limits))
        values["ip_scale"].append(str(unit.get("scale", 1.0)))
    return values


def plan(made: list, limits: Limits) -> list:
    """Plans of the request's Jobs (plan.plan_jobs: every check a local run makes), then the server's limits."""
    from diffcli.plan import default_steps_of, plan_jobs

    plans = plan_jobs(made)
    count = sum(len(each.seeds) for each in plans)
    if count > limits.max_images:
        raise UsageError(f"the request makes {count} images; this server allows {limits.max_images} per request",
                         "send several requests (the server's --max-images)")
    for each in plans:
        steps = each.job.sampling.steps or default_steps_of(each.spec, each.scheduler) or 0
        hires = each.job.second.hires or 1
        if steps > limits.max_steps or (each.job.second.hires_steps or 0) > limits.max_steps:
            raise UsageError(f"steps {max(steps, each.job.second.hires_steps or 0)} over this server's limit of "
                             f"{limits.max_steps}", "the server's --max-steps")
        pixels = each.width * each.height * hires * hires
        if pixels > limits.max_pixels:
            raise UsageError(f"{each.width}x{each.height}" + (f" (x{hires:g} hires)" if hires != 1 else "") +
                             f" is over this server's limit of {limits.max_pixels:,} pixels", "the server's --max-pixels")
    return plans


def public(message: str, folder: Path) -> str:
    """A message without the request folder's path (the server's file system is not the client's business)."""
    return message.replace(str(folder) + "/", "").replace(str(folder), "")
