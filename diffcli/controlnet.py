"""ControlNet units (--control): parsed and checked at plan time (map made, model found, family able), the pipeline's
ControlNet class built at run time, and the metadata A1111's ControlNet extension writes.

A unit is `TYPE:IMAGE[;key=value...]`: TYPE a preprocessor of diffcli.control (canny, scribble, none...), IMAGE the
picture it reads; keys `model` (the ControlNet: a diffusers folder, a Hub id or a single file, controlnet_files), `weight` (A1111's weight, diffusers'
controlnet_conditioning_scale), `start`/`end` (fraction of the steps it acts on), `resize` (crop, fit, stretch: how
the map meets the image size), `mode` (a union ControlNet's control type: a name or its number; default the TYPE's)
and the preprocessor's own parameters (`low`, `high` for canny...). Without `model`, a model with a bundled ControlNet
(tiny-shapes: tiny-shapes-control, canny maps) uses that one. The ControlNet's config decides its class, checked
against the model's family (families.ControlNets) before any weights load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffcli.errors import UsageError

UNIT_KEYS = ("model", "weight", "start", "end", "resize", "mode")
A1111_RESIZE = {"crop": "Crop and Resize", "fit": "Resize and Fill", "stretch": "Just Resize"}
DEFAULT_RESIZE = "crop"  # A1111's ControlNet default ("Crop and Resize")
MAX_WEIGHT = 2.0  # A1111's slider range for a unit's weight
WEIGHT_FILES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # a single-file model= is named without its suffix, as A1111 does
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
    mode: str = ""  # a union ControlNet's control type as given; resolved: its number

    def record(self) -> dict:
        return {"type": self.type, "params": dict(self.params), "image": self.image, "model": self.model,
                "weight": self.weight, "start": self.start, "end": self.end, "resize": self.resize,
                **({"mode": int(self.mode)} if self.mode.isdigit() else {})}


@dataclass
class Resolved:
    """A plan's ControlNet units with their control maps, at the plan's size."""

    units: list[Unit] = field(default_factory=list)
    maps: list = field(default_factory=list)  # PIL RGB images, width x height
    guess_mode: bool = False
    model_class: str = ""  # the ControlNets' diffusers class (one for all units)
    union: bool = False  # union models: each map goes with its unit's control mode

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
    return Unit(name, tuple(values.items()), image.strip(), settings.get("model", ""), weight, start, end, resize,
                settings.get("mode", "").lower())


def unit_text(record: dict) -> str:
    """The --control text of a recorded unit (Unit.record): what replay passes to make it again."""
    options = {"model": record["model"], "weight": record["weight"], "start": record["start"], "end": record["end"],
               "resize": record["resize"], **({"mode": record["mode"]} if "mode" in record else {}),
               **record.get("params", {})}
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


def resolve(job, spec, width: int, height: int, crop: tuple | None = None) -> Resolved:
    """The job's units with their maps at width x height: the family able, each model a ControlNet of a class the family
    runs (one class for all), union modes known, each image read and preprocessed (`crop`: --masked-only's area of
    the input, (box, input size), which the maps are cut to as well); raises UsageError before any weights load."""
    from diffcli import families

    units = check_texts(job.controls.units)
    if not units:
        if job.controls.guess_mode:
            raise UsageError("--guess-mode works with --control", "add a --control, or drop --guess-mode")
        return Resolved()
    family = families.get(spec.family)
    able = ", ".join(name for name, f in families.FAMILIES.items() if f.controlnet)
    if not family.controlnet:
        raise UsageError(f"--control: ControlNet runs on {able} models here, got {spec.name!r} ({spec.family}) for "
                         f"{job.command}")
    sdxl_refiner = spec.family == "sdxl" and job.second.refiner not in (None, "none")  # SD 1.x/2.x hand over in the call
    for flag, used in (("--hires", job.second.hires), ("--refiner", sdxl_refiner), ("--deep-cache", job.model.deep_cache)):
        if used:
            raise UsageError(f"--control with {flag}: not supported together yet", f"drop {flag}")
    units = [unit if unit.model else _default_model(unit, spec) for unit in units]
    configs = [check_model(unit.model, job.model.allow_pickle, spec) for unit in units]
    model_class = _model_class(units, configs, family, spec)
    nets = family.controlnet[model_class]
    if job.task not in nets.pipelines:
        raise UsageError(f"--control: diffusers has no {spec.family} ControlNet pipeline for {job.command}",
                         f"{spec.family} takes ControlNets for {', '.join(nets.pipelines)}")
    if job.controls.guess_mode and not nets.guess_mode:
        raise UsageError(f"--guess-mode: {spec.family}'s ControlNet pipelines have no guess mode", "drop --guess-mode")
    _check_pipeline_takes(job, units, configs, nets, spec)
    union = [_is_union(config) for config in configs]
    if any(union) and not all(union):
        raise UsageError("--control: union and single-type ControlNets cannot run together",
                         "use units of one kind in an image")
    if all(union):
        units = [_with_mode(unit, config, nets.modes) for unit, config in zip(units, configs)]
    else:
        for unit in units:
            if unit.mode:
                raise UsageError(f"--control {unit.type}: mode= is for union ControlNets, {unit.model} is not one"
                                 if any(n.modes for n in family.controlnet.values())
                                 else f"--control {unit.type}: {spec.family}'s ControlNets take no mode=", "drop mode=")
    if spec.family == "flux" and len({bool(config.get("conditioning_embedding_channels")) for config in configs}) > 1:
        raise UsageError("--control: XLabs-style and InstantX-style FLUX.1 ControlNets cannot run together",
                         "diffusers reads the maps of several FLUX.1 ControlNets one way for all")
    return Resolved(units, [control_map(unit, width, height, job.model.allow_pickle, crop) for unit in units],
                    job.controls.guess_mode, model_class, all(union))


def _check_pipeline_takes(job, units: list[Unit], configs: list[dict], nets, spec) -> None:
    """What a family's ControlNet pipelines cannot take (Qwen-Image: one ControlNet for all maps; Z-Image: one unit on
    every step, inpaint at strength 1 with a ControlNet that reads the masked image) stops here, before loading."""
    from diffcli import families

    if len(units) > 1 and not nets.multi:
        raise UsageError(f"--control: {spec.family}'s ControlNet pipelines take one unit, got {len(units)}",
                         "use one --control (a union ControlNet reads any of its map types)")
    if nets.shared and len({unit.model for unit in units}) > 1:
        raise UsageError(f"--control: {spec.family}'s ControlNet pipeline runs one ControlNet for all units, got "
                         f"{', '.join(dict.fromkeys(unit.model for unit in units))}",
                         "give every unit the same model= (a union ControlNet reads any map)")
    if not nets.steps and any((unit.start, unit.end) != (0.0, 1.0) for unit in units):
        raise UsageError(f"--control start/end: {spec.family}'s ControlNet pipelines act on every step",
                         "drop start= and end=")
    strength = getattr(job.inputs, "strength", 1.0)
    if not families.call_style(nets.pipelines[job.task]).strength and strength != 1.0:
        raise UsageError(f"--strength: {spec.family}'s ControlNet {job.command} pipeline repaints the masked area from "
                         f"noise, got {strength:g}", "leave --strength out (1)")
    inpainting = next((unit for unit, config in zip(units, configs)
                       if config.get("extra_condition_channels") or config.get("extra_conditioning_channels")), None)
    if inpainting is not None:  # Qwen-Image's and SD3's inpainting ControlNets read a mask too, which these pipelines never give
        raise UsageError(f"--control model={inpainting.model}: an inpainting ControlNet (extra condition channels), "
                         f"which {spec.family}'s ControlNet {job.command} pipeline cannot feed", "use a map ControlNet")
    channels = _denoiser_config(spec).get("in_channels")
    if job.task == "inpaint" and "control_in_dim" in configs[0] and isinstance(channels, int) and \
            configs[0]["control_in_dim"] != 2 * channels + 1:  # the map's, the masked image's latents and the mask
        raise UsageError(f"--control model={units[0].model}: reads a map only (control_in_dim "
                         f"{configs[0]['control_in_dim']}); {spec.family}'s ControlNet inpaint pipeline needs one that "
                         f"also reads the masked image (control_in_dim {2 * channels + 1})",
                         "use a ControlNet made for inpainting (Z-Image-Turbo-Fun-Controlnet-Union-2.0 or later)")


def _model_class(units: list[Unit], configs: list[dict], family, spec) -> str:
    """The ControlNets' class from their configs: one the family runs, the same for every unit, made for this model
    (the denoiser's width where both configs say it)."""
    classes = [str(config.get("_class_name", "")) for config in configs]
    for unit, name, config in zip(units, classes, configs):
        if name not in family.controlnet:
            raise UsageError(f"--control model={unit.model}: a {name or 'config without a class'}; {spec.family} models "
                             f"take {' or '.join(family.controlnet)}")
        _check_made_for(unit, config, spec)
    if len(set(classes)) > 1:
        raise UsageError(f"--control: the units' ControlNets are of different classes ({', '.join(sorted(set(classes)))})",
                         "use ControlNets of one class in an image")
    return classes[0]


# a ControlNet's config and its model's agree (dim: Z-Image's width)
MATCHED = ("cross_attention_dim", "joint_attention_dim", "in_channels", "dim")


def _check_made_for(unit: Unit, config: dict, spec) -> None:
    """A ControlNet made for another model (an SD 1.5 one on SDXL, ...) stops here, not in a matrix product."""
    from diffcli import families

    model = _denoiser_config(spec)
    for key in MATCHED:
        if isinstance(config.get(key), int) and isinstance(model.get(key), int) and config[key] != model[key]:
            raise UsageError(f"--control model={unit.model}: made for another model ({key} {config[key]}, "
                             f"{spec.name!r} has {model[key]})", f"use a ControlNet made for {spec.family} models")
    width = [c.get("num_attention_heads", 0) * c.get("attention_head_dim", 0) for c in (config, model)
             if all(isinstance(c.get(key), int) for key in ("num_attention_heads", "attention_head_dim"))]
    if families.get(spec.family).denoiser != "unet" and len(width) == 2 and width[0] != width[1]:
        raise UsageError(f"--control model={unit.model}: made for another model (width {width[0]}, {spec.name!r} is "
                         f"{width[1]} wide)", f"use a ControlNet made for {spec.family} models of that size")
    if families.get(spec.family).denoiser == "unet" and "cross_attention_dim" in config:
        xl = config.get("addition_embed_type") == "text_time"
        if xl != (spec.family == "sdxl"):
            raise UsageError(f"--control model={unit.model}: an {'SDXL' if xl else 'SD 1.x/2.x'} ControlNet, and "
                             f"{spec.name!r} is a {spec.family} model", f"use a ControlNet made for {spec.family} models")


def _denoiser_config(spec) -> dict:
    """The model's U-Net or transformer config when at hand, else {}."""
    from diffcli import families
    from diffcli.models import component_config

    return component_config(spec, f"{'unet' if families.get(spec.family).denoiser == 'unet' else 'transformer'}/config.json")


def _is_union(config: dict) -> bool:
    """SDXL's ControlNetUnionModel, or a FLUX.1 ControlNet with control modes (num_mode)."""
    return config.get("_class_name") == "ControlNetUnionModel" or bool(config.get("num_mode"))


def _with_mode(unit: Unit, config: dict, modes) -> Unit:
    """The unit with its union control mode as a number: mode= (a name or number), else its TYPE's."""
    from dataclasses import replace

    count = config.get("num_mode") or config.get("num_control_type") or len(set(modes.values()))
    given = unit.mode or unit.type
    number = int(given) if given.isdigit() else modes.get(given)
    names = ", ".join(f"{name} {value}" for name, value in modes.items())
    if number is None:
        raise UsageError(f"--control {unit.type}: model={unit.model} is a union ControlNet: say which control it is"
                         + (f", mode={given!r} is none of its modes" if unit.mode else ""),
                         f"add ;mode=NAME or a number below {count} ({names})")
    if not 0 <= number < count:
        raise UsageError(f"--control {unit.type}: mode {number} is not one of model={unit.model}'s {count} modes",
                         f"0..{count - 1} ({names})")
    return replace(unit, mode=str(number))


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


def check_model(model: str, allow_pickle: bool, spec) -> dict:
    """A ControlNet diffusers folder (its config naming a ControlNet class, safetensors weights unless --allow-pickle),
    a single file (controlnet_files: its config read from its tensors and the model's U-Net config) or a Hub id (its
    config fetched, or found in the HF cache offline); returns the config."""
    from diffcli import controlnet_files, families, weights
    from diffcli.models import HUB_ID
    from diffcli.options import check_path

    check_path("--control model", model)
    path = Path(location(model))
    if path.is_dir():
        if (path / "model_index.json").is_file():
            raise UsageError(f"--control model={model}: a whole pipeline, not a ControlNet", "name a ControlNet folder")
        config = _read_config(path / "config.json", model)
        if not _weights(path, allow_pickle):
            raise UsageError(f"--control model={model}: no .safetensors weights (pickle files are refused)",
                             "convert it to safetensors, or pass --allow-pickle if you trust it")
        return config
    if path.is_file():
        takes = list(families.get(spec.family).controlnet)
        config = controlnet_files.read_config(str(path), allow_pickle, _denoiser_config(spec), takes)
        if config["_class_name"] is None:  # an unopened pickle (--dry-run): taken as the family's first class
            config["_class_name"] = takes[0] if takes else "ControlNetModel"
        return config
    if path.suffix.lower() in weights.WEIGHT_SUFFIXES or path.exists():
        raise UsageError(f"--control model={model}: no such file")
    if not HUB_ID.match(model):
        raise UsageError(f"--control model={model}: no such folder, and not a Hub id")
    return _read_config(_hub_config(model), model)


def _read_config(path: Path, model: str) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"--control model={model}: no readable config.json", "a diffusers ControlNet folder") from None
    if not isinstance(config, dict) or "ControlNet" not in str(config.get("_class_name", "")):
        raise UsageError(f"--control model={model}: not a ControlNet (its config says "
                         f"{config.get('_class_name') if isinstance(config, dict) else config!r})")
    return config


