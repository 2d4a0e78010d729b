"""Resolve `--model` (bundled name, local folder, single file or Hub id) and detect its family."""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffcli import families, weights
from diffcli.errors import ModelError, first_line
from diffcli.transformer_files import BASE_HINT

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "tiny-shapes"
# owner/name as huggingface_hub's validate_repo_id takes it: at most 96 characters a part, word characters at both
# ends, no "--" or "..", not ending in .git (an id it refuses would be an unexpected HFValidationError)
HUB_ID = re.compile(r"^(?!.*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?(?<!\.git)$")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model lives and what it is, known before any weights load."""

    source: str  # "bundled" | "folder" | "single_file" | "hub"
    location: str  # folder or file path, or Hub repo id
    name: str  # how the user named it; recorded in metadata
    family: str  # a name in families.FAMILIES: "sd1", "sdxl", "sd3", "flux"...
    inpaint: bool = False  # a 9-channel inpainting UNet
    prediction_type: str = "epsilon"
    sample_size: int | None = None  # native image side in pixels, when known
    size_multiple: int = 8  # the VAE's downsampling factor (x the latent patch of a transformer): sizes are multiples
    config_dir: str | None = None  # diffusers config folder for single files
    model_config: str | None = None  # the user's --model-config folder, if any
    defaults: dict = field(default_factory=dict, compare=False, hash=False)  # bundled recommendations
    revision: str | None = None  # a Hub model's snapshot (commit) in the cache
    guidance: str = "cfg"  # what --cfg sets (families.GUIDANCE): the family's, or its variant's
    base: str | None = None  # a transformer-only file's --base (folder or Hub id): its text encoders, VAE, scheduler
    pipeline: str | None = None  # the generic family's: the folder's pipeline class (model_index.json's _class_name)
    flow_match: bool | None = None  # the generic family's: its scheduler is a flow-matching one (families.of)


def bundled_models() -> dict[str, Path]:
    """Names of the models shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / "model_index.json").is_file()}


def resolve_model(spec: str | None, model_config: str | None = None, allow_pickle: bool = False,
                  flag: str = "--model", base: str | None = None) -> ModelSpec:
    """Turn a --model value (or $DIFFCLI_MODEL, or the default) into a ModelSpec; errors name `flag` (the option the
    value came from: --refiner, --hires-upscaler-model...); `base` (--base) completes a transformer-only file."""
    try:
        resolved = _resolve(spec, model_config, allow_pickle, base)
        if base and not resolved.base:
            raise ModelError(f"--base completes a transformer-only file; {resolved.name!r} is a complete model, got --base "
                             f"{base!r}", "leave --base out")
        return resolved
    except ModelError as exc:
        if flag == "--model" or not exc.message.startswith("--model "):
            raise
        raise type(exc)(flag + exc.message[len("--model"):], exc.hint) from None


def _resolve(spec: str | None, model_config: str | None, allow_pickle: bool, base: str | None = None) -> ModelSpec:
    spec = spec or os.environ.get("DIFFCLI_MODEL") or DEFAULT_MODEL
    bundled = bundled_models()
    if spec in bundled:
        return _from_folder(bundled[spec], spec, "bundled", allow_pickle)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path, spec, "folder", allow_pickle)
    if path.is_file():
        return _from_single_file(path, spec, model_config, allow_pickle, base)
    if spec.lower().endswith(weights.WEIGHT_SUFFIXES) or spec.startswith((".", "/", "~")):
        raise ModelError(f"--model {spec!r}: no such file or folder")
    if HUB_ID.match(spec):
        return _from_hub(spec)
    names = ", ".join(bundled) or "none installed"
    raise ModelError(
        f"--model {spec!r} is not a bundled model, a local path or a Hub id (owner/name)",
        f"bundled models: {names}",
    )


