"""The OpenVINO side of `--backend openvino` (diffcli/backend.py chooses it): a pipeline's U-Net and VAE decoder
replaced by OpenVINO models that diffusers calls as it calls the torch ones, and its CLIP text encoders given an
OpenVINO twin that diffcli's prompt encoding uses (prompts.py; the torch encoder stays for tokens added at run time).

Everything else stays diffusers' own (scheduler, the initial noise drawn from diffcli's seeds, the VAE encoder), so
seeds, schedulers and metadata mean what they mean on torch. The modules are converted with
`openvino.convert_model` from the loaded torch modules once per model and kept as OpenVINO IR in
cache_dir()/openvino/<key>/ (the key names the weights by hash, and the versions); later runs read the IR and compile it
per input shape (about a second: static shapes are OpenVINO's fast path).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from diffcli.errors import ModelError, first_line

IR_VERSION = 3  # part of the cache key: bump when what is exported changes
# A module of this many parameters or more is kept with int8 weights (asymmetric, per output channel; nncf), computed in
# the inference precision: optimum-intel's default for its exports. SDXL's U-Net (2.6 B) went from 9.98 to 9.70 s per
# 256 px image at 43.3 dB (docs/performance.md, "CPU fast path"); SD 1.x/2.x U-Nets stay under it (see
# INT8_WEIGHTS_CPU for where they get int8 weights too).
INT8_WEIGHTS_FROM = 1_000_000_000
# Computing in bf16 on AVX512-BF16 without AMX (AMD Zen 4), a U-Net of cpu.MIN_PARAMETERS or more also gets int8
# weights: SD 1.5's step (2x4x32x32) went from 0.887 to 0.787 s with the activations below, 43 dB from bf16's output.
# On AMX, int8 weights made it slower (0.430 against 0.358 s), and in f32 too (emulated AVX2: 1.805 against 1.724 s).
INT8_WEIGHTS_CPU = "avx512_bf16"
# Under bf16, int8-weight layers also take int8 activations, quantised on the fly per group of this many input channels
# (the CPU plugin's dynamic quantisation; its default group is 32). SDXL's U-Net step at 256 px: 2.04 s with 32,
# 1.66-1.71 s with 128-256 (2.37-2.65 s without), 51 dB from the unquantised step (docs/performance.md).
DYNAMIC_INT8_GROUP = 256
# Traced at a latent side that does not halve evenly, so the U-Net's up blocks take their sizes from the skip
# connections (diffusers' forward_upsample_size) and the graph serves every size; at even sizes it computes the same.
EXAMPLE_SIDE = 9
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SD 1.x/2.x have the first, SDXL both


def cache_key(spec, vae=None, hint: str = "bf16") -> str:
    """The IR's folder name: the weights (by hash), the --vae, the versions that export and read it, and whether a
    mid-size U-Net gets int8 weights (int8_weights: the CPU and the inference precision `hint`)."""
    import diffusers
    import openvino

    from diffcli import identity
    from diffcli import vae as vaes

    parts = {"model": identity.model_identity(spec), "vae": vaes.identity(vae) if vae is not None else None,
             "base": spec.base, "ir": IR_VERSION, "openvino": openvino.__version__, "torch": torch.__version__,
             "diffusers": diffusers.__version__, "int8_weights": _nncf_version(),
             "int8_mid_size": _int8_mid_size(hint)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_root() -> Path:
    from diffcli.hashes import cache_dir

    return cache_dir() / "openvino"


def folder(spec, vae=None, hint: str = "bf16") -> Path:
    """Where the model's IR for inference precision `hint` is (or will be) kept."""
    return cache_root() / cache_key(spec, vae, hint)


def hint_of(dtype) -> str:
    """The CPU plugin's inference precision for a torch dtype: "bf16" for bfloat16, else "f32"."""
    return "bf16" if dtype == torch.bfloat16 else "f32"


