"""LoRA and textual-inversion embeddings: resolve them at plan time (no weights), attach them per job.

`--lora PATH_OR_ID[:SCALE]` (repeatable) and A1111's in-prompt `<lora:name:0.8>` (looked up in
--lora-dir) load through diffusers' `load_lora_weights` (peft backend); `--embedding PATH[:TOKEN]`
and the files of --embedding-dir whose name appears in the prompt load through
`load_textual_inversion`. Only .safetensors files unless --allow-pickle. The pipeline is cached per
process, so each job switches exactly its own LoRAs on (and all others off).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from diffcli import extras, weights
from diffcli.errors import UsageError, first_line
from diffcli.options import check_path
from diffcli.models import HUB_ID
from diffcli.prompts import extra_networks

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # names looked for in --lora-dir / --embedding-dir


def split_scale(text: str, flag: str, default: float = 1.0) -> tuple[str, float]:
    """'file.safetensors:0.7' -> ('file.safetensors', 0.7); a suffix that is no number is part of the name."""
    name, sep, tail = text.rpartition(":")
    if not sep or not name or "/" in tail or "\\" in tail:
        return text, default
    try:
        scale = float(tail)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: scale {tail!r} is not a number") from None
    if not math.isfinite(scale):
        raise UsageError(f"{flag} {text!r}: scale {tail!r} is not a finite number", "e.g. :0.8 (1 is full strength)")
    return name, scale


def _source(text: str, flag: str, allow_pickle: bool) -> str:
    """A local file (its format checked from its bytes: safetensors, or pickle when allowed), a folder or a Hub id."""
    check_path(flag, text)
    path = Path(text).expanduser()
    if path.is_file():
        weights.check(path, flag, allow_pickle)
        return str(path)
    if path.is_dir():
        weights.check_folder(path, flag, allow_pickle)
        return str(path)
    if HUB_ID.match(text) and not text.lower().endswith(weights.WEIGHT_SUFFIXES):
        return text
    raise UsageError(f"{flag} {text!r}: no such file or folder")


def _in_dir(folder: str | None, name: str, flag: str, what: str) -> Path:
    """`name` (with or without suffix) inside the folder given by flag; never a file outside it."""
    if not folder:
        raise UsageError(f"{what} in the prompt needs {flag} (the folder holding {name}.safetensors)")
    root = Path(os.path.abspath(Path(folder).expanduser()))
    target = Path(os.path.normpath(root / name))  # by name: links the user made inside the folder still work
    if not target.is_relative_to(root) or target == root:
        raise UsageError(f"{what} in the prompt: {name!r} points outside {flag} {folder}",
                         "name a file inside that folder, without '..' or '/' at its start")
    if target.is_file():
        return target
    found = sorted((p for p in target.parent.iterdir() if p.stem == target.name and p.suffix.lower() in SUFFIXES
                    and p.is_file()), key=lambda p: SUFFIXES.index(p.suffix.lower())) if target.parent.is_dir() else []
    if found:
        return found[0]
    raise UsageError(f"{what} in the prompt: no {name}.safetensors in {flag} {folder}")


@dataclass(frozen=True)
class Resolved:
    """A job's LoRAs (source, scale) and embeddings (file, token), found and checked; loaded by activate()."""

    loras: tuple = ()
    embeddings: tuple = ()
    allow_pickle: bool = False

    def record(self) -> dict:
        """Scalars for the image metadata (A1111's Lora hashes / TI hashes)."""
        out = {}
        if self.loras:
            out["lora"] = ", ".join(f"{Path(s).stem if Path(s).exists() else s}:{w:g}" for s, w in self.loras)
            out["lora_hashes"] = ", ".join(f"{Path(s).stem}: {short_hash(Path(s))}" for s, _ in self.loras if Path(s).is_file())
        if self.embeddings:
            out["embedding"] = ", ".join(token for _, token in self.embeddings)
            out["embedding_hashes"] = ", ".join(f"{token}: {short_hash(Path(p), False)}" for p, token in self.embeddings)
        return out


def resolve(job) -> Resolved:
    """Check and resolve the job's LoRAs and embeddings (--lora, <lora:> tags, --embedding, --embedding-dir); raises
    UsageError, loads nothing."""
    adapters, allow_pickle = job.adapters, job.model.allow_pickle
    prompt, negative = job.prompt.text, job.prompt.negative
    loras = []
    if adapters.lora:
        extras.require("peft", "--lora")
    for spec in adapters.lora:
        source, scale = split_scale(spec, "--lora")
        loras.append((_source(source, "--lora", allow_pickle), scale))
    lora_dir = adapters.lora_dir or os.environ.get("DIFFCLI_LORA_DIR")
    for kind, name, weight in extra_networks(prompt) + extra_networks(negative):
        if kind == "hypernet":
            raise UsageError(f"<hypernet:{name}> in the prompt: hypernetworks are not supported")
        try:
            scale = float(weight) if weight not in (None, "") else 1.0
        except ValueError:
            raise UsageError(f"<{kind}:{name}:{weight}> in the prompt: weight {weight!r} is not a number") from None
        if not math.isfinite(scale):
            raise UsageError(f"<{kind}:{name}:{weight}> in the prompt: weight {weight!r} is not a finite number",
                             "e.g. <lora:name:0.8> (1 is full strength)")
        extras.require("peft", f"<{kind}:{name}> in the prompt")
        if lora_dir:
            check_path("--lora-dir", lora_dir)
            check_path(f"<{kind}:{name}> in the prompt", name)
        loras.append((_source(str(_in_dir(lora_dir, name, "--lora-dir", f"<{kind}:{name}>")), "--lora-dir", allow_pickle), scale))
    embeddings = []
    for spec in adapters.embedding:
        check_path("--embedding", spec)
        source, _, token = spec.rpartition(":")
        if not source or Path(spec).expanduser().is_file():
            source, token = spec, ""
        path = Path(_source(source, "--embedding", allow_pickle))
        if not path.is_file():
            raise UsageError(f"--embedding {spec!r}: no such file")
        if token and (len(token) > 100 or any(ch.isspace() or not ch.isprintable() for ch in token)):
            raise UsageError(f"--embedding {spec!r}: the token after ':' must be one printable word, got {token[:40]!r}",
                             "an embedding takes no scale: FILE[:TOKEN], the token to write in the prompt")
        embeddings.append((str(path), token or path.stem))
    embedding_dir = adapters.embedding_dir or os.environ.get("DIFFCLI_EMBEDDING_DIR")
    if embedding_dir:
        check_path("--embedding-dir", embedding_dir)
        folder = Path(embedding_dir).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--embedding-dir {embedding_dir!r} is not a folder")
        text = f"{prompt}\n{negative}"
        for path in sorted(folder.iterdir()):
            used = re.search(rf"(?<![\w-]){re.escape(path.stem)}(?![\w-])", text)
            if path.suffix.lower() in SUFFIXES and used and path.stem not in {t for _, t in embeddings}:
                embeddings.append((str(_source(str(path), "--embedding-dir", allow_pickle)), path.stem))
    return Resolved(tuple(loras), tuple(embeddings), allow_pickle)


