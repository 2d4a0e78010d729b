"""AUTOMATIC1111's web API shapes: its request fields as diffcli option values, and diffcli's images and records as
its responses (base64 PNGs with `parameters`, `info` as a JSON string). Unknown fields are ignored, as A1111 does;
a known field with a value diffcli cannot honour is refused, naming the field."""

from __future__ import annotations

import json

from diffcli.errors import UsageError

# inpainting_fill: 0 fill, 1 original, 2 latent noise, 3 latent nothing (A1111's order)
FILLS = ("fill", "original", "latent-noise", "latent-nothing")
# resize_mode: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)
RESIZE_MODES = ("stretch", "crop", "fit", "stretch")
HIRES_UPSCALERS = {"latent": "latent", "lanczos": "lanczos", "sd x4": "x4"}  # A1111 names (lower case, prefix) -> ours
SCHEDULES = ("automatic", "karras")  # A1111 1.9's "Schedule type" values diffcli has (uniform, exponential... not)
PIXEL_UPSCALERS = ("none", "lanczos", "nearest")  # extra-single-image upscalers that need no model


def _number(body: dict, key: str, kind, default=None):
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise UsageError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {json.dumps(value)[:40]}")
    return kind(value)


def _text(body: dict, key: str, default: str = "") -> str:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise UsageError(f"{key}: expected a string, got {json.dumps(value)[:40]}")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value in (0, 1, None) or isinstance(value, bool):
        return bool(value)
    raise UsageError(f"{key}: expected true or false, got {json.dumps(value)[:40]}")


def scheduler_name(body: dict) -> str | None:
    """sampler_name (+ A1111 1.9's separate `scheduler` schedule type) as one diffcli scheduler name."""
    sampler = _text(body, "sampler_name") or _text(body, "sampler_index")
    schedule = _text(body, "scheduler").strip().lower()
    if not sampler:
        return None
    if schedule and schedule not in SCHEDULES:
        raise UsageError(f"scheduler {body['scheduler']!r} is not available", f"choose one of: {', '.join(SCHEDULES)}")
    if schedule == "karras" and "karras" not in sampler.lower():
        sampler = f"{sampler} Karras"
    from diffcli.pipeline import normalize_scheduler_name

    try:
        return normalize_scheduler_name(sampler)
    except UsageError as exc:
        raise UsageError(f"sampler_name {sampler!r} is not available", exc.hint) from None


# A1111 ControlNet modules -> diffcli preprocess types, and which of threshold_a/threshold_b is which parameter
MODULES = {"none": ("none", ()), "canny": ("canny", ("low", "high")), "threshold": ("threshold", ("level",)),
           "scribble_xdog": ("scribble", ("level",)), "scribble": ("scribble", ()), "lineart_standard": ("lineart", ()),
           "tile_resample": ("tile", ("factor",)), "blur_gaussian": ("blur", ("sigma",)), "depth_midas": ("depth", ()),
           "openpose": ("openpose", ()), "normal_bae": ("normal", ()), "mlsd": ("mlsd", ()), "softedge_hed": ("hed", ()),
           "softedge_pidinet": ("softedge", ()), "lineart_anime": ("lineart_anime", ())}
CONTROL_RESIZE = {0: "stretch", 1: "crop", 2: "fit", "Just Resize": "stretch", "Crop and Resize": "crop",
                  "Resize and Fill": "fit"}


