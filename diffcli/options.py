"""Limits and checks of single values that need no model: seeds, sizes, paths, threads, the core job fields."""

from __future__ import annotations

import os
import re
import secrets

from diffcli.errors import UsageError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "fp16", "bf16", "fp32")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; seed + i must still fit
RANDOM_SEED = -1  # --seed -1: a random seed, as in A1111 and every UI; drawn when the job is made, then reported
MAX_SIDE = 8192  # larger sizes are almost always a typo and would exhaust memory
MAX_IMAGES = 100_000  # images one command (a sweep times --num-images) may make: a typo guard, as batch templates have
NAME_MAX = 255  # bytes in one file or folder name (Linux, macOS and Windows file systems): ENAMETOOLONG beyond
PATH_MAX = 4096  # bytes in a whole path (Linux)


def draw_seed() -> int:
    """A random seed in A1111's 32-bit range, so it can be typed back in anywhere."""
    return secrets.randbelow(2**32)


def check_path(flag: str, path) -> None:
    """Refuse a path the OS cannot take (a NUL, text that is no file name, a name over NAME_MAX bytes), naming the flag."""
    text = os.fspath(path)
    shown = repr(text if len(text) <= 60 else text[:40] + "..." + text[-12:])
    if "\0" in text:
        raise UsageError(f"{flag}: a path cannot contain a NUL character, got {shown}")
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError:
        raise UsageError(f"{flag}: not a valid file name, got {shown}", "check the terminal's or the file's encoding") from None
    longest = max(len(part) for part in encoded.split(os.fsencode(os.sep)))
    if longest > NAME_MAX:
        raise UsageError(f"{flag}: file name too long ({longest} bytes), got {shown}",
                         f"one file or folder name may have at most {NAME_MAX} bytes")
    if len(encoded) >= PATH_MAX:
        raise UsageError(f"{flag}: path too long ({len(encoded)} bytes), got {shown}", f"at most {PATH_MAX - 1} bytes")


def check_core(job) -> None:
    """Check the prompt, sampling, model and output settings of a jobs.Job that need no model, naming flag and value."""
    from diffcli.prompts import check_weights

    prompt, sampling, model = job.prompt, job.sampling, job.model
    if job.command == "txt2img" and not prompt.text.strip():
        raise UsageError("PROMPT is empty", "give the text of the image to generate")
    for flag, text in (("PROMPT", prompt.text), ("--negative", prompt.negative)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{flag} is not valid UTF-8 text", "check the terminal's or the file's encoding") from None
        if "\0" in text:
            raise UsageError(f"{flag} contains a NUL character (at {text.index(chr(0))})", "remove it; no tokenizer reads it")
        if prompt.weighting:
            check_weights(flag, text)
    out = job.output.out
    for flag, value in (("--out", out if out != "-" else None), ("--model", model.name), ("--model-config", model.config)):
        if value:
            check_path(flag, value)
    if sampling.cfg is not None and not 0 <= sampling.cfg <= 100:
        raise UsageError(f"--cfg must be between 0 and 100, got {sampling.cfg:g}")
    if sampling.steps is not None and not 1 <= sampling.steps <= 1000:
        raise UsageError(f"--steps must be between 1 and 1000, got {sampling.steps}")
    clip_skip = job.prompt.clip_skip  # (a jobs file, a request or a replayed image too, not only the flag's range)
    if clip_skip is not None and not 1 <= clip_skip <= 12:
        raise UsageError(f"--clip-skip must be between 1 and 12, got {clip_skip}")
    for flag, value in (("--width", sampling.width), ("--height", sampling.height)):
        if value is not None and not 8 <= value <= MAX_SIDE:
            raise UsageError(f"{flag} must be between 8 and {MAX_SIDE}, got {value}")
    count = sampling.num_images
    if count < 1:
        raise UsageError(f"--num-images must be at least 1, got {count}")
    if count > MAX_IMAGES:
        raise UsageError(f"--num-images must be at most {MAX_IMAGES}, got {count}", "run several commands")
    if sampling.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {sampling.batch_size}")
    if sampling.seed is not None and not 0 <= sampling.seed <= MAX_SEED - count:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED - count}, or -1 (random), got {sampling.seed}")
    variation = sampling.variation_seed
    if variation is not None and not 0 <= variation <= MAX_SEED - count:  # image i uses variation seed + i
        raise UsageError(f"--variation-seed must be between 0 and {MAX_SEED - count}, got {variation}")
    if not DEVICE_PATTERN.match(model.device):
        raise UsageError(f"--device must be auto, cpu, mps, cuda or cuda:N, got {model.device!r}")
    if model.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {model.dtype!r}")
    check_threads(model.threads)
    from diffcli.speed import check_deep_cache

    check_deep_cache(model.deep_cache)


def check_threads(threads: int | None) -> None:
    """--threads (or $DIFFCLI_THREADS) is at least 1 and at most speed.MAX_THREADS."""
    from diffcli.speed import MAX_THREADS

    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")


def check_size_multiple(width: int, height: int, multiple: int) -> None:
    """Refuse sizes the model cannot produce (diffusers would floor them silently)."""
    if width % multiple or height % multiple:
        raise UsageError(
            f"--width and --height must be multiples of {multiple} for this model, got {width}x{height}",
            f"try {width - width % multiple or multiple}x{height - height % multiple or multiple}",
        )
