"""ControlNet units (--control): parsed and checked at plan time (map made, model found, family able), the pipeline's
ControlNet class built at run time, and the metadata A1111's ControlNet extension writes.

A unit is `TYPE:IMAGE[;key=value...]`: TYPE a preprocessor of diffcli.control (canny, scribble, none...), IMAGE the
picture it reads; keys `model` (the ControlNet: a diffusers folder or Hub id), `weight` (A1111's weight, diffusers'
controlnet_conditioning_scale), `start`/`end` (fraction of the steps it acts on), `resize` (crop, fit, stretch: how
the map meets the image size) and the preprocessor's own parameters (`low`, `high` for canny...). Without `model`,
a model with a bundled ControlNet (tiny-shapes: tiny-shapes-control, canny maps) uses that one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffcli.errors import UsageError

UNIT_KEYS = ("model", "weight", "start", "end", "resize")
A1111_RESIZE = {"crop": "Crop and Resize", "fit": "Resize and Fill", "stretch": "Just Resize"}
DEFAULT_RESIZE = "crop"  # A1111's ControlNet default ("Crop and Resize")
MAX_WEIGHT = 2.0  # A1111's slider range for a unit's weight
BUNDLED = {"tiny-shapes": "tiny-shapes-control"}  # bundled model -> its default ControlNet (diffcli/bundled/), by name


@dataclass(frozen=True)
class Unit:
    """One --control, parsed and checked (its image not yet read)."""

    type: str
    params: tuple  # (key, value) pairs of the preprocessor
    image: str
    model: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    resize: str = DEFAULT_RESIZE

    def record(self) -> dict:
        return {"type": self.type, "params": dict(self.params), "image": self.image, "model": self.model,
                "weight": self.weight, "start": self.start, "end": self.end, "resize": self.resize}


@dataclass
class Resolved:
    """A plan's ControlNet units with their control maps, at the plan's size."""

    units: list[Unit] = field(default_factory=list)
    maps: list = field(default_factory=list)  # PIL RGB images, width x height
    guess_mode: bool = False

    def record(self) -> dict:
        if not self.units:
            return {}
        return {"control": [unit.record() for unit in self.units], "guess_mode": self.guess_mode}


def parse(text: str) -> Unit:
    """`canny:edges.png;model=DIR;weight=0.8;low=50` -> Unit; every bad part a UsageError naming it."""
    from diffcli import control

    head, *options = [part.strip() for part in str(text).split(";")]
    kind, colon, image = head.partition(":")
    kind = kind.strip().lower()
    if not colon or not image.strip():
        raise UsageError(f"--control: expected TYPE:IMAGE[;key=value...], got {text!r}",
                         "e.g. --control 'canny:edges.png;model=./controlnet-canny'")
    settings, params = {}, []
    for option in options:
        key, eq, value = (part.strip() for part in option.partition("="))
        if not (key and eq and value):
            raise UsageError(f"--control {kind}: options are key=value, got {option!r}")
        if key in settings or key in dict(params):
            raise UsageError(f"--control {kind}: {key} given twice")
        (settings.__setitem__(key, value) if key in UNIT_KEYS else params.append((key, value)))
    name, values = control.parse_type(kind + (":" + ",".join(f"{k}={v}" for k, v in params) if params else ""),
                                      "--control")
    weight, start, end = (_fraction(kind, key, settings.get(key), default, high)
                          for key, default, high in (("weight", 1.0, MAX_WEIGHT), ("start", 0.0, 1.0), ("end", 1.0, 1.0)))
    if start >= end:
        raise UsageError(f"--control {kind}: start must be below end, got start={start:g} end={end:g}")
    resize = settings.get("resize", DEFAULT_RESIZE)
    if resize not in A1111_RESIZE:
        raise UsageError(f"--control {kind}: resize must be one of {', '.join(A1111_RESIZE)}, got {resize!r}")
    return Unit(name, tuple(values.items()), image.strip(), settings.get("model", ""), weight, start, end, resize)


def unit_text(record: dict) -> str:
    """The --control text of a recorded unit (Unit.record): what replay passes to make it again."""
    options = {"model": record["model"], "weight": record["weight"], "start": record["start"], "end": record["end"],
               "resize": record["resize"], **record.get("params", {})}
    return f"{record['type']}:{record['image']};" + ";".join(f"{key}={value}" for key, value in options.items())


def _fraction(kind: str, key: str, text: str | None, default: float, high: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= high:
        raise UsageError(f"--control {kind}: {key} must be in 0..{high:g}, got {text!r}")
    return value


def check_texts(texts: list) -> list[Unit]:
    """Every --control of a job parsed (no file read): for check_job."""
    return [parse(text) for text in texts]


def resolve(job, spec, width: int, height: int) -> Resolved:
    """The job's units with their maps at width x height: the family able, each model a ControlNet, each image read
    and preprocessed; raises UsageError before any weights load."""
    from diffcli import families

    units = check_texts(job.controls.units)
    if not units:
        if job.controls.guess_mode:
            raise UsageError("--guess-mode works with --control", "add a --control, or drop --guess-mode")
        return Resolved()
    family = families.get(spec.family)
    if job.task not in family.controlnet:
        kinds = ", ".join(name for name, f in families.FAMILIES.items() if f.controlnet)
        raise UsageError(f"--control: ControlNet runs on {kinds} models here, got {spec.name!r} ({spec.family}) for "
                         f"{job.command}")
    sdxl_refiner = spec.family == "sdxl" and job.second.refiner not in (None, "none")  # SD 1.x/2.x hand over in the call
    for flag, used in (("--hires", job.second.hires), ("--refiner", sdxl_refiner), ("--deep-cache", job.model.deep_cache)):
        if used:
            raise UsageError(f"--control with {flag}: not supported together yet", f"drop {flag}")
    units = [unit if unit.model else _default_model(unit, spec) for unit in units]
    for unit in units:
        check_model(unit.model, job.model.allow_pickle)
    return Resolved(units, [control_map(unit, width, height, job.model.allow_pickle) for unit in units],
                    job.controls.guess_mode)


def _default_model(unit: Unit, spec) -> Unit:
    """A unit without `model` given the bundled ControlNet of a bundled model that has one; else a UsageError."""
    from dataclasses import replace

    from diffcli.models import BUNDLED_DIR

    name = BUNDLED.get(Path(spec.location).name) if Path(spec.location).parent == BUNDLED_DIR else None
    if name is None:
        raise UsageError(f"--control {unit.type}:{unit.image}: no ControlNet model",
                         f"add ;model=DIR_OR_HUB_ID (only {', '.join(BUNDLED)} has a default)")
    return replace(unit, model=name)


def location(model: str) -> str:
    """Where a unit's model is: a bundled ControlNet's folder for its name (unless a folder of that name is here)."""
    from diffcli.models import BUNDLED_DIR

    return str(BUNDLED_DIR / model) if model in BUNDLED.values() and not Path(model).is_dir() else model


def check_model(model: str, allow_pickle: bool) -> None:
    """A ControlNet diffusers folder (config.json naming a ControlNet class, safetensors weights unless --allow-pickle)
    or a Hub id; a single file is refused for now (its config would come from the Hub)."""
    from diffcli.models import HUB_ID
    from diffcli.options import check_path

    path = Path(location(model))
    if path.is_dir():
        if (path / "model_index.json").is_file():
            raise UsageError(f"--control model={model}: a whole pipeline, not a ControlNet", "name a ControlNet folder")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UsageError(f"--control model={model}: no readable config.json", "a diffusers ControlNet folder") from None
        if "ControlNet" not in str(config.get("_class_name", "")):
            raise UsageError(f"--control model={model}: not a ControlNet (its config says {config.get('_class_name')!r})")
        if not any(path.glob("*.safetensors")) and not allow_pickle:
            raise UsageError(f"--control model={model}: no .safetensors weights (pickle files are refused)",
                             "convert it to safetensors, or pass --allow-pickle if you trust it")
        return
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pth", ".bin") or path.exists():
        check_path("--control model", model)
        raise UsageError(f"--control model={model}: single-file ControlNets are not read yet",
                         "use its diffusers folder or Hub id (e.g. lllyasviel/control_v11p_sd15_canny)")
    if not HUB_ID.match(model):
        raise UsageError(f"--control model={model}: no such folder, and not a Hub id")


def control_map(unit: Unit, width: int, height: int, allow_pickle: bool):
    """The unit's map: its image read as any input, preprocessed, and resized to the image size (crop, fit, stretch)."""
    from PIL import Image, ImageOps

    from diffcli import control
    from diffcli.images import load_image

    image = load_image(unit.image, f"--control {unit.type}")
    made = control.make(image, unit.type, dict(unit.params), allow_pickle)
    if made.size == (width, height):
        return made
    if unit.resize == "stretch":
        return made.resize((width, height), Image.LANCZOS)
    if unit.resize == "crop":
        return ImageOps.fit(made, (width, height), Image.LANCZOS)
    return ImageOps.pad(made, (width, height), Image.LANCZOS, color=(0, 0, 0))  # a map's empty border: no control