def controlnet_units(body: dict) -> list[dict] | None:
    """alwayson_scripts.controlnet.args (A1111's ControlNet extension) as diffcli's request units; None: none given."""
    script = (body.get("alwayson_scripts") or {}).get("controlnet") if isinstance(body.get("alwayson_scripts"), dict) else None
    if not script:
        return None
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise UsageError("alwayson_scripts.controlnet.args: expected a list of units")
    units = []
    for index, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{index}]"
        if not isinstance(unit, dict):
            raise UsageError(f"{where}: expected an object")
        if unit.get("enabled") is False:
            continue
        module = str(unit.get("module") or "none").lower()
        if module.startswith("ip-adapter"):  # ip-adapter_clip_h, _clip_g, -auto...: the model is a --controlnet-dir file
            units.append({"ip_adapter": True, "model": unit.get("model"), "image": unit.get("input_image") or unit.get("image"),
                          "scale": _number(unit, "weight", float, 1.0)})
            continue
        if module not in MODULES:
            raise UsageError(f"{where}.module {module!r} is not available", f"one of: {', '.join(MODULES)}")
        kind, names = MODULES[module]
        thresholds = [unit.get("threshold_a"), unit.get("threshold_b")]
        params = {name: value for name, value in zip(names, thresholds) if isinstance(value, (int, float))
                  and not isinstance(value, bool) and value >= 0}  # A1111 sends -1 for "unused"
        resize = CONTROL_RESIZE.get(unit.get("resize_mode", 1))
        if resize is None:
            raise UsageError(f"{where}.resize_mode {unit.get('resize_mode')!r} is not available")
        units.append({"type": kind, "params": params, "image": unit.get("input_image") or unit.get("image"),
                      "model": unit.get("model"), "weight": _number(unit, "weight", float, 1.0),
                      "start": _number(unit, "guidance_start", float, 0.0), "end": _number(unit, "guidance_end", float, 1.0),
                      "resize": resize})
        mode = unit.get("control_mode") or 0  # (absent or null: A1111's default, Balanced)
        if mode in (2, "ControlNet is more important"):
            units[-1]["guess"] = True
        elif mode not in (0, "Balanced"):
            raise UsageError(f"{where}.control_mode {mode!r} is not available",
                             "0 (Balanced) or 2 (ControlNet is more important: diffusers' guess mode)")
    control = [unit for unit in units if not unit.get("ip_adapter")]
    if len({bool(unit.get("guess")) for unit in control}) > 1:
        raise UsageError("alwayson_scripts.controlnet: control_mode must be the same for every unit",
                         "diffusers' guess mode holds for all ControlNets of a call")
    return units


def common_values(body: dict) -> dict:
    """Fields txt2img and img2img share, as option values (None: diffcli's default)."""
    if _flag(body, "restore_faces") or _flag(body, "tiling"):
        raise UsageError("restore_faces and tiling are not available in diffcli")
    if body.get("styles"):
        raise UsageError("styles: prompt styles are not available in diffcli", "put the style's words in the prompt")
    batch_size = _number(body, "batch_size", int, 1)
    n_iter = _number(body, "n_iter", int, 1)
    if batch_size < 1 or n_iter < 1:
        raise UsageError(f"batch_size and n_iter must be at least 1, got {batch_size} and {n_iter}")
    values = {
        "prompt": _text(body, "prompt"), "negative": _text(body, "negative_prompt"),
        "seed": _number(body, "seed", int, -1), "steps": _number(body, "steps", int, None),
        "cfg": _number(body, "cfg_scale", float, None), "scheduler": scheduler_name(body),
        "batch_size": batch_size, "num_images": batch_size * n_iter,
    }
    subseed_strength = _number(body, "subseed_strength", float, 0) or 0
    if subseed_strength > 0:
        from diffcli.options import draw_seed

        subseed = _number(body, "subseed", int, -1)
        values.update(variation_seed=draw_seed() if subseed == -1 else subseed, variation_strength=subseed_strength)
    units = controlnet_units(body)
    ip_units = [unit for unit in units or [] if unit.pop("ip_adapter", False)]  # IP-Adapter units: diffcli's own flags
    if ip_units:
        values["ip_adapter"] = ip_units
        units = [unit for unit in units if unit not in ip_units]
    if units:
        values["guess_mode"] = any(unit.pop("guess", False) for unit in units)
        values["controlnet"] = units
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise UsageError("override_settings: expected an object")
    if overrides.get("sd_model_checkpoint"):
        values["model"] = _text(overrides, "sd_model_checkpoint")
    clip_skip = _number(overrides, "CLIP_stop_at_last_layers", int, None)
    if clip_skip and clip_skip > 1:
        values["clip_skip"] = clip_skip
    return values


def txt2img_values(body: dict) -> dict:
    values = dict(common_values(body), width=_number(body, "width", int, 512), height=_number(body, "height", int, 512))
    if _flag(body, "enable_hr"):
        upscaler = _text(body, "hr_upscaler", "Latent").strip().lower()
        key = next((known for known in HIRES_UPSCALERS if upscaler.startswith(known)), None)
        if key is None:
            raise UsageError(f"hr_upscaler {body['hr_upscaler']!r} is not available", "Latent, Lanczos or SD x4")
        values.update(hires=_number(body, "hr_scale", float, 2.0), hires_upscaler=HIRES_UPSCALERS[key],
                      hires_steps=_number(body, "hr_second_pass_steps", int, 0) or None,
                      hires_strength=_number(body, "denoising_strength", float, 0.7))
    return values


