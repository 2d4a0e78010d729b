"""`--vae` (A1111's "SD VAE"): another AutoencoderKL in place of the model's own, checked at plan time, loaded with
the pipeline (which is cached per VAE).

A VAE is a diffusers folder (config.json + weights; a whole pipeline folder's vae/ works too), a Hub id (loaded with
from_pretrained under --model's cache and offline rules), or a single file: an original-layout (A1111/CompVis) VAE
such as vae-ft-mse-840000-ema-pruned.safetensors, or a diffusers-layout state dict. A single file has no config, so it
is built with the model's own VAE config (diffusers' `from_single_file`, no network). Every file passes weights.check
first; a VAE whose latent channels differ from the model's is refused before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffcli import weights
from diffcli.errors import ModelError, first_line

DECODER_IN = "decoder.conv_in.weight"  # (channels, latent channels, 3, 3) in both layouts: tells a VAE's latent width
QUANT_CONV = "quant_conv.weight"  # SD 1.x/2.x/XL VAEs have it; SD3's and FLUX.1's (use_quant_conv false) have none
# The latent layouts by quant conv, for the message refusing a VAE of another one.
LAYOUTS = {True: "the SD 1.x/2.x/XL layout (quant convs)", False: "the SD3/FLUX.1 layout (no quant convs)"}
FILE_PREFIXES = ("", "first_stage_model.", "vae.")  # a VAE alone, or the VAE inside a full checkpoint


@dataclass(frozen=True)
class VaeSpec:
    """Where a --vae lives and how it loads, known before any weights load (hashable: part of the pipeline cache key)."""

    source: str  # "folder" | "single_file" | "hub"
    location: str  # folder or file path, or Hub repo id
    name: str  # as the user named it: recorded in the metadata
    fmt: str | None = None  # single file: its format from its bytes (weights.file_format)
    config_dir: str | None = None  # single file: the folder of the model's own VAE config.json (the architecture)
    subfolder: str | None = None  # "vae" when a whole pipeline folder or repo was given
    revision: str | None = None  # a Hub VAE's snapshot (commit) in the cache


def resolve(value: str, spec, allow_pickle: bool) -> VaeSpec:
    """--vae VALUE for the model `spec`: found, its weights' format allowed, and its latent channels the model's."""
    from diffcli.models import HUB_ID
    from diffcli.options import check_path

    check_path("--vae", value)
    path = Path(value).expanduser()
    model_config = model_vae_config(spec)
    _check_own_kind(value, spec, model_config)
    if path.is_dir():
        folder, subfolder = (path, None) if (path / "config.json").is_file() else (path / "vae", "vae")
        if not (folder / "config.json").is_file():
            raise ModelError(f"--vae {value!r}: folder has no config.json", "expected a diffusers AutoencoderKL folder "
                             "(save_pretrained), or a single .safetensors file")
        weights.check_folder(folder, "--vae", allow_pickle)
        vae = VaeSpec("folder", str(path), value, subfolder=subfolder)
        channels, quant = _config_channels(folder / "config.json"), _config_quant(folder / "config.json")
    elif path.is_file():
        fmt = weights.check(path, "--vae", allow_pickle)
        vae = VaeSpec("single_file", str(path), value, fmt=fmt, config_dir=str(model_config))
        channels = _file_channels(path) if fmt == weights.SAFETENSORS else None  # a pickle's shapes show when it loads
        quant = _file_quant(path) if fmt == weights.SAFETENSORS else None
    elif value.lower().endswith(weights.WEIGHT_SUFFIXES) or value.startswith((".", "/", "~")) or not HUB_ID.match(value):
        raise ModelError(f"--vae {value!r}: no such file or folder", "give a VAE .safetensors file, a diffusers folder or a Hub id")
    else:
        vae, config = _from_hub(value)
        channels, quant = _config_channels(config), _config_quant(config)
    own = _config_channels(model_config / "config.json")
    if channels is not None and channels != own:
        raise ModelError(f"--vae {value!r} has {channels} latent channels, the model {spec.name!r} has {own}",
                         "use a VAE made for this model family")
    own_quant = _config_quant(model_config / "config.json")
    if quant is not None and quant != own_quant:
        raise ModelError(f"--vae: the model {spec.name!r} needs a VAE of {LAYOUTS[own_quant]}, got {value!r} of "
                         f"{LAYOUTS[quant]}", "use a VAE made for this model family")
    return vae


def _check_own_kind(value: str, spec, model_config: Path) -> None:
    """Refuse --vae for a model whose VAE is not an AutoencoderKL (Qwen-Image's video VAE): nothing else replaces it."""
    from diffcli.models import read_json

    own = read_json(model_config / "config.json").get("_class_name", "AutoencoderKL")
    if own != "AutoencoderKL":
        raise ModelError(f"--vae: replaces an AutoencoderKL, the model {spec.name!r} has a VAE of another kind ({own}), "
                         f"got {value!r}", "leave --vae out")


def model_vae_config(spec) -> Path:
    """The folder holding the model's own VAE config.json: its folder's vae/, a single file's config folder's, or the
    Hub cache's (fetched by models._from_hub)."""
    if spec.source == "hub":
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(spec.location, "vae/config.json", revision=spec.revision, local_files_only=True)).parent
        except Exception as exc:  # noqa: BLE001 - not cached: the model has no VAE config there
            raise ModelError(f"--vae: model {spec.name!r} has no VAE config in the cache: {first_line(exc)}") from None
    folder = Path(spec.config_dir or spec.location) / "vae"
    if not (folder / "config.json").is_file():
        raise ModelError(f"--vae: model {spec.name!r} has no VAE config ({folder / 'config.json'})",
                         "--vae replaces the VAE of a Stable Diffusion model")
    return folder