def short_hash(path: Path, tensors_only: bool = True) -> str:
    """A1111's 12-digit hash of a LoRA (sha256 of a safetensors file's tensor bytes) or embedding (of the file)."""
    from diffcli.hashes import file_hash

    return file_hash(path, tensors_only and weights.file_format(path) == weights.SAFETENSORS)[:12]


def _adapter_name(source: str) -> str:
    return "diffcli_" + hashlib.sha1(source.encode()).hexdigest()[:12]


def activate(pipe, resolved: Resolved) -> None:
    """Give the pipeline exactly the job's embeddings and switch exactly its LoRAs on, at their scales (the pipeline
    is cached per process: an earlier job's adapters must not reach this one's images)."""
    _own_embeddings(pipe, resolved)
    loras = resolved.loras
    denoiser = getattr(pipe, "unet", None) or pipe.transformer  # SD3 and FLUX.1 denoise with a transformer
    loaded = getattr(denoiser, "diffcli_loras", set())  # on the denoiser: pipelines of other tasks share it
    if not loras and not loaded:
        return
    names, weights = [], []
    for source, scale in loras:
        name = _adapter_name(source)
        if name not in loaded:
            _load_lora(pipe, source, name, resolved.allow_pickle)
            loaded.add(name)
        if name not in names:
            names.append(name)
            weights.append(scale)
        else:
            weights[names.index(name)] += scale
    denoiser.diffcli_loras = loaded
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, weights)
    else:
        pipe.disable_lora()


def _load_lora(pipe, source: str, name: str, allow_pickle: bool) -> None:
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading needs the peft backend; resolve() checked it is installed)
    except ImportError:
        raise extras.missing("peft", "--lora") from None
    try:
        if Path(source).is_file():
            pipe.load_lora_weights(weights.load_state_dict(source, "--lora", allow_pickle), adapter_name=name)
        else:
            pipe.load_lora_weights(source, adapter_name=name, use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UsageError(f"--lora {source!r} cannot be loaded into this model: {first_line(exc)}") from exc


def _own_embeddings(pipe, resolved: Resolved) -> None:
    """Unload the embeddings an earlier job loaded that this one does not use (their tokens would otherwise still
    turn into the embedding), then load this job's; kept on the tokenizer, which pipelines of other tasks share."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:  # an SDXL refiner: it reads the base model's prompt embeddings
        return
    wanted = {token: path for path, token in resolved.embeddings}
    loaded = getattr(tokenizer, "diffcli_embeddings", {})
    stale = [token for token, path in loaded.items() if wanted.get(token) != path]
    if stale:
        for encoder, words in ((pipe.text_encoder, tokenizer), (getattr(pipe, "text_encoder_2", None),
                                                                getattr(pipe, "tokenizer_2", None))):
            vectors = [t for t in words.get_vocab() if any(re.fullmatch(rf"{re.escape(s)}(_\d+)?", t) for s in stale)] \
                if words is not None else []  # a multi-vector embedding's tokens: NAME, NAME_1, NAME_2...
            if vectors:
                pipe.unload_textual_inversion(vectors, tokenizer=words, text_encoder=encoder)
        loaded = {token: path for token, path in loaded.items() if token not in stale}
    for token, path in wanted.items():
        if token not in loaded:
            _load_embedding(pipe, path, token, resolved.allow_pickle)
            loaded[token] = path
    tokenizer.diffcli_embeddings = loaded


def _load_embedding(pipe, path: str, token: str, allow_pickle: bool) -> None:
    """One embedding file; SDXL files carry clip_l and clip_g tensors, one per text encoder."""
    if token in pipe.tokenizer.get_vocab():
        raise UsageError(f"--embedding {path!r}: its token {token!r} is a word the model's tokenizer knows already",
                         "give it another token: --embedding FILE:TOKEN")
    try:
        state = weights.load_state_dict(path, "--embedding", allow_pickle)
        if "clip_l" in state and "clip_g" in state:
            pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(state, token=token)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UsageError(f"--embedding {path!r} cannot be loaded into this model: {first_line(exc)}") from exc