_MODELS: dict[tuple, object] = {}  # (model, device, dtype) -> ControlNetModel, loaded once per process


def pipeline(pipe, task: str, family: str, resolved: Resolved, device: str, dtype):
    """The ControlNet pipeline class of `task` sharing `pipe`'s components, with the units' ControlNets."""
    import diffusers

    from diffcli import families

    nets = []
    for unit in resolved.units:
        key = (unit.model, device, str(dtype))
        if key not in _MODELS:
            _MODELS[key] = diffusers.ControlNetModel.from_pretrained(location(unit.model), torch_dtype=dtype,
                                                                     use_safetensors=True).to(device)
        nets.append(_MODELS[key])
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    cls = getattr(diffusers, families.get(family).controlnet[task])
    made = cls.from_pipe(pipe, controlnet=controlnet)
    made.set_progress_bar_config(disable=True)
    made.diffcli_optimizations = pipe.diffcli_optimizations
    return made


def call_kwargs(task: str, resolved: Resolved) -> dict:
    """The ControlNet inputs of a pipeline call: maps (`image` for txt2img, `control_image` with an input image),
    weights, start/end fractions and guess mode (one value per unit, or a single one for one unit)."""
    one = len(resolved.units) == 1
    pick = (lambda values: values[0]) if one else list
    units = resolved.units
    return {"image" if task == "txt2img" else "control_image": pick(resolved.maps),
            "controlnet_conditioning_scale": pick([u.weight for u in units]),
            "control_guidance_start": pick([u.start for u in units]),
            "control_guidance_end": pick([u.end for u in units]), "guess_mode": resolved.guess_mode}


def a1111_fields(meta: dict) -> dict:
    """`ControlNet N: "Module: canny, Model: ..., Weight: ..."` fields, as A1111's ControlNet extension writes them."""
    fields = {}
    for index, unit in enumerate(meta.get("control") or []):
        params = list(unit.get("params", {}).values())
        parts = [f"Module: {unit['type']}", f"Model: {Path(unit['model']).name}", f"Weight: {unit['weight']:g}",
                 f"Resize Mode: {A1111_RESIZE.get(unit['resize'], unit['resize'])}",
                 *(f"Threshold {'AB'[i]}: {value:g}" for i, value in enumerate(params[:2])),
                 f"Guidance Start: {unit['start']:g}", f"Guidance End: {unit['end']:g}",
                 f"Control Mode: {'ControlNet is more important' if meta.get('guess_mode') else 'Balanced'}"]
        fields[f"ControlNet {index}"] = '"' + ", ".join(parts) + '"'
    return fields
