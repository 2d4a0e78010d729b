"""One validated settings object per job; everything is checked before any weights load."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import asdict, dataclass, field

from diffcli.errors import UsageError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "fp16", "bf16", "fp32")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; seed + i must still fit
RANDOM_SEED = -1  # --seed -1: a random seed, as in A1111 and every UI; drawn when the job is made, then reported
MAX_SIDE = 8192  # larger sizes are almost always a typo and would exhaust memory
MAX_IMAGES = 100_000  # images one command (a sweep times --num-images) may make: a typo guard, as batch templates have
NAME_MAX = 255  # bytes in one file or folder name (Linux, macOS and Windows file systems): ENAMETOOLONG beyond
PATH_MAX = 4096  # bytes in a whole path (Linux)


@dataclass
class Job:
    """Everything needed to produce the images of one command line (or one batch line)."""

    task: str = "txt2img"
    prompt: str = ""
    negative: str = ""
    cfg: float | None = None  # None: the model's recommendation, else 7.5 (A1111's default)
    steps: int | None = None  # None: the scheduler's own sensible default (see pipeline.SCHEDULERS)
    seed: int | None = None  # None: drawn at random, then always reported
    width: int | None = None  # None: the model's native size
    height: int | None = None
    num_images: int = 1
    batch_size: int = 1  # images per pipeline call; memory grows linearly with it
    scheduler: str | None = None  # None: the scheduler the model ships with
    model: str | None = None  # None: $DIFFCLI_MODEL, then the bundled model
    model_config: str | None = None  # diffusers folder describing a single-file checkpoint
    device: str = "auto"
    dtype: str = "auto"
    out: str | None = None  # None: $DIFFCLI_OUTPUT, then ./outputs/
    overwrite: bool = False
    safety_checker: bool = False
    allow_pickle: bool = False
    optimize: bool = True  # the CUDA fast path (compile, CUDA graphs); off with --no-optimize
    low_vram: bool | None = None  # None: on automatically when the GPU is small for the model
    threads: int | None = None  # CPU threads; None: OMP_NUM_THREADS, else the cores other processes leave free
    extra: dict = field(default_factory=dict)  # task-specific settings (strength, mask, ...)

    def settings(self) -> dict:
        """Plain dict of all settings, for metadata and JSON output."""
        return asdict(self)


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


def validate(job: Job) -> Job:
    """Check every setting that needs no model; raise UsageError naming the flag and value."""
    from diffcli.prompts import check_weights

    if job.task == "txt2img" and not job.prompt.strip():
        raise UsageError("PROMPT is empty", "give the text of the image to generate")
    for flag, text in (("PROMPT", job.prompt), ("--negative", job.negative)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{flag} is not valid UTF-8 text", "check the terminal's or the file's encoding") from None
        if "\0" in text:
            raise UsageError(f"{flag} contains a NUL character (at {text.index(chr(0))})", "remove it; no tokenizer reads it")
        if job.extra.get("weighting", True):
            check_weights(flag, text)
    for flag, value in (("--out", job.out if job.out != "-" else None), ("--model", job.model),
                        ("--model-config", job.model_config)):
        if value:
            check_path(flag, value)
    if job.cfg is not None and not 0 <= job.cfg <= 100:
        raise UsageError(f"--cfg must be between 0 and 100, got {job.cfg:g}")
    if job.steps is not None and not 1 <= job.steps <= 1000:
        raise UsageError(f"--steps must be between 1 and 1000, got {job.steps}")
    for flag, value in (("--width", job.width), ("--height", job.height)):
        if value is not None and not 8 <= value <= MAX_SIDE:
            raise UsageError(f"{flag} must be between 8 and {MAX_SIDE}, got {value}")
    if job.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {job.num_images}")
    if job.num_images > MAX_IMAGES:
        raise UsageError(f"--num-images must be at most {MAX_IMAGES}, got {job.num_images}", "run several commands")
    if job.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {job.batch_size}")
    if job.seed is not None and not 0 <= job.seed <= MAX_SEED - job.num_images:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED - job.num_images}, or -1 (random), got {job.seed}")
    variation = job.extra.get("variation_seed")
    if variation is not None and not 0 <= variation <= MAX_SEED - job.num_images:  # image i uses variation seed + i
        raise UsageError(f"--variation-seed must be between 0 and {MAX_SEED - job.num_images}, got {variation}")
    if not DEVICE_PATTERN.match(job.device):
        raise UsageError(f"--device must be auto, cpu, mps, cuda or cuda:N, got {job.device!r}")
    if job.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {job.dtype!r}")
    check_threads(job.threads)
    return job


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
