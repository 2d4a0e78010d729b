"""`diffcli replay IMAGE`: make an image again from its own metadata, and with `--verify` measure how close it came.

The settings come from the image's `diffcli` JSON chunk (every setting diffcli used) when it has one, else from the
A1111 `parameters` text other tools write (a PNG text chunk, or EXIF UserComment in JPEG and WebP), parsed as A1111's
own `parse_generation_parameters` (modules/infotext_utils.py) does. Flags given to replay win over recorded values.
The Job is built by the builder every command uses (jobs.build), then planned and run like any other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from diffcli.errors import UsageError

# One `Key: value` of the parameters line; a value may be a JSON string in quotes (A1111's re_param_code).
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
EXIF_IFD, EXIF_USER_COMMENT = 0x8769, 0x9286
A1111_UPSCALERS = {"latent": "latent", "lanczos": "lanczos", "sd x4": "x4"}  # A1111's "Hires upscaler" -> ours
# A1111 fields replay reads, or knows it need not (hashes name files it finds by other means; Version is the writer)
A1111_KNOWN = {"Steps", "Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale", "Seed", "Size", "Model",
               "Model hash", "Clip skip", "Denoising strength", "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler",
               "Variation seed", "Variation seed strength", "Max sequence length", "Refiner", "Refiner switch at", "VAE", "VAE hash", "Lora hashes", "TI hashes",
               "Version", "Mask blur", "Masked content", "Inpaint area", "Only masked padding, pixels"}
DIFFCLI_KEYS = ("task", "prompt", "negative", "steps", "cfg", "seed", "width", "height", "model", "model_hash", "sampler",
                "clip_skip", "variation_seed", "variation_strength", "hires_scale", "hires_steps", "hires_strength",
                "hires_upscaler", "hires_upscaler_model", "refiner", "refiner_start", "vae", "vae_hash", "weighting",
                "deep_cache", "lora_dir", "embedding_dir", "lora", "embedding", "input", "mask", "strength", "dtype",
                "device", "base", "control", "guess_mode", "max_sequence_length", "true_cfg", "ip_adapter", "ip_encoder", "backend",
                "images", "resize", "model_config")
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def read_parameters(path: str) -> tuple[dict, str | None]:
    """(the diffcli JSON settings or {}, the A1111 `parameters` text or None) of an image file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            info = dict(image.info)
            comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    except FileNotFoundError:
        raise UsageError(f"IMAGE {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"IMAGE {path!r} cannot be read as an image: {exc}") from None
    try:
        meta = json.loads(info["diffcli"]) if isinstance(info.get("diffcli"), str) else {}
    except ValueError:
        meta = {}
    text = info.get("parameters") if isinstance(info.get("parameters"), str) else user_comment(comment)
    return (meta if isinstance(meta, dict) and meta.get("prompt") is not None else {}), (text or None)


def user_comment(value) -> str | None:
    """EXIF UserComment as text: an 8-byte charset prefix, then UTF-16 (UNICODE; big-endian as piexif and diffcli
    write it, little-endian from some tools) or ASCII."""
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes) or len(value) < 8:
        return None
    prefix, body = value[:8], value[8:]
    if prefix.startswith(b"UNICODE"):
        big = body[:2] != b"\xff\xfe" and (len(body) < 2 or body[0] == 0 or body[1] != 0)
        return body.decode("utf-16-be" if big else "utf-16-le", "replace").lstrip("\ufeff")
    return body.decode("utf-8" if prefix.startswith(b"UTF8") else "latin-1", "replace").rstrip("\0")


def parse_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) from A1111's parameters text: prompt lines, `Negative prompt:` lines, then
    one line of `Key: value` pairs (A1111's parse_generation_parameters)."""
    lines = text.strip().split("\n")
    last = lines[-1]
    if len(A1111_PARAM.findall(last)) < 3:  # no parameters line: everything is prompt
        last = ""
    else:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in A1111_PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        fields[key.strip()] = value
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), fields