def read_json(path: Path) -> dict:
    """Read a JSON config file, turning every failure into a ModelError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing", "is this a complete diffusers model folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not a readable JSON config: {exc}") from None


def _from_folder(path: Path, name: str, source: str, allow_pickle: bool) -> ModelSpec:
    """A diffusers folder: model_index.json plus one subfolder per component."""
    if not (path / "model_index.json").is_file():
        raise ModelError(f"--model {name!r}: folder has no model_index.json", "expected a diffusers model folder (save_pretrained)")
    weights.check_folder(path, "--model", allow_pickle)
    return _spec_from_configs(path, name, source, str(path))


def denoiser_folder(model_index: dict) -> str:
    """The component that denoises in a folder of this model_index.json: its transformer/, else its unet/."""
    return "transformer" if "transformer" in model_index else "unet"


def _spec_from_configs(folder: Path, name: str, source: str, location: str) -> ModelSpec:
    """Build a ModelSpec from a folder holding model_index.json and component configs."""
    model_index = read_json(folder / "model_index.json")
    if not isinstance(model_index, dict):
        raise ModelError(f"{folder / 'model_index.json'} is not a JSON object", "expected a diffusers model folder")
    denoiser = read_json(folder / denoiser_folder(model_index) / "config.json")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else {}
    vae_path = folder / "vae" / "config.json"
    vae = read_json(vae_path) if vae_path.is_file() else None
    # (a DC-AE, Sana's, names its encoder's blocks: 6 of them, a factor of 32)
    vae_blocks = len(vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or [1] * 4) if vae else None
    defaults_path = folder / "diffcli.json"
    family = families.get(families.detect(model_index, denoiser))
    pipeline = flow_match = None
    if family.name == families.GENERIC:  # its classes from the folder's own, its scheduler's kind from its config
        pipeline, flow_match = model_index["_class_name"], _flow_scheduler(scheduler)
        family = families.generic(pipeline, flow_match)
    variant = families.variant(family, denoiser, model_index, name)
    vae_factor = family.size_multiple if vae_blocks is None else 2 ** (vae_blocks - 1)
    patch = family.latent_patch or denoiser.get("patch_size") or 1  # SD3 cuts latents into patches, FLUX.1 packs 2x2
    if pipeline and vae and denoiser.get("in_channels") == 4 * vae.get("latent_channels", 0):
        patch = 2  # its pipeline packs 2x2 latents into the transformer's channels (Chroma, as FLUX.1)
    sample_size = denoiser.get("sample_size")
    if isinstance(sample_size, list):
        sample_size = sample_size[0]
    return ModelSpec(
        source=source,
        location=location,
        name=name,
        family=family.name,
        inpaint=denoiser.get("in_channels") == 9 and family.denoiser == "unet",
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        sample_size=None if family.upscale else sample_size * vae_factor if sample_size else family.native_size,
        size_multiple=vae_factor * patch,
        defaults={**(variant.defaults if variant else {}), **(read_json(defaults_path) if defaults_path.is_file() else {})},
        guidance=(variant and variant.guidance) or family.guidance,
        pipeline=pipeline,
        flow_match=flow_match,
    )


def _flow_scheduler(config: dict) -> bool:
    """Whether a scheduler config is a flow-matching one: a FlowMatch* class, or one set to flow sigmas (Sana's DPM++)."""
    return ("FlowMatch" in str(config.get("_class_name", "")) or config.get("prediction_type") == "flow_prediction"
            or config.get("use_flow_sigmas") is True)


def _from_single_file(path: Path, name: str, model_config: str | None, allow_pickle: bool,
                      base: str | None = None) -> ModelSpec:
    """A single checkpoint file: inspect its header for the family, pick a shipped config; a transformer-only file
    (SD3, FLUX.1) is completed by its base."""
    from diffcli import checkpoints, transformer_files

    transformer = transformer_files.inspect(path, allow_pickle)
    if transformer is not None:
        if model_config:
            raise ModelError(f"--model-config describes an SD checkpoint; {name!r} is a transformer-only "
                             f"{transformer.family} file, got --model-config {model_config!r}", "use --base instead")
        return _transformer_spec(transformer, name, base, allow_pickle)
    info = checkpoints.inspect_checkpoint(path, model_config, allow_pickle)
    config_dir = Path(model_config) if model_config else Path(info.config_dir)
    if model_config and not (config_dir / "model_index.json").is_file():
        raise ModelError(f"--model-config {model_config!r} is not a diffusers folder (no model_index.json)")
    spec = _spec_from_configs(config_dir, name, "single_file", str(path))
    return ModelSpec(
        source="single_file",
        location=str(path),
        name=name,
        family=info.family if not model_config else spec.family,
        inpaint=info.inpaint,
        prediction_type=info.prediction_type if not model_config else spec.prediction_type,
        sample_size=spec.sample_size,
        size_multiple=spec.size_multiple,
        config_dir=str(config_dir),
        model_config=model_config,
    )


@functools.lru_cache(maxsize=None)
def _from_hub(repo_id: str) -> ModelSpec:
    """A Hub repo id: fetch (or find in the HF cache) only the small config files; once per process, since each
    fetch asks the Hub for the newest revision (a batch resolves its model for every line)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    unreachable = hub_unreachable()
    cache_only = {"local_files_only": True} if unreachable else {}

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, **cache_only))
        except LocalEntryNotFoundError:
            if unreachable is not None:
                from huggingface_hub import constants

                raise ModelError(
                    f"--model {repo_id!r} is not in the Hugging Face cache and the Hub ({constants.ENDPOINT}) cannot be "
                    f"reached: {unreachable}",
                    f"check the network (or HF_ENDPOINT, proxy settings), download it once with `hf download {repo_id}`, "
                    "or pass a local folder or .safetensors file",
                ) from None
            raise ModelError(
                f"--model {repo_id!r} is not in the Hugging Face cache and the Hub cannot be reached",
                "connect once, or unset HF_HUB_OFFLINE, or pass a local folder or .safetensors file",
            ) from None
        except EntryNotFoundError:
            return None
        except GatedRepoError:
            raise ModelError(f"--model {repo_id!r} is gated", "accept its licence on the Hub and log in with `hf auth login`") from None
        except RepositoryNotFoundError:
            raise ModelError(f"--model {repo_id!r}: no such repository on the Hub (or it is private)") from None
        except OSError as exc:
            raise ModelError(f"--model {repo_id!r}: {exc}") from None

    index = fetch("model_index.json")
    if index is None:
        raise ModelError(f"--model {repo_id!r} has no model_index.json", "is it a diffusers pipeline repository?")
    denoiser = denoiser_folder(read_json(index))
    for filename in (f"{denoiser}/config.json", "scheduler/scheduler_config.json", "vae/config.json"):
        fetch(filename)
    return replace(_spec_from_configs(index.parent, repo_id, "hub", repo_id), revision=index.parent.name)


HUB_CHECK_TIMEOUT = 5.0  # seconds for one request to the Hub endpoint; huggingface_hub itself retries for ~24 s


@functools.lru_cache(maxsize=None)
def component_config(spec, name: str) -> dict:
    """A component's config (`name`, e.g. "unet/config.json") from the model's folders (its configs', then its own) or,
    for a Hub model, the HF cache; {} when not at hand or unreadable (loading then says why)."""
    paths = [Path(folder) / name for folder in (spec.config_dir, spec.location) if folder]
    if spec.source == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.location, name, revision=spec.revision)
        paths = [Path(cached)] if isinstance(cached, str) else []
    for path in paths:
        if path.is_file():
            try:
                config = read_json(path)
            except Exception:  # noqa: BLE001
                return {}
            return config if isinstance(config, dict) else {}
    return {}


def hub_unreachable() -> str | None:
    """Why the Hub endpoint does not answer one request, or None (it does, or HF_HUB_OFFLINE: only the cache is read).

    When it does not, this process reads the Hugging Face cache only (HF_HUB_OFFLINE from here on), so that a cached
    model still loads at once and a missing one fails in seconds with one line."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - refused, timed out, DNS, TLS, proxy: all mean no Hub for us
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # libraries imported later (diffusers, transformers) read it at import
        return first_line(exc)
    return None


# --- transformer-only files (transformer_files.py reads them): the --base that completes them is a model too

def default_base(info) -> str:
    """The registry's Hub id for the file's variant (families.Variant.base)."""
    variant = families.variant(info.family, info.denoiser, name=Path(info.path).name)
    if variant is None or variant.base is None:
        raise ModelError(f"--base: {info.path!r} holds only a {info.family} transformer and its family names no "
                         "default base", BASE_HINT)
    return variant.base


def resolve_base(info, base: str | None, allow_pickle: bool):
    """(Hub id or folder for from_pretrained, the folder holding its configs, Hub revision) of --base or the default,
    checked: a diffusers folder or cached Hub id of the file's kind, whose transformer has the file's width."""
    given = base
    base = base or default_base(info)
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"--base {base!r} is not a diffusers folder (no model_index.json)", BASE_HINT)
        weights.check_folder(path, "--base", allow_pickle)
        location, folder, revision = str(path.resolve()), path, None
    elif path.exists() or base.startswith((".", "/", "~")) or not HUB_ID.match(base):
        raise _not_a_base(base, path)
    else:
        revision = _hub_base(base, given, info).revision
        location, folder = base, Path(_snapshot(base, revision))
    _check_base(info, base, folder)
    return location, folder, revision


def _not_a_base(base: str, path: Path) -> ModelError:
    """Why --base is neither a folder nor a Hub id: a file, a missing folder, or no owner/name."""
    if path.exists():
        return ModelError(f"--base {base!r} is a file", BASE_HINT)
    if base.startswith((".", "/", "~")):
        return ModelError(f"--base {base!r}: no such folder", BASE_HINT)
    return ModelError(f"--base {base!r} is neither a folder nor a Hub id (owner/name)", BASE_HINT)


def _hub_base(repo: str, given: str | None, info):
    """The base as a Hub model (offline: from the cache), its errors naming --base; an uncached default names --base."""
    try:
        return resolve_model(repo, flag="--base")
    except ModelError as exc:
        hint = f"download it once with `hf download {repo}`, or {BASE_HINT}"
        if given:
            raise ModelError(exc.message, hint) from None
        reason = exc.message.removeprefix(f"--base {repo!r} ")
        raise ModelError(f"--base: {info.path!r} holds only a {info.family} transformer; its text encoders and VAE come "
                         f"from --base, by default {repo}, which {reason}", hint) from None


def folder_of(spec: ModelSpec) -> Path:
    """A diffusers-folder model's files on disk: its folder, or a Hub model's cached snapshot."""
    return Path(_snapshot(spec.location, spec.revision)) if spec.source == "hub" else Path(spec.location)


def _snapshot(repo: str, revision: str) -> str:
    """The cached snapshot folder of a Hub repo's revision (models._from_hub fetched its configs there)."""
    from huggingface_hub import hf_hub_download

    return str(Path(hf_hub_download(repo, "model_index.json", revision=revision, local_files_only=True)).parent)


def _check_base(info, base: str, folder: Path) -> None:
    """The base is of the file's kind (the same transformer class) and its transformer is as wide as the file's."""
    index = read_json(folder / "model_index.json")
    config = read_json(folder / "transformer" / "config.json") if "transformer" in index else {}
    kind = families.get(info.family).transformer_file.class_name
    if config.get("_class_name") != kind:
        raise ModelError(f"--base {base!r} is not a {info.family} model (its transformer is "
                         f"{config.get('_class_name') or 'missing'}), got a {info.family} file", BASE_HINT)
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    if width != info.width:
        raise ModelError(f"--base {base!r}: its transformer is {width} wide, the file's {info.width}", BASE_HINT)
    converted = families.get(info.family).transformer_file.converted_width
    if info.layout == "original" and converted and info.width != converted:
        raise ModelError(f"--model {info.path!r}: diffusers converts original-layout {info.family} files of width "
                         f"{converted} only, got {info.width}", "save the transformer in diffusers' layout")


def _transformer_spec(info, name: str, base: str | None, allow_pickle: bool):
    """The ModelSpec of a transformer-only file completed by its base: the file's family and variant, the base's
    sizes and configs."""
    location, folder, revision = resolve_base(info, base, allow_pickle)
    spec = _spec_from_configs(folder, name, "single_file", info.path)
    # a base of a family whose files look like another's (FLUX.1 Kontext's are dev-layout: it declares no file layout
    # of its own) says which pipeline runs; a family with its own layout is told by the file (a Fill file, a dev base)
    sibling = spec.family in families.FAMILIES and spec.family != families.GENERIC and \
        families.get(spec.family).transformer_file is None
    family = spec.family if sibling else info.family
    # the base's model_index.json too: FLUX.2 klein's says whether it is distilled
    variant = families.variant(family, info.denoiser, read_json(Path(folder) / "model_index.json"),
                               Path(info.path).name)
    return replace(spec, family=family, config_dir=str(folder), base=location, revision=revision,
                   defaults=dict(variant.defaults) if variant else {},
                   guidance=(variant and variant.guidance) or families.get(family).guidance)
