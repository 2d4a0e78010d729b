"""Memory: a model's weight bytes from its files' headers (before loading), the memory free now, and the cheapest
placement that fits: all on the device, model CPU offload, group offload, sequential CPU offload; VAE tiling for an
image large for what is left. `choose` and `needs_vae_tiling` are pure (numbers in, plan out); the rest measures."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from diffcli.errors import UsageError

GIB = 2**30
# Share of the free memory a plan may fill: the allocator's fragmentation and other processes' growth take the rest.
MARGIN = 0.9
# A CUDA context, cuBLAS/cuDNN workspaces and the compile's CUDA graphs hold memory that no weight file shows.
CUDA_RESERVE = 1 * GIB
# Activation elements per image pixel, times the dtype's size. These are assumptions, not measurements (none has been
# made on a GPU yet): the denoiser's peak (SDPA attention, a batch of 2 for CFG) taken as 1 GiB at 1024x1024 in fp16,
# the VAE decoder's full-resolution 128-512-channel feature maps as 3 GiB there; a tiled decode as a 512x512 tile.
DENOISE_PER_PIXEL = 512
VAE_PER_PIXEL = 1536
VAE_TILE_PIXELS = 512 * 512
DEFAULT_SIZE = 1024  # image side assumed when neither the model nor its family says one
OFFLOADS = ("none", "model", "group", "sequential")  # cheapest first
LABELS = {"none": "all on the {device}", "model": "model CPU offload", "group": "group offload (leaf level, CUDA stream)",
          "sequential": "sequential CPU offload"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}


@dataclass(frozen=True)
class Weights:
    """A model's weights at the dtype it runs in, read from its files' headers."""

    total: int  # bytes of every component
    largest_component: int  # the largest component (the denoiser, or the T5/LLM text encoder): model offload holds it
    largest_tensor: int  # the largest single tensor: leaf-level offload holds about this (two with prefetch)


@dataclass(frozen=True)
class Plan:
    """Where the weights live while a model runs, and why."""

    offload: str  # one of OFFLOADS
    vae_tiling: bool
    why: str  # the numbers that decided it, for stderr and `optimizations`

    def label(self, device: str) -> str:
        """The plan as one `optimizations` entry: "model CPU offload + VAE tiling (auto: ...)"."""
        name = LABELS[self.offload].format(device="GPU" if device.startswith("cuda") else device)
        return f"{name}{' + VAE tiling' if self.vae_tiling else ''} (auto: {self.why})"


def gib(n: float) -> str:
    """Bytes for a person: "23.8 GiB", or "4.5 MiB" below a GiB (a tiny model's weights)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def activation_bytes(pixels: int, itemsize: int) -> int:
    """The denoiser's working memory for one image of `pixels` (an assumption: DENOISE_PER_PIXEL)."""
    return pixels * DENOISE_PER_PIXEL * itemsize


def vae_bytes(pixels: int, itemsize: int, tiled: bool = False) -> int:
    """The VAE decoder's working memory for an image of `pixels`, or for one tile of a tiled decode."""
    return min(pixels, VAE_TILE_PIXELS if tiled else pixels) * VAE_PER_PIXEL * itemsize


def needs_vae_tiling(pixels: int, itemsize: int, spare: float) -> bool:
    """Whether decoding an image of `pixels` in one piece would not fit in `spare` bytes (and a tile is smaller)."""
    return pixels > VAE_TILE_PIXELS and vae_bytes(pixels, itemsize) > spare


def choose(weights: Weights, free: int, host_free: int | None, pixels: int, itemsize: int, cuda: bool,
           group_supported: bool = True, what: str = "the model", hint_dtype: bool = False,
           quantised: bool = False) -> Plan:
    """The cheapest plan whose device memory (`free` bytes now, of which MARGIN is used; on CUDA less CUDA_RESERVE)
    holds what it keeps there plus an image's working memory: all weights; the largest component (model offload); two
    of the largest tensor (group offload's prefetch); one (sequential). Offloaded weights live in host memory
    (`host_free`, None: unknown). On the CPU the weights must fit in RAM. `quantised`: a GGUF transformer, which
    sequential offload breaks (accelerate rebuilds its parameters without their quant type, diffusers#14691). Nothing
    fits: a UsageError naming the ways."""
    usable = free * MARGIN - (CUDA_RESERVE if cuda else 0)
    work = activation_bytes(pixels, itemsize)
    host_ok = host_free is None or weights.total <= host_free * MARGIN
    keeps = {"none": weights.total, "model": weights.largest_component, "group": 2 * weights.largest_tensor,
             "sequential": weights.largest_tensor}
    where = "GPU memory free" if cuda else "RAM available"
    numbers = f"{gib(weights.total)} of weights, {gib(free)} {where}"
    for offload in OFFLOADS if cuda else ("none",):
        if offload != "none" and not host_ok:
            break  # offloaded weights need host memory
        if (offload == "group" and not group_supported) or (offload == "sequential" and quantised):
            continue
        if keeps[offload] + work <= usable:
            spare = usable - (keeps[offload] if offload == "none" else 0)
            return Plan(offload, needs_vae_tiling(pixels, itemsize, spare), numbers)
    ways = ["a smaller variant"] if quantised else ["a GGUF or other quantised file", "a smaller variant"]
    if hint_dtype:
        ways.append("--dtype bf16")
    if cuda:
        ways += ["--device cpu"] if host_ok else []  # the CPU would need the same RAM
        short = f"GPU memory, even with {'model' if quantised else 'sequential'} CPU offload" if host_ok else \
            f"host RAM for offloading ({gib(host_free or 0)} available)"
    else:
        short = "RAM"
    ways.append(f"a machine with more {'GPU memory' if cuda and host_ok else 'memory'}")
    raise UsageError(f"{what} needs about {gib(weights.total + work)} ({gib(weights.total)} of weights at this dtype) "
                     f"and does not fit in {short}: {gib(free)} {where}", f"use {', '.join(ways[:-1])} or {ways[-1]}")


# --- measuring: the headers of a model's files, the memory free now


def _tensor_bytes(entry: dict, itemsize: int) -> int:
    """Bytes of one safetensors header entry once loaded: floats at `itemsize`, others as stored."""
    from diffcli import weights

    elements = math.prod(entry.get("shape") or [])
    if entry.get("dtype") in FLOAT_DTYPES:
        return elements * itemsize
    return elements * weights.DTYPE_BITS.get(entry.get("dtype"), 32) // 8


def _safetensors_sizes(files, itemsize: int) -> tuple[int, int]:
    """(total bytes, largest tensor's) of these safetensors files at `itemsize`."""
    from diffcli import weights

    total = largest = 0
    for path in files:
        for name, entry in weights.read_safetensors_header(path).items():
            if name != "__metadata__" and isinstance(entry, dict):
                size = _tensor_bytes(entry, itemsize)
                total += size
                largest = max(largest, size)
    return total, largest


def _gguf_sizes(path: Path) -> tuple[int, int]:
    """(total bytes, largest tensor's) of a GGUF file's tensors as stored: they stay quantised when loaded."""
    from gguf import GGUFReader

    sizes = [int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors]
    return sum(sizes), max(sizes, default=0)


def _component_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained loads from a component folder (no `variant`): its index's shards, else
    the files without a variant in their name (model.safetensors, model-00001-of-00002.safetensors), else all."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        if index.name.count(".") == 3:  # diffusion_pytorch_model.safetensors.index.json, not ...fp16.safetensors...
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
            return [folder / shard for shard in sorted(shards)]
    files = sorted(folder.glob("*.safetensors"))
    plain = [path for path in files if path.name.count(".") == 1]
    return plain or files


WEIGHTLESS = ("Tokenizer", "TokenizerFast", "Scheduler", "Processor", "FeatureExtractor")  # component classes


def _folder_sizes(folder: Path, itemsize: int, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Component -> (bytes, largest tensor's) of a diffusers folder's components (model_index.json's); a LookupError
    when a model component has no safetensors weights there (a Hub base whose configs alone are cached)."""
    from diffcli import models

    index = models.read_json(folder / "model_index.json")
    sizes = {}
    for name, value in index.items():
        if name.startswith("_") or name in skip or not isinstance(value, list) or None in value:
            continue
        files = _component_files(folder / name) if (folder / name).is_dir() else []
        if files:
            sizes[name] = _safetensors_sizes(files, itemsize)
        elif not str(value[1]).endswith(WEIGHTLESS):  # a model not (yet) downloaded: its size unknown, not zero
            raise LookupError(f"{folder / name}: no safetensors weights")
    return sizes


def _single_file_sizes(path: Path, itemsize: int) -> dict[str, tuple[int, int]]:
    """A whole checkpoint's tensors grouped by their first name part (model.diffusion_model, first_stage_model,
    cond_stage_model, conditioner...): the components it will load as."""
    from diffcli import weights

    groups: dict[str, list[int]] = {}
    for name, entry in weights.read_safetensors_header(path).items():
        if name != "__metadata__" and isinstance(entry, dict):
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] == "model" else parts[0]
            groups.setdefault(key, []).append(_tensor_bytes(entry, itemsize))
    return {key: (sum(sizes), max(sizes)) for key, sizes in groups.items()}


def _folder_of(location: str, revision: str | None = None) -> Path:
    """A local folder, or a Hub model's cached snapshot (never downloaded here)."""
    from diffcli import models

    path = Path(location)
    return path if path.is_dir() else Path(models._snapshot(location, revision))


def weight_sizes(spec, itemsize: int) -> Weights | None:
    """`spec`'s weights at `itemsize` bytes per float, from its files' headers: a diffusers folder's components, a
    transformer-only file (GGUF as stored) with its base's other components, a checkpoint's tensors. None when unknown
    (a pickle, which is never read here; a Hub model not in the cache; unreadable headers: loading says why)."""
    from diffcli import weights

    try:
        if spec.base:
            path = Path(spec.location)
            fmt = weights.file_format(path)
            own = _gguf_sizes(path) if fmt == weights.GGUF else _safetensors_sizes([path], itemsize)
            sizes = dict(_folder_sizes(_folder_of(spec.base), itemsize, skip=("transformer",)), transformer=own)
        elif spec.source == "single_file":
            path = Path(spec.location)
            if weights.file_format(path) != weights.SAFETENSORS:
                return None
            sizes = _single_file_sizes(path, itemsize)
        else:
            sizes = _folder_sizes(_folder_of(spec.location, spec.revision), itemsize)
    except Exception:  # noqa: BLE001 (an unreadable model fails with its own message when it loads)
        return None
    if not sizes:
        return None
    return Weights(sum(total for total, _ in sizes.values()), max(total for total, _ in sizes.values()),
                   max(largest for _, largest in sizes.values()))


def gguf_transformer(spec) -> bool:
    """Whether `spec` is a GGUF transformer file completed from a base."""
    from diffcli import weights

    try:
        return bool(spec.base) and weights.file_format(Path(spec.location)) == weights.GGUF
    except Exception:  # noqa: BLE001 (an unreadable file fails with its own message when it loads)
        return False


def group_supported(spec) -> bool:
    """Whether every diffusers model of `spec`'s folder takes group offloading (ModelMixin._supports_group_offloading;
    transformers' text encoders go through apply_group_offloading); a GGUF-quantised transformer is not offered it."""
    import diffusers

    from diffcli import models, weights

    try:
        if gguf_transformer(spec):
            return False
        folder = _folder_of(spec.base or spec.location, None if spec.base else spec.revision)
        index = models.read_json(folder / "model_index.json")
    except Exception:  # noqa: BLE001 (a single checkpoint: its components are diffusers' and transformers' usual ones)
        return True
    return all(getattr(getattr(diffusers, value[1], None), "_supports_group_offloading", True)
               for value in index.values() if isinstance(value, list) and len(value) == 2 and value[0] == "diffusers")


def host_available() -> int | None:
    """Bytes of RAM available to a new allocation (/proc/meminfo MemAvailable), None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def release_freed() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's malloc_trim), so that a process
    started next has them: freed tensors can otherwise stay in the heap (the bench's SDXL kept 5 GB after its
    pipeline was deleted)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def device_free(device: str) -> int | None:
    """Free bytes on `device` now: CUDA's mem_get_info, the CPU's MemAvailable; None when unknown (MPS)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return host_available() if device == "cpu" else None


def native_pixels(spec) -> int:
    """Pixels of the model's native image: what a job gets without --width/--height."""
    from diffcli import families

    side = spec.sample_size or families.get(spec.family).native_size or DEFAULT_SIZE
    return side * side


def plan_for(spec, device: str, dtype) -> Plan | None:
    """The automatic plan for `spec` on `device` in `dtype` (the native image size), a UsageError when nothing fits,
    None when the weights or the free memory are unknown (the caller keeps its own default)."""
    import torch

    free = device_free(device)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    sizes = weight_sizes(spec, itemsize)
    if free is None or sizes is None:
        return None
    cuda = device.startswith("cuda")
    return choose(sizes, free, host_available() if cuda else None, native_pixels(spec), itemsize, cuda,
                  group_supported(spec) if cuda else False, f"model {spec.name!r}", dtype == torch.float32,
                  gguf_transformer(spec))


def apply(pipe, plan: Plan, device: str) -> list[str]:
    """Offload `pipe` as `plan` says (not "none": the caller moves it to the device; the caller tiles the VAE); its
    `optimizations` entries."""
    import torch

    if plan.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif plan.offload == "group":
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)
    elif plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    return [plan.label(device)]


def fit_vae(pipe, device: str, width: int | None, height: int | None, notify) -> None:
    """Before a call at `width` x `height`: VAE tiling on (said once, added to `optimizations`) when the automatic plan
    chose the placement and the decode would not fit in the memory free now."""
    vae = getattr(pipe, "vae", None)
    if getattr(vae, "diffcli_memory", None) is None or getattr(vae, "use_tiling", True) or not width or not height \
            or getattr(pipe, "diffcli_backend", "torch") != "torch":
        return
    free = device_free(device)
    if free is None:
        return
    itemsize = vae.dtype.itemsize if hasattr(vae.dtype, "itemsize") else 4
    spare = free * MARGIN - (CUDA_RESERVE if device.startswith("cuda") else 0) - activation_bytes(width * height, itemsize)
    if needs_vae_tiling(width * height, itemsize, spare):
        vae.enable_tiling()
        entry = f"VAE tiling (auto: a {width}x{height} decode needs about {gib(vae_bytes(width * height, itemsize))}, " \
                f"{gib(free)} free)"
        pipe.diffcli_optimizations.append(entry)
        notify(entry)


def note(pipe, device: str) -> str | None:
    """What the automatic plan chose for a pipeline on CUDA, for stderr once when it loads (the CPU says its path)."""
    plan = getattr(pipe, "diffcli_memory", None)
    return plan.label(device) if plan is not None and device.startswith("cuda") else None