def img2img_values(body: dict) -> tuple[str, dict]:
    """(command, values): img2img, or inpaint when the request has a mask."""
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise UsageError("init_images: expected a list with one base64 image")
    values = dict(common_values(body), input=images[0])
    strength = _number(body, "denoising_strength", float, 0.75)
    resize_mode = _number(body, "resize_mode", int, 0)
    if not 0 <= resize_mode < len(RESIZE_MODES):
        raise UsageError(f"resize_mode must be 0-3, got {resize_mode}")
    if not body.get("mask"):
        values.update(strength=strength, resize=RESIZE_MODES[resize_mode], width=_number(body, "width", int, None),
                      height=_number(body, "height", int, None))
        return "img2img", values
    fill = _number(body, "inpainting_fill", int, 1)
    if not 0 <= fill < len(FILLS):
        raise UsageError(f"inpainting_fill must be 0-3, got {fill}")
    values.update(mask=body["mask"], strength=strength, fill=FILLS[fill], mask_blur=_number(body, "mask_blur", int, 4),
                  invert_mask=bool(_number(body, "inpainting_mask_invert", int, 0)),
                  masked_only=_flag(body, "inpaint_full_res"),
                  padding=_number(body, "inpaint_full_res_padding", int, 32), resize_mask=True)
    return "inpaint", values


def info(records: list[dict], values: dict, started: str, model: str) -> str:
    """A1111's `info` JSON string for a response's images."""
    from diffcli.output import a1111_parameters

    first = records[0] if records else {}
    return json.dumps({
        "prompt": values.get("prompt", ""), "all_prompts": [r["prompt"] for r in records],
        "negative_prompt": values.get("negative", ""), "all_negative_prompts": [r["negative"] for r in records],
        "seed": first.get("seed", values.get("seed")), "all_seeds": [r["seed"] for r in records],
        "subseed": first.get("variation_seed", -1), "all_subseeds": [r.get("variation_seed", -1) for r in records],
        "subseed_strength": first.get("variation_strength", 0), "width": first.get("width"), "height": first.get("height"),
        "sampler_name": first.get("sampler"), "cfg_scale": first.get("cfg"), "steps": first.get("steps"),
        "batch_size": values.get("batch_size", 1), "restore_faces": False, "sd_model_name": model,
        "sd_model_hash": first.get("model_hash"), "denoising_strength": first.get("strength", first.get("hires_strength")),
        "clip_skip": first.get("clip_skip", 1), "styles": [], "index_of_first_image": 0,
        "infotexts": [a1111_parameters(r) for r in records], "job_timestamp": started,
        "is_using_inpainting_conditioning": False, "version": f"diffcli {first.get('versions', {}).get('diffcli', '')}",
        "extra_generation_params": {}, "ids": [r["id"] for r in records],
    })


def png_info(data: bytes) -> dict:
    """/sdapi/v1/png-info: the `parameters` text, the other text chunks, and the parsed fields."""
    import io

    from PIL import Image, UnidentifiedImageError

    from diffcli.replay import parse_a1111, user_comment

    try:
        image = Image.open(io.BytesIO(data))
        items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        exif = image.getexif().get_ifd(0x8769).get(0x9286)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"image: not an image file diffcli can read ({exc})") from None
    text = items.pop("parameters", None) or (user_comment(exif) if exif else None) or ""
    parameters = {}
    if text:
        prompt, negative, fields = parse_a1111(text)
        parameters = dict(fields, Prompt=prompt, **({"Negative prompt": negative} if negative else {}))
    return {"info": text, "items": items, "parameters": parameters}


def preview(latents) -> str | None:
    """A cheap preview of the latest latents as base64 PNG (A1111's 'Approx cheap': a fixed linear map of SD's four
    latent channels to RGB); None for latents of another shape."""
    import base64
    import io

    import torch
    from PIL import Image

    if latents is None or latents.ndim != 4 or latents.shape[1] != 4:
        return None
    factors = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                            [-0.184, -0.271, -0.473]])
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), factors)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()
