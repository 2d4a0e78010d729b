"""IP-Adapter image prompts (--ip-adapter MODEL --ip-image IMAGE [--ip-scale S], repeatable in step; --ip-encoder):
checked at plan time from file headers and configs (no weights read), loaded into the U-Net (SD 1.x, SDXL) or FLUX.1's
transformer at run time through diffusers' IPAdapterMixin / FluxIPAdapterMixin (load_ip_adapter with the tensors we
read, set_ip_adapter_scale, ip_adapter_image=), and recorded as A1111's ControlNet extension records its ip-adapter
units. FLUX.1's adapters are XLabs' (ip_adapter_proj_model.*, double_blocks.N.processor.*), read under diffusers' names.

MODEL is a .safetensors file (pickle only with --allow-pickle, judged from the bytes), a folder holding one such file,
or a Hub file `owner/repo/subfolder/file.safetensors` (h94/IP-Adapter/models/ip-adapter_sd15.safetensors). The CLIP
image encoder is --ip-encoder (a CLIPVisionModelWithProjection folder, or `owner/repo/subfolder` on the Hub), else the
`image_encoder` folder beside the file (h94/IP-Adapter's layout, and diffusers' load_ip_adapter default). A pipeline
has one image encoder, so every adapter of a job shares it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from diffcli.errors import ModelError, UsageError, first_line

FLAG = "--ip-adapter"
DEFAULT_SCALE = 1.0  # diffusers' set_ip_adapter_scale default, and A1111's unit weight
ENCODER_FOLDER = "image_encoder"  # diffusers' default, beside the adapter files in h94/IP-Adapter (models/, sdxl_models/)
TASKS = ("txt2img", "img2img", "inpaint")  # pipelines of these tasks take ip_adapter_image (outpaint is inpaint)
# The image encoder's width -> the preprocessor sd-webui-controlnet names in its infotext (PR #2710): ViT-H, bigG
A1111_MODULES = {1280: "ip-adapter_clip_h", 1664: "ip-adapter_clip_g"}
UNKNOWN_MODULE = "ip-adapter-auto"  # sd-webui-controlnet's own choice when the encoder is neither
CROSS_DIMS = {"sd1": 768, "sd2": 1024, "sdxl": 2048, "flux": 4096}  # the text width adapters attend with, configs absent
# A family's encoder when none is beside the adapter: XLabs' FLUX.1 adapter was trained on CLIP ViT-L/14's (diffusers' docs)
DEFAULT_ENCODERS = {"flux": "openai/clip-vit-large-patch14"}


@dataclass(frozen=True)
class Adapter:
    """One --ip-adapter with its --ip-image and --ip-scale, checked (the image not yet read)."""

    model: str  # as given: a file, a folder or a Hub file
    image: str
    scale: float = DEFAULT_SCALE

    def record(self) -> dict:
        return {"model": self.model, "image": self.image, "scale": self.scale}


@dataclass
class Resolved:
    """A plan's IP-Adapters: the weight file of each (a path, or a Hub (repo, subfolder, file)), the shared encoder
    and the images read."""

    adapters: list[Adapter] = field(default_factory=list)
    files: list = field(default_factory=list)  # str path, or ("hub", repo, subfolder, filename)
    encoder: str = ""  # a folder, or a Hub `owner/repo[/subfolder]`
    images: list = field(default_factory=list)  # PIL RGB, as given (the image processor sizes them)
    encoder_width: int | None = None  # the encoder's hidden size, when its config was read (A1111's module name)

    def record(self) -> dict:
        if not self.adapters:
            return {}
        out = {"ip_adapter": [a.record() for a in self.adapters], "ip_encoder": self.encoder}
        if self.encoder_width:
            out["ip_encoder_width"] = self.encoder_width
        return out


def parse(settings) -> list[Adapter]:
    """The job's --ip-adapter/--ip-image/--ip-scale lists paired in order; counts and scales checked (no file read)."""
    models, images, scales = list(settings.ip_adapter), list(settings.ip_image), list(settings.ip_scale)
    if not models:
        for flag, given in (("--ip-image", images), ("--ip-scale", scales), ("--ip-encoder", settings.ip_encoder)):
            if given:
                raise UsageError(f"{flag} works with {FLAG}", f"add {FLAG} MODEL, or drop {flag}")
        return []
    if len(images) != len(models):
        raise UsageError(f"{FLAG}: one --ip-image per adapter, got {len(models)} adapter(s) and {len(images)} image(s)",
                         "give the --ip-image of each --ip-adapter, in the same order")
    if scales and len(scales) != len(models):
        raise UsageError(f"--ip-scale: one per adapter or none (all {DEFAULT_SCALE:g}), got {len(scales)} for "
                         f"{len(models)} adapter(s)")
    return [Adapter(str(m), str(i), _scale(s)) for m, i, s in zip(models, images, scales or [DEFAULT_SCALE] * len(models))]