def skips_unet(spec, vae=None, hint: str = "bf16") -> bool:
    """Whether the model's torch U-Net need not load: a diffusers folder (local, bundled or Hub) whose IR is cached and
    readable. A damaged IR is removed here, so that the U-Net loads and is exported again."""
    where = folder(spec, vae, hint)
    if spec.source not in ("folder", "bundled", "hub") or spec.base or not is_cached(where):
        return False
    try:
        for name in ("unet", "vae_decoder", *[n for n in TEXT_ENCODERS if (where / f"{n}.xml").is_file()]):
            _read(where / f"{name}.xml")
    except ModelError:
        shutil.rmtree(where, ignore_errors=True)
        return False
    return True


def apply(pipe, spec, dtype, vae=None) -> str:
    """Replace `pipe`'s U-Net and VAE decoder by OpenVINO ones, and give its text encoders OpenVINO twins, computing in
    bf16 (`dtype` bfloat16) or fp32 (int8 weights where int8_weights says), exported on
    first use, then read from the cache; the optimizations line that says so. A U-Net left out of the load
    (skips_unet) is built on the meta device for its config: no weights."""
    if pipe.unet is None:
        from diffcli import models

        pipe.unet = meta_unet(models.folder_of(spec) / "unet")
    return install(pipe, folder(spec, vae, hint_of(dtype)), dtype)