def settings_from_a1111(text: str, image: str) -> tuple[dict, list[str]]:
    """Replay settings (the diffcli metadata's keys) from A1111's text, and the names of the fields left unused."""
    prompt, negative, fields = parse_a1111(text)
    settings = {"task": "txt2img", "prompt": prompt, "negative": negative}

    def number(key: str, kind):
        try:
            value = float(fields[key])
            return int(value) if kind is int and value.is_integer() else kind(value)
        except (ValueError, OverflowError):
            raise UsageError(f"{image}: {key} {fields[key]!r} in its parameters is not a number") from None

    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "cfg", float), ("Seed", "seed", int),
                            ("Clip skip", "clip_skip", int), ("Variation seed", "variation_seed", int),
                            ("Variation seed strength", "variation_strength", float), ("Hires upscale", "hires_scale", float),
                            ("Hires steps", "hires_steps", int), ("Refiner switch at", "refiner_start", float),
                            ("Max sequence length", "max_sequence_length", int)):
        if key in fields:
            settings[name] = number(key, kind)
    left = []  # fields read but not replayed
    if "Distilled CFG Scale" in fields:  # Forge's FLUX.1 images: what diffcli's --cfg sets on them
        true_cfg = settings.get("cfg", 1.0)  # and their CFG scale is true CFG (--true-cfg), run above 1
        settings["cfg"] = number("Distilled CFG Scale", float)
        if true_cfg > 1 and negative.strip():
            settings["true_cfg"] = true_cfg
        elif true_cfg > 1:
            left.append(f"CFG scale {true_cfg:g} (true CFG without a negative prompt, which diffcli does not run)")
    if "Size" in fields:
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", fields["Size"])
        if not match:
            raise UsageError(f"{image}: Size {fields['Size']!r} in its parameters is not WIDTHxHEIGHT")
        settings["width"], settings["height"] = int(match.group(1)), int(match.group(2))
    if "Hires resize" in fields and "hires_scale" not in settings:  # A1111's target size instead of a scale
        settings["hires_scale"] = _hires_scale(fields, settings, image)
    for key, name in (("Model", "model"), ("Model hash", "model_hash"), ("Refiner", "refiner"), ("VAE", "vae"),
                      ("VAE hash", "vae_hash")):
        if fields.get(key):
            settings[name] = fields[key]
    unused = [key for key in fields if key not in A1111_KNOWN] + left
    sampler = fields.get("Sampler", "")
    schedule = fields.get("Schedule type", "")
    if schedule.lower() == "karras" and "karras" not in sampler.lower():
        sampler = f"{sampler} Karras"
    elif schedule and schedule.lower() not in ("automatic", "karras"):
        unused.append("Schedule type")
    settings["sampler"] = sampler
    if "Denoising strength" in fields:
        strength = number("Denoising strength", float)
        if "hires_scale" in settings:
            settings["hires_strength"] = strength
        else:  # no hires fix: an img2img (or inpaint) image, whose input A1111 does not record
            settings.update(task="inpaint" if "Mask blur" in fields else "img2img", strength=strength)
    if "Hires upscaler" in fields:
        upscaler = fields["Hires upscaler"].strip().lower()
        key = next((k for k in A1111_UPSCALERS if upscaler.startswith(k)), None)
        if key:
            settings["hires_upscaler"] = A1111_UPSCALERS[key]
        else:
            settings["hires_upscaler"] = "lanczos"
            unused.append(f"Hires upscaler {fields['Hires upscaler']} (replayed with Lanczos)")
    if "refiner" not in settings:  # no Refiner field: it ran without one (not even a model's default refiner)
        settings["refiner"] = None
        settings.pop("refiner_start", None)
    return settings, unused