def _config_channels(path: Path) -> int:
    from diffcli.models import read_json

    return int(read_json(Path(path)).get("latent_channels", 4))


def _config_quant(path: Path) -> bool:
    """Whether a VAE config has quant convs (the SD layout; diffusers' default when it does not say)."""
    from diffcli.models import read_json

    return bool(read_json(Path(path)).get("use_quant_conv", True))


def _file_quant(path: Path) -> bool:
    """Whether a safetensors VAE has quant convs (the SD layout), from its header."""
    header = weights.read_safetensors_header(path)
    return any(prefix + QUANT_CONV in header for prefix in FILE_PREFIXES)


def _file_channels(path: Path) -> int:
    """The latent channels of a safetensors VAE, from its header (decoder.conv_in's input width)."""
    header = weights.read_safetensors_header(path)
    for prefix in FILE_PREFIXES:
        entry = header.get(prefix + DECODER_IN)
        if entry and len(entry.get("shape", ())) == 4:
            return int(entry["shape"][1])
    raise ModelError(f"--vae {str(path)!r} holds no VAE decoder ({DECODER_IN})", "is it a VAE file at all?")


def _from_hub(repo_id: str) -> tuple[VaeSpec, Path]:
    """A Hub VAE's spec and cached config.json (root, else vae/), under --model's cache and offline rules."""
    from huggingface_hub import hf_hub_download

    from diffcli.models import hub_unreachable

    unreachable = hub_unreachable()
    for subfolder in (None, "vae"):
        try:
            config = Path(hf_hub_download(repo_id, "config.json", subfolder=subfolder,
                                          **({"local_files_only": True} if unreachable else {})))
        except Exception as exc:  # noqa: BLE001 - missing file, repo, network: tried below, then one message
            error = exc
            continue
        return VaeSpec("hub", repo_id, repo_id, subfolder=subfolder, revision=config.parent.name if not subfolder
                       else config.parent.parent.name), config
    where = f"the Hub cannot be reached ({unreachable})" if unreachable else first_line(error)
    raise ModelError(f"--vae {repo_id!r}: no VAE config.json in the Hugging Face cache or on the Hub: {where}",
                     f"download it once with `hf download {repo_id}`, or pass a local folder or .safetensors file")


def load(vae: VaeSpec, dtype, allow_pickle: bool):
    """The AutoencoderKL of `vae` in `dtype`; a failure is one ModelError line (exit 2)."""
    import warnings

    from diffusers import AutoencoderKL

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if vae.source == "single_file":
                state = weights.load_state_dict(vae.location, "--vae", allow_pickle)
                state = state.get("state_dict", state)  # original .ckpt files nest their tensors
                return AutoencoderKL.from_single_file(state, config=vae.config_dir, torch_dtype=dtype, local_files_only=True)
            return AutoencoderKL.from_pretrained(vae.location, subfolder=vae.subfolder, torch_dtype=dtype,
                                                 use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelError(f"cannot load --vae {vae.name!r}: {first_line(exc)}") from exc


def weight_file(vae: VaeSpec) -> Path | None:
    """The file whose bytes name a local VAE (a folder's weights), None for a Hub VAE."""
    if vae.source == "single_file":
        return Path(vae.location)
    if vae.source == "hub":
        return None
    folder = Path(vae.location) / (vae.subfolder or "")
    files = sorted(folder.glob("*.safetensors")) or sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt"))
    return files[0] if files else None


def vae_hash(vae: VaeSpec) -> str:
    """A1111's "VAE hash": sha256 of the weights file, 10 hex digits ("" for a Hub VAE: its revision names it)."""
    from diffcli.hashes import file_hash

    target = weight_file(vae)
    return file_hash(target)[:10] if target else ""


def identity(vae: VaeSpec) -> dict:
    """What names a VAE's weights for the image id: its Hub id and revision, or its resolved path, with its hash."""
    where = vae.location if vae.source == "hub" else str(Path(vae.location).resolve())
    return {"vae": where, "subfolder": vae.subfolder, "hash": vae_hash(vae), "revision": vae.revision}


def a1111_name(value: str) -> str:
    """The name A1111 writes after `VAE:`: a local file's or folder's name, a Hub id as it is."""
    path = Path(value).expanduser()
    return path.name if path.exists() else value