def _scale(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"--ip-scale must be a number, got {str(text)[:40]!r}",
                         "e.g. --ip-scale 0.6 (1 is full strength)") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--ip-scale must be a finite number >= 0, got {str(text)[:40]!r}", "0 turns the adapter off")
    return value


def resolve(job, spec) -> Resolved:
    """The job's adapters found and checked against the model (family, cross-attention width and layer count) and
    their encoder, each image read; raises UsageError before any weights load."""
    from diffcli import families
    from diffcli.images import load_image

    adapters = parse(job.adapters)
    if not adapters:
        return Resolved()
    family = families.get(spec.family)
    if not getattr(family, "ip_adapter", False) or job.task not in TASKS:
        kinds = ", ".join(name for name, f in families.FAMILIES.items() if getattr(f, "ip_adapter", False))
        raise UsageError(f"{FLAG}: IP-Adapters run on {kinds} models for txt2img, img2img and inpaint here, got "
                         f"{spec.name!r} ({spec.family}) for {job.command}")
    for flag, used in (("--hires", job.second.hires), ("--deep-cache", job.model.deep_cache),
                       ("--refiner (the model itself, on SDXL)", _refines_itself(job, spec))):
        if used:
            raise UsageError(f"{FLAG} with {flag}: not supported together yet", f"drop {flag.split()[0]}")
    allow_pickle = job.model.allow_pickle
    files = [_weight_file(a.model, allow_pickle) for a in adapters]
    encoders = {_encoder_of(a.model, f) for a, f in zip(adapters, files)}
    given = job.adapters.ip_encoder
    if not given and len(encoders) > 1:
        raise UsageError(f"{FLAG}: the adapters come with different image encoders ({', '.join(sorted(encoders))}); a "
                         "pipeline runs one", "pass --ip-encoder DIR, the CLIP image encoder they all take")
    encoder = given or next(iter(encoders))
    if not given and spec.family in DEFAULT_ENCODERS and not Path(encoder).expanduser().is_dir():
        encoder = DEFAULT_ENCODERS[spec.family]
    config = _check_encoder(encoder, allow_pickle, given=bool(given),
                            hub=bool(given) or isinstance(files[0], tuple) or encoder in DEFAULT_ENCODERS.values())
    cross = _model_cross_attention(spec)
    for adapter, file in zip(adapters, files):
        if isinstance(file, str) and _is_safetensors(file):
            from diffcli import weights

            check_tensors(adapter.model, weights.read_safetensors_header(file), cross, config, spec)
    images = [load_image(a.image, "--ip-image") for a in adapters]
    return Resolved(adapters, files, encoder, images, config.get("hidden_size") if config else None)


def _is_safetensors(path: str) -> bool:
    from diffcli import weights

    return weights.file_format(path) == weights.SAFETENSORS