def _hires_scale(fields: dict, settings: dict, image: str) -> float:
    """A1111's `Hires resize: WxH` (a target size) as diffcli's --hires scale: the same factor on both sides of the
    first pass's Size, else a UsageError (diffcli scales both sides alike)."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", fields["Hires resize"])
    width, height = settings.get("width"), settings.get("height")
    if not match or not width or not height:
        raise UsageError(f"{image}: Hires resize {fields['Hires resize']!r} in its parameters is not WIDTHxHEIGHT "
                         "beside a Size")
    across, down = int(match.group(1)) / width, int(match.group(2)) / height
    if abs(across - down) > 0.02:
        raise UsageError(f"{image}: its hires fix resized {width}x{height} to {match.group(1)}x{match.group(2)}, "
                         "another factor on each side; diffcli's --hires scales both alike",
                         "run txt2img --hires with the factor you want")
    return round(across, 3)


def settings_from_diffcli(meta: dict) -> dict:
    """Replay settings from diffcli's own metadata: its keys as they are, the scheduler only when it is one of ours by
    name (else the model's own, which is what ran)."""
    from diffcli.pipeline import SCHEDULERS

    settings = {key: meta[key] for key in DIFFCLI_KEYS if key in meta}
    settings["scheduler"] = meta.get("scheduler") if meta.get("scheduler") in SCHEDULERS else None
    settings.pop("sampler", None)
    return settings


def resolve_scheduler(settings: dict, image: str) -> str | None:
    """The scheduler table name of the recorded sampler (A1111 names map through normalize_scheduler_name)."""
    from diffcli.pipeline import normalize_scheduler_name

    if "sampler" not in settings:
        return settings.get("scheduler")
    sampler = settings["sampler"]
    if not sampler:
        return None
    try:
        return normalize_scheduler_name(sampler)
    except UsageError:
        raise UsageError(f"{image} was made with sampler {sampler!r}, which diffcli does not have",
                         "pass --scheduler NAME to replay it with another one (see `diffcli schedulers`)") from None


def resolve_model_name(name: str | None, model_hash: str | None, image: str, allow_pickle: bool,
                       base: str | None = None, model_config: str | None = None) -> str | None:
    """The recorded model as --model takes it: its name as recorded, else a .safetensors file of that name (`base`:
    what completes a transformer-only file; `model_config`: a checkpoint's recorded --model-config); a model diffcli
    cannot find is a UsageError (--model overrides)."""
    from diffcli.errors import ModelError
    from diffcli.models import resolve_model

    if not name:
        return None
    candidates = [name] if Path(name).suffix else [name, f"{name}.safetensors"]
    for candidate in candidates:
        try:
            resolve_model(candidate, model_config, allow_pickle, base=base)
            return candidate
        except ModelError as exc:
            error = exc
            if Path(candidate).expanduser().exists():  # it is there, but refused: say why
                raise
    hashed = f" (hash {model_hash})" if model_hash else ""
    raise UsageError(f"{image} was made with model {name!r}{hashed}, which diffcli cannot find ({error.message})",
                     "pass --model with that checkpoint: a file, folder, Hub id or bundled name")


def recorded_dtype(settings: dict, device: str, dtype: str | None) -> str:
    """--dtype, else the recorded one when replaying on the same kind of device, else auto."""
    from diffcli.pipeline import resolve_device

    if dtype:
        return dtype
    recorded = DTYPE_NAMES.get(str(settings.get("dtype")))
    same_kind = str(settings.get("device", "")).split(":")[0] == resolve_device(device).split(":")[0]
    return recorded if recorded and same_kind else "auto"


def recorded_backend(settings: dict, notify) -> str:
    """The recorded --backend (OpenVINO's images replay on OpenVINO where it is installed), else auto."""
    from diffcli import extras

    recorded = settings.get("backend") or "auto"
    if recorded == "openvino" and not extras.available("openvino"):
        notify("replay: the image was made with --backend openvino, not installed here: using torch "
               "(pip install 'diffcli[openvino]' to replay it exactly)")
        return "auto"
    return recorded


def vae_found(value: str) -> bool:
    """Whether a recorded VAE is at hand: a file or folder here, or (with a '/' and no file suffix) a Hub id."""
    from diffcli.models import HUB_ID
    from diffcli.weights import WEIGHT_SUFFIXES

    return Path(value).expanduser().exists() or (HUB_ID.match(value) is not None and not value.lower().endswith(WEIGHT_SUFFIXES))


def fit_size(job, input_path: str, width: int | None, height: int | None) -> None:
    """An img2img (or edit) replay takes the input's own size (rounded to the model's multiple, as img2img does without
    --width/--height) when that is the recorded size; else the recorded (or given) size."""
    from PIL import Image

    from diffcli.models import resolve_model

    if width or height:
        return
    multiple = resolve_model(job.model.name, job.model.config, job.model.allow_pickle, base=job.model.base).size_multiple
    with Image.open(input_path) as image:
        own = (image.width - image.width % multiple, image.height - image.height % multiple)
    if own == (job.sampling.width, job.sampling.height):
        job.sampling.width = job.sampling.height = None


def note_model_hash(job, recorded: str | None, notify) -> None:
    """Say when the model found under the recorded name is not the one the image was made with (another hash)."""
    from diffcli.hashes import model_hash
    from diffcli.models import resolve_model

    if not recorded:
        return
    spec = resolve_model(job.model.name, job.model.config, job.model.allow_pickle, base=job.model.base)
    found = model_hash(spec)
    if found and len(str(recorded)) == len(found) and found.lower() != str(recorded).lower():  # (8-digit old hashes: no)
        notify(f"replay: model {spec.name!r} has hash {found}, the image was made with {recorded}: expect a different image")


def job_values(settings: dict, image: str, given: dict, notify) -> dict:
    """The builder's values (jobs.build) for a replay: the recorded settings, each overridden by a flag given."""
    allow_pickle, base = bool(given.get("allow_pickle")), given.get("base") or settings.get("base")
    vae = settings.get("vae")
    if not given.get("vae") and vae and not vae_found(vae):
        notify(f"replay: the image was made with VAE {vae!r}, not found here: using the model's own (pass --vae FILE "
               "to use it)")
        vae = None
    values = dict(given, prompt=settings["prompt"], negative=settings.get("negative") or "",
                  width=given.get("width") or settings.get("width"), height=given.get("height") or settings.get("height"),
                  model=given.get("model") or resolve_model_name(settings.get("model"), settings.get("model_hash"), image,
                                                                 allow_pickle, base, settings.get("model_config")),
                  dtype=recorded_dtype(settings, given.get("device") or "auto", given.get("dtype")),
                  backend=given.get("backend") or recorded_backend(settings, notify),
                  model_config=given.get("model_config") or settings.get("model_config"),
                  weighting=settings.get("weighting", True), vae=given.get("vae") or vae,
                  base=base,
                  steps=given.get("steps") or settings.get("steps"),
                  cfg=given["cfg"] if given.get("cfg") is not None else settings.get("cfg"),
                  scheduler=given.get("scheduler") or resolve_scheduler(settings, image),
                  seed=given["seed"] if given.get("seed") is not None else settings.get("seed"),
                  clip_skip=settings.get("clip_skip"), max_sequence_length=settings.get("max_sequence_length"),
                  true_cfg=settings.get("true_cfg"), lora_dir=given.get("lora_dir") or settings.get("lora_dir"),
                  embedding_dir=given.get("embedding_dir") or settings.get("embedding_dir"),
                  deep_cache=settings.get("deep_cache"), control=control_texts(settings.get("control")),
                  guess_mode=bool(settings.get("guess_mode")), **ip_texts(settings))
    if settings.get("task", "txt2img") == "img2img":
        return dict(values, input=settings["input"], strength=settings.get("strength", 0.75),
                    resize=settings.get("resize", "fit"))
    if settings.get("task") == "edit":
        return dict(values, input=settings["input"], image=list(settings.get("images") or []),
                    resize=settings.get("resize", "fit"))
    refiner = settings.get("refiner")
    return dict(values, variation_seed=settings.get("variation_seed"), variation_strength=settings.get("variation_strength"),
                hires=settings.get("hires_scale"), hires_steps=settings.get("hires_steps"),
                hires_strength=settings.get("hires_strength"), hires_upscaler=settings.get("hires_upscaler") or "latent",
                hires_upscaler_model=settings.get("hires_upscaler_model"), refiner_start=settings.get("refiner_start"),
                refiner="none" if "refiner" in settings and refiner is None else refiner)


def ip_texts(settings: dict) -> dict:
    """The recorded IP-Adapters as the --ip-adapter/--ip-image/--ip-scale/--ip-encoder values that make them again."""
    from diffcli.ip_adapter import texts

    return texts(settings)


def control_texts(units) -> list[str]:
    """The recorded ControlNet units as the --control texts that make them again."""
    from diffcli.controlnet import unit_text

    return [unit_text(unit) for unit in units or []]


def check_inputs(settings: dict, image: str) -> None:
    """img2img and edit need their input images at the recorded paths; other image tasks are not replayed yet."""
    task = settings.get("task", "txt2img")
    if task == "txt2img":
        return
    files = [settings.get("input")] + ([settings.get("mask")] if task == "inpaint" and settings.get("mask") != "alpha" else [])
    files += list(settings.get("images") or []) if task == "edit" else []
    missing = [f for f in files if not f or not Path(str(f)).is_file()]
    if missing:
        what = f"from {missing[0]!r}, which is not available" if missing[0] else "from an input image its metadata does not record"
        raise UsageError(f"{image} was made by {task} {what}", "replay makes txt2img images from their metadata alone; "
                         f"run `diffcli {task}` with the input instead")
    if task not in ("img2img", "edit"):
        raise UsageError(f"{image} was made by {task}: replay runs txt2img, img2img and edit images so far",
                         f"run `diffcli {task}` with the recorded settings instead")


def difference(original: str, replayed: str) -> dict:
    """How far the replayed image is from the original: max and mean absolute difference of 8-bit RGB values."""
    import numpy as np
    from PIL import Image

    with Image.open(original) as a, Image.open(replayed) as b:
        first, second = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    result = {"original": str(original), "replayed": str(replayed)}
    if first.shape != second.shape:
        return dict(result, identical=False, size_differs=True, original_size=[first.shape[1], first.shape[0]],
                    size=[second.shape[1], second.shape[0]])
    diff = np.abs(first - second)
    return dict(result, identical=not diff.any(), max_abs=int(diff.max()), mean_abs=round(float(diff.mean()), 4))


def summary(result: dict) -> str:
    """verify's line for people."""
    if result.get("size_differs"):
        return (f"verify: the replay is {result['size'][0]}x{result['size'][1]}, the original "
                f"{result['original_size'][0]}x{result['original_size'][1]}: no pixel comparison")
    if result["identical"]:
        return f"verify: identical to {result['original']} (max and mean absolute difference 0)"
    return (f"verify: differs from {result['original']}: max absolute difference {result['max_abs']}, "
            f"mean {result['mean_abs']:g} (8-bit values)")