def _weights(folder: Path, allow_pickle: bool) -> dict | None:
    """How diffusers should load the folder's weights (use_safetensors, variant), None when it has none it may read:
    safetensors, plain or the fp16 variant only; with --allow-pickle, .bin too."""
    if (folder / "diffusion_pytorch_model.safetensors").is_file() or \
            (folder / "diffusion_pytorch_model.safetensors.index.json").is_file():
        return {"use_safetensors": True}
    if (folder / "diffusion_pytorch_model.fp16.safetensors").is_file():
        return {"use_safetensors": True, "variant": "fp16"}
    if allow_pickle and any(folder.glob("*.bin")):
        return {"use_safetensors": False}
    return None


def _hub_config(repo: str) -> Path:
    """A Hub ControlNet's config.json: fetched (a few kB), or from the HF cache when the Hub is out of reach."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    from diffcli.models import hub_unreachable

    unreachable = hub_unreachable()
    try:
        return Path(hf_hub_download(repo, "config.json", **({"local_files_only": True} if unreachable else {})))
    except LocalEntryNotFoundError:
        raise UsageError(f"--control model={repo}: not in the Hugging Face cache and the Hub cannot be reached"
                         + (f": {unreachable}" if unreachable else ""),
                         f"download it once with `hf download {repo}`, or name a local folder") from None
    except (EntryNotFoundError, RepositoryNotFoundError):
        raise UsageError(f"--control model={repo}: no ControlNet config.json there (or no such repository)") from None
    except OSError as exc:
        raise UsageError(f"--control model={repo}: {exc}") from None


PREPROCESS_SCALE = 2  # a control image is preprocessed at most this many times the size its map is used at


def _crop_side(crop: tuple) -> int:
    (left, top, right, bottom), _ = crop
    return max(right - left, bottom - top)


def control_map(unit: Unit, width: int, height: int, allow_pickle: bool, crop: tuple | None = None):
    """The unit's map: its image read as any input, preprocessed, cut to `crop` (the input's area --masked-only
    repaints, scaled to the map's size, as A1111 cuts maps in "only masked" mode) and resized to the image size
    (crop, fit, stretch)."""
    from PIL import Image, ImageOps

    from diffcli import control
    from diffcli.images import load_image

    image = load_image(unit.image, f"--control {unit.type}")
    longest = PREPROCESS_SCALE * max(width, height) * (1 if crop is None else max(crop[1]) / max(1, _crop_side(crop)))
    if max(image.size) > longest:  # a 50 MP photo for a 1 MP image: preprocessed at twice the size it is used at
        scale = longest / max(image.size)
        image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))), Image.LANCZOS)
    made = control.make(image, unit.type, dict(unit.params), allow_pickle)
    if crop is not None:
        (left, top, right, bottom), (full_width, full_height) = crop
        sx, sy = made.size[0] / full_width, made.size[1] / full_height
        made = made.crop((round(left * sx), round(top * sy), max(round(left * sx) + 1, round(right * sx)),
                          max(round(top * sy) + 1, round(bottom * sy))))
    if made.size == (width, height):
        return made
    if unit.resize == "stretch":
        return made.resize((width, height), Image.LANCZOS)
    if unit.resize == "crop":
        return ImageOps.fit(made, (width, height), Image.LANCZOS)
    return ImageOps.pad(made, (width, height), Image.LANCZOS, color=(0, 0, 0))  # a map's empty border: no control


_MODELS: dict[tuple, object] = {}  # (model, device, dtype) -> ControlNet, loaded once per process


def pipeline(pipe, task: str, family: str, resolved: Resolved, device: str, dtype, allow_pickle: bool = False):
    """The ControlNet pipeline class of `task` sharing `pipe`'s components, with the units' ControlNets."""
    import diffusers
    import diffusers.models.controlnets as controlnets

    from diffcli import controlnet_files, families
    from diffcli.errors import ModelError

    nets = families.get(family).controlnet[resolved.model_class]
    cls = getattr(controlnets, resolved.model_class)
    loaded = []
    for unit in resolved.units:
        folder = location(unit.model)
        key = (unit.model, device, str(dtype))
        if controlnet_files.is_single_file(folder):  # its config depends on the model's U-Net; the file may change
            config = controlnet_files.read_config(folder, allow_pickle, dict(_denoiser(pipe).config))
            if config["_class_name"] != resolved.model_class:
                raise ModelError(f"--control model={unit.model}: the file changed since the plan read it", "run again")
            key = (*controlnet_files.version(folder), json.dumps(config, sort_keys=True), device, str(dtype))
            if key not in _MODELS:
                _MODELS[key] = controlnet_files.load(folder, config, allow_pickle, dtype).to(device)
        if key not in _MODELS:
            how = _weights(Path(folder), allow_pickle) if Path(folder).is_dir() else {"use_safetensors": True}
            try:
                _MODELS[key] = cls.from_pretrained(folder, torch_dtype=dtype, **(how or {})).to(device)
            except (OSError, ValueError) as exc:
                raise ModelError(f"--control model={unit.model}: could not load it: {str(exc).splitlines()[0][:300]}") from None
        loaded.append(_MODELS[key])
    if nets.shared:  # (Qwen-Image: its multi class runs one ControlNet, which every unit names, over all the maps)
        loaded = loaded[:1]
    controlnet = loaded[0] if len(resolved.units) == 1 else getattr(controlnets, nets.multi)(loaded)
    made = getattr(diffusers, nets.pipelines[task]).from_pipe(pipe, controlnet=controlnet)
    made.set_progress_bar_config(disable=True)
    made.diffcli_optimizations = pipe.diffcli_optimizations
    return made


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def call_kwargs(pipe, resolved: Resolved) -> dict:
    """The ControlNet inputs of a pipeline call, by the names its class takes: maps (`image` in SD's txt2img, else
    `control_image`), weights, start/end fractions, guess mode, union control modes; one value per unit, or a single
    one for one unit (SDXL union models: lists of maps and modes, one each per unit)."""
    import inspect

    takes = inspect.signature(type(pipe).__call__).parameters
    one = len(resolved.units) == 1
    pick = (lambda values: values[0]) if one else list
    units = resolved.units
    kwargs = {"control_image" if "control_image" in takes else "image": pick(resolved.maps),
              "controlnet_conditioning_scale": pick([u.weight for u in units])}
    if "control_guidance_start" in takes:  # (not Z-Image's: resolve refused other fractions)
        kwargs.update(control_guidance_start=pick([u.start for u in units]),
                      control_guidance_end=pick([u.end for u in units]))
    if "guess_mode" in takes:
        kwargs["guess_mode"] = resolved.guess_mode
    if resolved.union:
        modes = [int(u.mode) for u in units]
        if resolved.model_class == "ControlNetUnionModel":  # lists even for one (it wraps each for several models)
            kwargs["control_image"], kwargs["control_mode"] = list(resolved.maps), modes
        else:
            kwargs["control_mode"] = pick(modes)
    return kwargs


def a1111_fields(meta: dict) -> dict:
    """`ControlNet N: "Module: canny, Model: ..., Weight: ..."` fields, as A1111's ControlNet extension writes them."""
    fields = {}
    for index, unit in enumerate(meta.get("control") or []):
        params = list(unit.get("params", {}).values())
        model = Path(unit["model"])
        parts = [f"Module: {unit['type']}", f"Model: {model.stem if model.suffix.lower() in WEIGHT_FILES else model.name}", f"Weight: {unit['weight']:g}",
                 f"Resize Mode: {A1111_RESIZE.get(unit['resize'], unit['resize'])}",
                 *(f"Threshold {'AB'[i]}: {value:g}" for i, value in enumerate(params[:2])),
                 f"Guidance Start: {unit['start']:g}", f"Guidance End: {unit['end']:g}",
                 f"Control Mode: {'ControlNet is more important' if meta.get('guess_mode') else 'Balanced'}"]
        fields[f"ControlNet {index}"] = '"' + ", ".join(parts) + '"'
    return fields