def meta_unet(unet_folder: Path):
    """The U-Net of a diffusers folder without weights: its full config (defaults filled in) and parameter count."""
    from diffusers import UNet2DConditionModel

    config = json.loads((unet_folder / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def compile_config(hint: str) -> dict:
    """The CPU plugin's settings for one image at a time, computing in `hint` ("bf16" or "f32")."""
    return {"INFERENCE_PRECISION_HINT": hint, "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}


def unet_config(hint: str, int8: bool) -> dict:
    """compile_config for a U-Net, with int8 weights or not: in bf16 their layers also quantise activations to int8."""
    dynamic = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": str(DYNAMIC_INT8_GROUP)} if int8 and hint == "bf16" else {}
    return compile_config(hint) | dynamic


def install(pipe, where: Path, dtype) -> str:
    """apply() with the IR kept in `where` (the bench's: a temporary folder)."""
    from diffcli import cpu

    hint = hint_of(dtype)
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    int8 = int8_weights(parameters, hint)
    if not is_cached(where):
        export(pipe, where, hint)
        pipe.unet.to("meta")  # its IR is written: the compile's own copy gets the room (SDXL: 10 GB in fp32)
    try:
        unet, decoder, twins = _read_all(pipe, where, hint, parameters, int8)
    except ModelError:  # a damaged cache file (skips_unet removes those of folders first): exported again, once
        if pipe.unet.device.type == "meta":
            raise
        export(pipe, where, hint)
        unet, decoder, twins = _read_all(pipe, where, hint, parameters, int8)
    pipe.unet = unet
    pipe.vae.decoder = decoder
    for encoder, twin in twins:
        encoder.diffcli_openvino = twin
    pipe.diffcli_backend = "openvino"
    chosen, why = cpu.choose(cpu.cpu_flags(), parameters)
    if (chosen == "bf16") != (hint == "bf16"):
        why = f"--dtype {'bf16' if hint == 'bf16' else 'fp32'}"
    dynamic = "DYNAMIC_QUANTIZATION_GROUP_SIZE" in unet_config(hint, int8)
    weights = (" with int8 weights" + (" and dynamic int8 activations" if dynamic else "")) if int8 else ""
    return f"openvino {hint} U-Net{weights}, text encoder and VAE decoder ({why})"


def _read_all(pipe, where: Path, hint: str, parameters: int, int8: bool):
    """The U-Net (of `parameters`, with int8 weights or not), the VAE decoder and (encoder, twin) pairs read from
    `where`, to compute in `hint`; a damaged file is a ModelError."""
    config = compile_config(hint)
    twins = [(encoder, OpenVINOTextEncoder(where / f"{name}.xml", config, encoder)) for name in TEXT_ENCODERS
             if (encoder := getattr(pipe, name, None)) is not None and (where / f"{name}.xml").is_file()]
    return (OpenVINOUNet(where / "unet.xml", unet_config(hint, int8), pipe.unet, parameters),
            OpenVINODecoder(where / "vae_decoder.xml", config), twins)


def is_cached(where: Path) -> bool:
    return all((where / f"{name}.xml").is_file() and (where / f"{name}.bin").is_file()
               for name in ("unet", "vae_decoder", "text_encoder"))


def _nncf_version() -> str | None:
    """nncf's version where it is installed (it compresses large modules' weights), else None."""
    from importlib import metadata

    try:
        return metadata.version("nncf")
    except metadata.PackageNotFoundError:
        return None


def _int8_mid_size(hint: str) -> bool:
    """Whether U-Nets from cpu.MIN_PARAMETERS get int8 weights too: computed in bf16 on an INT8_WEIGHTS_CPU CPU
    without AMX."""
    from diffcli import cpu

    flags = cpu.cpu_flags()
    return hint == "bf16" and INT8_WEIGHTS_CPU in flags and "amx_bf16" not in flags


def int8_weights(parameters: int, hint: str) -> bool:
    """Whether a U-Net of `parameters` is exported with int8 weights to compute in `hint` (nncf installed): from
    INT8_WEIGHTS_FROM parameters (optimum-intel's rule), or from cpu.MIN_PARAMETERS where _int8_mid_size says."""
    from diffcli import cpu

    if _nncf_version() is None:
        return False
    return parameters >= INT8_WEIGHTS_FROM or (_int8_mid_size(hint) and parameters >= cpu.MIN_PARAMETERS)


def compress_int8(path: Path) -> None:
    """Rewrite the IR at `path` with int8 weights (asymmetric, per output channel; nncf): read back from disk (the
    weights memory-mapped), so that the converted graph is no longer in memory."""
    import contextlib
    import io
    import logging

    import nncf
    import openvino

    logging.getLogger("nncf").setLevel(logging.WARNING)  # its statistics tables
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bar: stdout is --json's
        compressed = nncf.compress_weights(core().read_model(path), mode=nncf.CompressWeightsMode.INT8_ASYM)
    staged = path.with_name(f"compressed-{path.name}")
    openvino.save_model(compressed, staged, compress_to_fp16=False)
    del compressed
    staged.with_suffix(".bin").replace(path.with_suffix(".bin"))
    staged.replace(path)


def export(pipe, folder: Path, hint: str) -> None:
    """Convert the pipeline's U-Net, VAE decoder and text encoders to OpenVINO IR in `folder`, for inference precision
    `hint` (int8_weights), atomically (a temporary folder beside it, renamed): a crash leaves no half-written model
    behind."""
    import openvino

    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
    try:
        unet = _Traced(pipe.unet)
        latents = torch.randn(1, pipe.vae.config.latent_channels, EXAMPLE_SIDE, EXAMPLE_SIDE)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks it fixes as constants
            openvino.save_model(openvino.convert_model(unet, example_input=unet.example()), scratch / "unet.xml",
                                compress_to_fp16=False)
            if int8_weights(sum(p.numel() for p in pipe.unet.parameters()), hint):
                compress_int8(scratch / "unet.xml")
            openvino.save_model(openvino.convert_model(pipe.vae.decoder, example_input=(latents,)),
                                scratch / "vae_decoder.xml", compress_to_fp16=False)
            for name in TEXT_ENCODERS:
                encoder = getattr(pipe, name, None)
                if encoder is not None:
                    ids = torch.zeros(1, encoder.config.max_position_embeddings, dtype=torch.int64)
                    openvino.save_model(openvino.convert_model(_TracedText(encoder), example_input=(ids,)),
                                        scratch / f"{name}.xml", compress_to_fp16=False)
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(scratch, folder)
        except OSError:
            if not is_cached(folder):  # else another process exported it meanwhile: theirs is as good
                raise
            shutil.rmtree(scratch, ignore_errors=True)
    except Exception as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ModelError(f"--backend openvino: converting the U-Net failed: {first_line(exc)[:300]}",
                         "run with --backend torch") from exc


class _Traced(torch.nn.Module):
    """The U-Net with plain tensor inputs (SDXL's added conditioning, LCM's guidance embedding) and a tensor out."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.inputs = input_names(unet.config)

    def example(self) -> dict:
        config, batch, side = self.unet.config, 2, EXAMPLE_SIDE
        shapes = {"sample": (batch, config.in_channels, side, side), "timestep": (batch,),
                  "encoder_hidden_states": (batch, 77, config.cross_attention_dim), "time_ids": (batch, 6),
                  "text_embeds": (batch, (config.projection_class_embeddings_input_dim or 0) - 6 * (config.addition_time_embed_dim or 0)),
                  "timestep_cond": (batch, config.time_cond_proj_dim or 0)}
        return {name: torch.randn(shapes[name]) for name in self.inputs}

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, added_cond_kwargs=added,
                         return_dict=False)[0]


class _TracedText(torch.nn.Module):
    """A CLIP text encoder with every hidden state out (clip skip picks one): (first output, second, *hidden states)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids):
        out = self.encoder(ids, output_hidden_states=True, return_dict=False)
        return (out[0], out[1], *out[2])


def input_names(config) -> list[str]:
    """The exported U-Net's inputs, in order: SDXL's added conditioning and an LCM U-Net's guidance embedding if any."""
    names = ["sample", "timestep", "encoder_hidden_states"]
    if getattr(config, "addition_embed_type", None) == "text_time":
        names += ["text_embeds", "time_ids"]
    if getattr(config, "time_cond_proj_dim", None) is not None:
        names.append("timestep_cond")
    return names


@functools.cache
def core():
    """The process's one OpenVINO Core, kept for its lifetime. Each Core loads its own CPU plugin, which swaps the
    calling thread's alternate signal stack for its own and puts the previous one back when it is destroyed: Cores
    destroyed out of order left the main thread on a freed stack, and the next Ctrl-C crashed the process."""
    import openvino

    return openvino.Core()


def _read(path: Path):
    """An OpenVINO model read from its IR (weights memory-mapped); a damaged file is a ModelError. Read once per file
    version: skips_unet's check and the load that follows share it (callers clone before they reshape)."""
    try:
        infos = (path.stat(), path.with_suffix(".bin").stat())
        stamp = tuple((info.st_ino, info.st_mtime_ns, info.st_size) for info in infos)
    except OSError as exc:
        raise ModelError(f"--backend openvino: the cached {path.name} cannot be read ({exc.strerror})",
                         f"delete {path.parent} and run again") from None
    return _read_version(path, stamp)


@functools.lru_cache(maxsize=8)  # a model's four modules, for two models
def _read_version(path: Path, stamp: tuple):
    try:
        return core().read_model(path)
    except Exception as exc:  # noqa: BLE001 (OpenVINO raises RuntimeError subclasses of its own)
        raise ModelError(f"--backend openvino: the cached {path.name} cannot be read ({first_line(exc)[:200]})",
                         f"delete {path.parent} and run again") from None


_INPUT_TYPES = {torch.int64: torch.int64, torch.int32: torch.int64}


class _Compiled:
    """An OpenVINO IR read now and compiled once per input shapes, on as many threads as torch has then (--threads,
    speed.configure_cpu_threads)."""

    def __init__(self, path: Path, config: dict):
        self.config, self.requests, self.model = config, {}, _read(path)

    def __call__(self, tensors: list) -> torch.Tensor:
        return self.all(tensors)[0]

    def all(self, tensors: list) -> list:
        """Every output, for inputs of these shapes (float inputs as fp32, token ids as int64)."""
        shapes = tuple(tuple(t.shape) for t in tensors)
        request = self.requests.get(shapes)
        if request is None:
            model = self.model.clone()
            model.reshape({port: list(shape) for port, shape in zip(model.inputs, shapes)})
            config = dict(self.config, INFERENCE_NUM_THREADS=str(torch.get_num_threads()))
            request = core().compile_model(model, "CPU", config).create_infer_request()
            self.requests[shapes] = request
        result = request.infer([t.detach().to("cpu", _INPUT_TYPES.get(t.dtype, torch.float32)).contiguous().numpy()
                                for t in tensors])
        return [torch.from_numpy(result[i].copy()) for i in range(len(result))]


class OpenVINOUNet(torch.nn.Module):
    """Stands in for a UNet2DConditionModel in a diffusers pipeline: the config and attributes the pipelines read, and
    the forward they call, computed by OpenVINO."""

    def __init__(self, path: Path, config: dict, unet, parameters: int):
        super().__init__()
        self.compiled = _Compiled(path, config)
        self.config = unet.config
        self.inputs = input_names(unet.config)
        self.diffcli_parameters = parameters  # what cpu.loaded_parameters counts: the torch weights are gone
        if getattr(unet, "add_embedding", None) is not None:  # SDXL's pipelines read its input width, nothing else
            self.add_embedding = _Width(unet.add_embedding.linear_1.in_features)

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True, **others):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        unused = [name for name, value in dict(others, class_labels=class_labels, attention_mask=attention_mask).items()
                  if value is not None]
        if unused or (cross_attention_kwargs or {}).get("scale", 1.0) != 1.0:
            raise RuntimeError(f"the OpenVINO U-Net does not take {', '.join(unused) or 'cross_attention_kwargs'}")
        given = dict(added_cond_kwargs or {}, sample=sample, encoder_hidden_states=encoder_hidden_states,
                     timestep=torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0]),
                     timestep_cond=timestep_cond)
        out = self.compiled([given[name] for name in self.inputs]).to(sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class _Width:
    """What SDXL's pipelines read of the U-Net's add_embedding: `add_embedding.linear_1.in_features`."""

    def __init__(self, width: int):
        self.linear_1 = type("Linear", (), {"in_features": width})()


class OpenVINODecoder(torch.nn.Module):
    """Stands in for the VAE's Decoder (latents after post_quant_conv -> image), computed by OpenVINO."""

    def __init__(self, path: Path, config: dict):
        super().__init__()
        self.compiled = _Compiled(path, config)

    def forward(self, sample, latent_embeds=None):
        if latent_embeds is not None:
            raise RuntimeError("the OpenVINO VAE decoder does not take latent_embeds")
        return self.compiled([sample]).to(sample.dtype)


class OpenVINOTextEncoder:
    """A CLIP text encoder's OpenVINO twin, kept on the torch encoder as `diffcli_openvino` for prompts.py: called with
    token ids, it gives what the torch encoder gives with output_hidden_states=True, or None for ids the export does not
    know (a textual-inversion token added since), which the torch encoder then encodes.

    The last few results are kept by token ids: the IR cannot change (--backend openvino refuses LoRA), so a prompt
    met again (another seed, sweep cell or batch line) is not encoded again."""

    KEPT = 8  # results kept; each is 13 hidden states of 77 tokens: 3 MB for SD 1.5, 13 MB for SDXL's second encoder

    def __init__(self, path: Path, config: dict, encoder):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        self.compiled = _Compiled(path, config)
        self.vocabulary = encoder.config.vocab_size
        projected = hasattr(encoder, "text_projection")  # SDXL's second encoder: text_embeds first
        self.fields = ("text_embeds", "last_hidden_state") if projected else ("last_hidden_state", "pooler_output")
        self.output = CLIPTextModelOutput if projected else BaseModelOutputWithPooling
        self.kept: collections.OrderedDict[tuple, list] = collections.OrderedDict()

    def __call__(self, ids):
        if int(ids.max()) >= self.vocabulary:
            return None
        key = (tuple(ids.shape), ids.to("cpu", torch.int64).numpy().tobytes())
        outputs = self.kept.pop(key, None) or self.compiled.all([ids])
        self.kept[key] = outputs
        while len(self.kept) > self.KEPT:
            self.kept.popitem(last=False)
        outputs = [each.clone() for each in outputs]  # the caller's to change
        return self.output(**dict(zip(self.fields, outputs[:2])), hidden_states=tuple(outputs[2:]))