def _weight_file(model: str, allow_pickle: bool):
    """A local adapter file (format and trust from its bytes), the one weight file of a folder, or a Hub file."""
    from diffcli import weights
    from diffcli.models import HUB_ID
    from diffcli.options import check_path

    check_path(FLAG, model)
    path = Path(model).expanduser()
    if path.is_file():
        weights.check(path, FLAG, allow_pickle)
        return str(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(weights.WEIGHT_SUFFIXES))
        safe = [p for p in found if p.name.lower().endswith(".safetensors")] or found
        if len(safe) != 1:
            raise UsageError(f"{FLAG} {model!r}: {'no weight file' if not safe else f'{len(safe)} weight files'} in the "
                             "folder", "name the adapter's .safetensors file itself")
        weights.check(safe[0], FLAG, allow_pickle)
        return str(safe[0])
    parts = model.split("/")
    if len(parts) < 3 or model.startswith((".", "/", "~")):
        raise UsageError(f"{FLAG} {model!r}: no such file or folder",
                         "a local .safetensors file or folder, or a Hub file: owner/repo/subfolder/file.safetensors")
    if HUB_ID.match("/".join(parts[:2])) and not model.startswith((".", "/", "~")):
        if not parts[-1].lower().endswith(".safetensors") and not allow_pickle:
            raise UsageError(f"{FLAG} {model!r}: not a .safetensors file (pickle files are refused)", weights.PICKLE_HINT)
        _offline_check("/".join(parts[:2]), "/".join(parts[2:]), FLAG, model)
        return ("hub", "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1])
    raise UsageError(f"{FLAG} {model!r}: no such file or folder, and not a Hub file (owner/repo/subfolder/file)")


def _encoder_of(model: str, file) -> str:
    """The default encoder: `image_encoder` beside the adapter file (a Hub file's subfolder, as diffusers looks)."""
    if isinstance(file, tuple):
        _, repo, subfolder, _ = file
        return "/".join(part for part in (repo, subfolder, ENCODER_FOLDER) if part)
    return str(Path(file).parent / ENCODER_FOLDER)


def _check_encoder(encoder: str, allow_pickle: bool, given: bool, hub: bool) -> dict | None:
    """A local encoder folder: a CLIP vision config and weights that pass weights.check; its config. A Hub encoder:
    in the cache when offline; None (its config is read when it loads)."""
    from diffcli import weights
    from diffcli.models import HUB_ID
    from diffcli.options import check_path

    flag = "--ip-encoder" if given else FLAG
    check_path(flag, encoder)
    path = Path(encoder).expanduser()
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UsageError(f"{flag}: no readable config.json in the image encoder folder {encoder}",
                             "a CLIPVisionModelWithProjection folder (save_pretrained)") from None
        if not isinstance(config, dict) or "clip_vision" not in str(config.get("model_type", "")):
            raise UsageError(f"{flag}: {encoder} is not a CLIP image encoder (its config says model_type "
                             f"{config.get('model_type') if isinstance(config, dict) else None!r})")
        weights.check_folder(path, flag, allow_pickle)
        if not any(path.glob("*.safetensors")) and not allow_pickle:
            raise UsageError(f"{flag}: no .safetensors weights in {encoder} (pickle files are refused)",
                             weights.PICKLE_HINT)
        return config
    parts = encoder.split("/")
    local = path.exists() or encoder.startswith((".", "/", "~"))
    if hub and not local and len(parts) >= 2 and HUB_ID.match("/".join(parts[:2])):
        _offline_check("/".join(parts[:2]), "/".join([*parts[2:], "config.json"]), flag, encoder)
        return None
    if given:
        raise UsageError(f"--ip-encoder {encoder!r}: no such folder, and not a Hub id")
    raise UsageError(f"{FLAG}: no image encoder at {encoder}",
                     "pass --ip-encoder DIR (a CLIPVisionModelWithProjection folder, e.g. h94/IP-Adapter's "
                     "models/image_encoder)")


def _offline_check(repo: str, filename: str, flag: str, given: str) -> None:
    """Offline (HF_HUB_OFFLINE, or the Hub does not answer), a Hub file must be in the cache: one line now, not after
    the model has loaded."""
    from huggingface_hub import constants, try_to_load_from_cache

    from diffcli.models import hub_unreachable

    why = hub_unreachable()
    if not (constants.HF_HUB_OFFLINE or why):
        return
    if not isinstance(try_to_load_from_cache(repo, filename), str):
        raise ModelError(f"{flag} {given!r}: no such local file, and not in the Hugging Face cache and the Hub "
                         "cannot be reached"
                         + (f": {why}" if why else " (HF_HUB_OFFLINE)"),
                         f"download it once with `hf download {repo} {filename}`, or pass a local file or folder")


def _model_cross_attention(spec) -> tuple[int | None, int | None]:
    """(cross-attention width, number of cross-attention layers) of the model's U-Net (or FLUX.1's transformer: the
    text width and its double-stream blocks), from its config when at hand; else the family's width and no count."""
    from diffcli.models import component_config

    model = component_config(spec, "transformer/config.json" if spec.family == "flux" else "unet/config.json")
    if not model:  # (a Hub model's is the config models.resolve_model fetched, or found, in the HF cache)
        return CROSS_DIMS.get(spec.family), None
    if spec.family == "flux":
        dim, layers = model.get("joint_attention_dim", 4096), model.get("num_layers", 19)  # the class defaults
        return (dim if isinstance(dim, int) else None), (layers if isinstance(layers, int) else None)
    dim = model.get("cross_attention_dim")
    return (dim if isinstance(dim, int) else None), _cross_layers(model)


def _cross_layers(unet: dict) -> int | None:
    """How many cross-attention layers a UNet2DConditionModel config builds (diffusers' unet_2d_blocks: layers x
    transformer depth per CrossAttn block, one more layer per up block, the mid block's depth); None if unsure."""
    try:
        down, up = unet["down_block_types"], unet["up_block_types"]
        layers = unet.get("layers_per_block", 2)
        depth = unet.get("transformer_layers_per_block", 1)
        depth = [depth] * len(down) if isinstance(depth, int) else list(depth)
        up_depth = unet.get("reverse_transformer_layers_per_block") or list(reversed(depth))
        layers = [layers] * len(down) if isinstance(layers, int) else list(layers)
        count = sum(n * d for kind, n, d in zip(down, layers, depth) if "CrossAttn" in kind)
        count += sum((n + 1) * (d if isinstance(d, int) else max(d)) for kind, n, d in zip(up, reversed(layers), up_depth)
                     if "CrossAttn" in kind)
        mid = unet.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid and "CrossAttn" in mid:
            count += depth[-1] if isinstance(depth[-1], int) else max(depth[-1])
        return count
    except (KeyError, TypeError, ValueError):
        return None


def diffusers_name(key: str) -> str:
    """An adapter tensor's name as diffusers' loaders take it: XLabs' FLUX.1 names (ip_adapter_proj_model.*,
    double_blocks.N.processor.ip_adapter_double_stream_k_proj.*) renamed as load_ip_adapter renames a FLUX.1 file."""
    head, _, rest = key.partition(".")
    if head == "ip_adapter_proj_model":
        return "image_proj." + rest
    if head == "double_blocks":
        return "ip_adapter." + (rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                                .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", ""))
    return key


def check_tensors(model: str, header: dict, cross: tuple, encoder: dict | None, spec) -> None:
    """An IP-Adapter state dict's names and shapes (a safetensors header, or tensors) fit the model and encoder."""
    shape = lambda entry: list(entry["shape"]) if isinstance(entry, dict) else list(entry.shape)  # noqa: E731
    names = {diffusers_name(k): shape(v) for k, v in header.items() if k != "__metadata__"}
    proj = {k.removeprefix("image_proj."): v for k, v in names.items() if k.startswith("image_proj.")}
    keys = {k: v for k, v in names.items() if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight")}
    if not proj or not keys:
        raise UsageError(f"{FLAG} {model!r}: not an IP-Adapter (no image_proj.* and ip_adapter.*.to_k_ip tensors)")
    face_id = "proj.weight" not in proj and "proj.3.weight" not in proj and (  # diffusers' order of the layouts
        "perceiver_resampler.proj_in.weight" in proj or "norm.weight" in proj)
    if face_id or any("lora" in k for k in names):
        raise UsageError(f"{FLAG} {model!r}: a FaceID adapter, which reads face embeddings (insightface), not an image",
                         "use an image IP-Adapter (ip-adapter_sd15, ip-adapter-plus...)")
    dim, layers = cross
    widths = {v[1] for v in keys.values() if len(v) == 2}
    if dim and widths != {dim}:
        made = "/".join(f"{w}" for w in sorted(widths))
        family = {v: k for k, v in CROSS_DIMS.items()}.get(next(iter(widths)) if len(widths) == 1 else None)
        raise UsageError(f"{FLAG} {model!r}: made for a model with {made}-wide cross-attention"
                         + (f" ({family})" if family else "") + f", got {spec.name!r} ({spec.family}, {dim})",
                         "use the adapter made for this model's family")
    if layers and len(keys) != layers:
        raise UsageError(f"{FLAG} {model!r}: has {len(keys)} cross-attention layers, {spec.name!r} has {layers}",
                         "use the adapter made for this model")
    if encoder:
        wanted, got = None, None
        if "proj.weight" in proj:  # plain: the encoder's projected image embedding
            wanted, got = proj["proj.weight"][-1], encoder.get("projection_dim")
        elif "proj_in.weight" in proj:  # plus: the encoder's penultimate hidden states
            wanted, got = proj["proj_in.weight"][-1], encoder.get("hidden_size")
        if wanted and got and wanted != got:
            raise UsageError(f"{FLAG} {model!r}: takes {wanted}-wide image embeddings, its image encoder gives {got}",
                             "pass --ip-encoder with the encoder it was trained with")


# --- run time: loaded into the pipeline's U-Net (cached per process, like the pipeline)

_ENCODERS: dict[tuple, object] = {}  # (encoder, device, dtype) -> CLIPVisionModelWithProjection


def _refines_itself(job, spec) -> bool:
    """An SDXL model as its own --refiner: the refiner's pipeline shares the U-Net that holds the adapters, and its
    call (which has no image prompt) would fail on them. Another refiner runs its steps without the adapter."""
    from diffcli import refiner
    from diffcli.models import resolve_model

    name = refiner.active(job.second)
    return spec.family == "sdxl" and bool(name) and resolve_model(name).location == spec.location


def loaded(pipe) -> bool:
    """Whether the pipeline's U-Net or transformer has IP-Adapters in (their attention processors cannot be sliced)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return getattr(denoiser, "diffcli_ip_adapters", None) is not None


def activate(pipe, resolved: Resolved, device: str, dtype, allow_pickle: bool) -> None:
    """Give the pipeline exactly the job's IP-Adapters at their scales, or none (the U-Net or transformer is shared by
    every task's pipeline of the cached model: an earlier job's adapters must not reach this one)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        return
    loaded = getattr(denoiser, "diffcli_ip_adapters", None)
    wanted = (tuple(map(str, resolved.files)), resolved.encoder) if resolved.adapters else None
    if loaded is not None and loaded != wanted:
        pipe.unload_ip_adapter()
        denoiser.diffcli_ip_adapters = None
    if wanted is None:
        return
    encoder = _encoder(resolved.encoder, device, dtype, allow_pickle)
    if getattr(pipe, "image_encoder", None) is not encoder:  # a pipeline of another task sharing the denoiser
        pipe.register_modules(image_encoder=encoder)
    if loaded != wanted:
        states = [_state_dict(file, a.model, allow_pickle) for file, a in zip(resolved.files, resolved.adapters)]
        count = len(states)
        for state, adapter in zip(states, resolved.adapters):  # the encoder as loaded (a Hub one is unread at plan time)
            flat = {f"{head}.{name}": tensor for head in ("image_proj", "ip_adapter") for name, tensor in state[head].items()}
            check_tensors(adapter.model, flat, (None, None), encoder.config.to_dict(), None)
        if any(type(p).__name__.startswith("Sliced") for p in getattr(denoiser, "attn_processors", {}).values()):
            denoiser.set_default_attn_processor()  # diffusers' loader cannot rebuild sliced processors (--low-vram's)
        try:
            pipe.load_ip_adapter(states, subfolder=[""] * count, weight_name=[""] * count)
        except (KeyError, RuntimeError, ValueError) as exc:
            pipe.unload_ip_adapter()
            raise UsageError(f"{FLAG} cannot be loaded into this model: {first_line(exc)}") from exc
        denoiser.diffcli_ip_adapters = wanted
    elif getattr(pipe, "feature_extractor", None) is None:
        from transformers import CLIPImageProcessor

        size = encoder.config.image_size
        pipe.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
    scales = [a.scale for a in resolved.adapters]
    pipe.set_ip_adapter_scale(scales[0] if len(scales) == 1 else scales)  # FLUX.1 reads a list of one as per-block


def _encoder(encoder: str, device: str, dtype, allow_pickle: bool):
    """The CLIP image encoder, loaded once per process (a folder, or `owner/repo[/subfolder]` from the Hub)."""
    key = (encoder, device, str(dtype))
    if key not in _ENCODERS:
        from transformers import CLIPVisionModelWithProjection

        path = Path(encoder).expanduser()
        where = {"pretrained_model_name_or_path": str(path)} if path.is_dir() else \
            {"pretrained_model_name_or_path": "/".join(encoder.split("/")[:2]),
             "subfolder": "/".join(encoder.split("/")[2:])}
        from diffusers.utils import is_transformers_version

        typed = {"dtype": dtype} if is_transformers_version(">=", "4.56.0") else {"torch_dtype": dtype}  # (as diffusers)
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(**where, **typed,
                                                                  use_safetensors=None if allow_pickle else True)
        except OSError as exc:
            raise ModelError(f"--ip-encoder {encoder!r} cannot be loaded: {first_line(exc)}",
                             "is it in the Hugging Face cache, or a local CLIPVisionModelWithProjection folder?") from None
        _ENCODERS[key] = model.to(device).eval()
    return _ENCODERS[key]


def _state_dict(file, model: str, allow_pickle: bool) -> dict:
    """{"image_proj": {...}, "ip_adapter": {...}} of an adapter file, read as data (weights.load_state_dict); a Hub
    file fetched first, then judged by its bytes as a local one."""
    from diffcli import weights

    if isinstance(file, tuple):
        file = _download(*file[1:], model)
        weights.check(file, FLAG, allow_pickle)
        if _is_safetensors(file):
            check_tensors(model, weights.read_safetensors_header(file), (None, None), None, None)
    state = weights.load_state_dict(file, FLAG, allow_pickle)
    if isinstance(state.get("image_proj"), dict) and isinstance(state.get("ip_adapter"), dict):
        return {"image_proj": state["image_proj"], "ip_adapter": state["ip_adapter"]}  # the original .bin layout
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        head, _, rest = diffusers_name(key).partition(".")
        if head in nested:
            nested[head][rest] = value
    return nested


def _download(repo: str, subfolder: str, filename: str, model: str) -> str:
    """A Hub adapter file (the HF cache first; offline: the cache only), its failure one line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo, filename, subfolder=subfolder or None)
    except LocalEntryNotFoundError:
        raise ModelError(f"{FLAG} {model!r} is not in the Hugging Face cache and the Hub cannot be reached",
                         f"download it once with `hf download {repo}`, or pass a local file") from None
    except EntryNotFoundError:
        raise ModelError(f"{FLAG} {model!r}: no such file in {repo}") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{FLAG} {model!r}: no such repository on the Hub (or it is private)") from None
    except OSError as exc:
        raise ModelError(f"{FLAG} {model!r}: {first_line(exc)}") from None


def call_kwargs(resolved: Resolved) -> dict:
    """ip_adapter_image of a pipeline call: one image per adapter (a list for several)."""
    return {"ip_adapter_image": resolved.images[0] if len(resolved.images) == 1 else list(resolved.images)}


def a1111_fields(meta: dict) -> dict:
    """`ControlNet N: "Module: ip-adapter_clip_h, Model: ..., Weight: ..."` after the --control units, as A1111's
    ControlNet extension writes an IP-Adapter unit."""
    fields = {}
    first = len(meta.get("control") or [])
    module = A1111_MODULES.get(meta.get("ip_encoder_width"), UNKNOWN_MODULE)
    for index, unit in enumerate(meta.get("ip_adapter") or [], start=first):
        parts = [f"Module: {module}", f"Model: {Path(unit['model']).stem}", f"Weight: {unit['scale']:g}",
                 "Resize Mode: Crop and Resize", "Guidance Start: 0", "Guidance End: 1", "Control Mode: Balanced"]
        fields[f"ControlNet {index}"] = '"' + ", ".join(parts) + '"'
    return fields


def texts(meta: dict) -> dict:
    """The --ip-adapter/--ip-image/--ip-scale/--ip-encoder values of recorded settings (replay)."""
    units = meta.get("ip_adapter") or []
    if not units:
        return {}
    return {"ip_adapter": [u["model"] for u in units], "ip_image": [u["image"] for u in units],
            "ip_scale": [str(u["scale"]) for u in units], "ip_encoder": meta.get("ip_encoder")}
