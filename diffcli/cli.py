"""The Typer app: parse flags into Jobs, hand them on, map failures to exit codes.

Nothing heavy is imported here so that `diffcli --help` stays fast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from diffcli import __version__
from diffcli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, DiffcliError, Interrupted, RuntimeFailure, UsageError
from diffcli.options import MAX_SEED, Job
from diffcli.output import emit_line
from diffcli.sweep import Values, parse_cfg, parse_prompt_sr, parse_scheduler, parse_seed, parse_steps

app = typer.Typer(
    name="diffcli",
    help="Text-to-image and friends on Stable Diffusion, for people and shell scripts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
STATE = {"debug": False}
# Set by batch mode: run_jobs then only collects the Jobs a command built (see batch.jobs_from_command).
COLLECTING: ContextVar[list | None] = ContextVar("COLLECTING", default=None)

# Options shared by every generating command (txt2img, img2img, inpaint, upscale, ...).
Negative = Annotated[str, typer.Option("--negative", "-n", help="What the image should not show.")]
Cfg = Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale (default 7.5, or the model's recommendation).")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (default suits the scheduler).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed of image 1; image i uses seed+i; -1: random. Default: random, always reported.")]
Width = Annotated[Optional[int], typer.Option("--width", help="Width in pixels (default: the model's native size).")]
Height = Annotated[Optional[int], typer.Option("--height", help="Height in pixels (default: the model's native size).")]
NumImages = Annotated[int, typer.Option("--num-images", "-N", help="How many images to make.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per pipeline call (memory grows with it).")]
Scheduler = Annotated[Optional[str], typer.Option("--scheduler", help="Sampler by name, A1111 names too (see `diffcli schedulers`).")]
Model = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="DIFFCLI_MODEL", help="Bundled name, Hub id, diffusers folder or .safetensors file."),
]
ModelConfig = Annotated[Optional[str], typer.Option("--model-config", help="Diffusers folder describing a non-standard single-file checkpoint.")]
Device = Annotated[str, typer.Option("--device", envvar="DIFFCLI_DEVICE", help="auto | cuda | cuda:N | mps | cpu.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32.")]
Out = Annotated[
    Optional[str],
    typer.Option("--out", "-o", envvar="DIFFCLI_OUTPUT", help="File, folder, or name template like '{index:05d}-{seed}-{slug}.png'. Default: outputs/."),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing files instead of refusing.")]
JsonOut = Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout instead of paths.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors.")]
SafetyChecker = Annotated[bool, typer.Option("--safety-checker", help="Run the model's safety checker (off by default).")]
Optimize = Annotated[bool, typer.Option("--optimize/--no-optimize", help="CUDA fast path: compiled U-Net and VAE with CUDA graphs.")]
LowVram = Annotated[
    Optional[bool],
    typer.Option("--low-vram/--no-low-vram", help="Attention slicing, VAE tiling, CPU offload (default: automatic on small GPUs)."),
]
Threads = Annotated[
    Optional[int],
    typer.Option("--threads", envvar="DIFFCLI_THREADS", help="CPU threads (default: OMP_NUM_THREADS, else the cores other processes leave free)."),
]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle-based weights (.ckpt/.bin); unsafe for untrusted files.")]
# Sweepable forms of --cfg/--steps/--seed/--scheduler: a comma list runs every combination (sweep.py).
CfgList = Annotated[Optional[Values], typer.Option("--cfg", parser=parse_cfg, metavar="CFG[,CFG...]", help="Guidance scale (default 7.5, or the model's recommendation); a comma list sweeps.")]
StepsList = Annotated[Optional[Values], typer.Option("--steps", parser=parse_steps, metavar="N[,N...]", help="Denoising steps (default suits the scheduler); a comma list sweeps.")]
SeedList = Annotated[Optional[Values], typer.Option("--seed", parser=parse_seed, metavar="S[,S...]", help="Seed of image 1; image i uses seed+i; -1: random. Default: random, always reported. A comma list sweeps (-1 in it: a random seed).")]
PromptSR = Annotated[Optional[Values], typer.Option("--prompt-sr", parser=parse_prompt_sr, metavar="WORD,REPLACEMENT[,...]", help="Prompt S/R: one job per item, each replacing the first item in the prompt (CSV quoting: \"a, b\",c); sweeps and --grid like --cfg.")]
Vae = Annotated[Optional[str], typer.Option("--vae", help="Replace the model's VAE (A1111's SD VAE): a .safetensors file, a diffusers folder or a Hub id.")]
SchedulerList = Annotated[Optional[Values], typer.Option("--scheduler", parser=parse_scheduler, metavar="NAME[,NAME...]", help="Sampler by name, A1111 names too (see `diffcli schedulers`); a comma list sweeps.")]
Hires = Annotated[Optional[float], typer.Option("--hires", help="Hires fix: upscale the first pass by SCALE and refine it with img2img.")]
HiresSteps = Annotated[Optional[int], typer.Option("--hires-steps", min=1, help="Steps of the hires pass (default: --steps, or the model's recommendation when --hires-strength is not given).")]
HiresStrength = Annotated[Optional[float], typer.Option("--hires-strength", help="Denoising strength of the hires pass (0..1; default: the model's recommendation, else 0.7).")]
HiresUpscaler = Annotated[str, typer.Option("--hires-upscaler", help="latent (upscale the latents), lanczos (the pixels) or x4 (an SD x4 upscaler model).")]
HiresUpscalerModel = Annotated[Optional[str], typer.Option("--hires-upscaler-model", help="SD x4 upscaler for --hires-upscaler x4 (default: $DIFFCLI_UPSCALE_MODEL, else bundled tiny-shapes-x4).")]
Refiner = Annotated[Optional[str], typer.Option("--refiner", help="Model (bundled name, Hub id, folder or file) that finishes the base model's image: an SDXL refiner for SDXL, an SD 1.x/2.x model for those; 'none' turns off a model's default refiner.")]
DeepCache = Annotated[Optional[int], typer.Option("--deep-cache", min=2, help="DeepCache: run the whole U-Net every N steps, reuse its deep features between (faster, slightly different; U-Net not compiled).")]
RefinerStart = Annotated[Optional[float], typer.Option("--refiner-start", help="Fraction of the schedule the base model runs before the refiner takes over (default 0.8, or the model's own).")]
Grid = Annotated[bool, typer.Option("--grid", help="Also write an X/Y contact sheet of a sweep, with axis labels.")]
Weighting = Annotated[bool, typer.Option("--weighting/--no-weighting", help="A1111 attention syntax: (word), ((word)), \\[word], (word:1.3); \\( is a literal bracket.")]
ClipSkip = Annotated[Optional[int], typer.Option("--clip-skip", min=1, max=12, help="Skip the last CLIP layers, counted as in A1111 (1 = none, 2 = penultimate).")]
VariationSeed = Annotated[Optional[int], typer.Option("--variation-seed", min=0, help="Seed of the noise to vary toward (image i uses variation seed + i).")]
VariationStrength = Annotated[Optional[float], typer.Option("--variation-strength", min=0.0, max=1.0, help="0 = the seed's image, 1 = the variation seed's; needs --variation-seed.")]
Lora = Annotated[Optional[list[str]], typer.Option("--lora", help="LoRA file, folder or Hub id, with an optional :SCALE (default 1); repeatable.")]
LoraDir = Annotated[Optional[str], typer.Option("--lora-dir", envvar="DIFFCLI_LORA_DIR", help="Folder for the prompt's <lora:name:weight> tags.")]
Embedding = Annotated[Optional[list[str]], typer.Option("--embedding", help="Textual-inversion file, with an optional :TOKEN (default: file name); repeatable.")]
EmbeddingDir = Annotated[Optional[str], typer.Option("--embedding-dir", envvar="DIFFCLI_EMBEDDING_DIR", help="Folder of embeddings, used when their file name appears in the prompt.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Text-to-image and friends on Stable Diffusion, for people and shell scripts."""
    STATE["debug"] = debug or bool(os.environ.get("DIFFCLI_DEBUG"))


def say(message: str, quiet: bool) -> None:
    """Human-facing line on stderr."""
    if not quiet:
        print(message, file=sys.stderr)


def run_jobs(jobs: list[Job], as_json: bool, quiet: bool) -> list[dict] | None:
    """Plan every job first (so bad input fails before any model loads), then run them; returns the image records."""
    if (collected := COLLECTING.get()) is not None:  # a batch line: hand the jobs over, run nothing
        collected.extend(jobs)
        return
    if len(jobs) == 1 and jobs[0].out == "-":
        return _run_to_stdout(jobs[0], as_json, quiet)
    if any(job.out == "-" for job in jobs):
        raise UsageError(f"--out - writes one image to stdout, got a sweep of {len(jobs)} combinations",
                         "use a folder, or a template with {cfg}, {steps}, {seed} or {scheduler}")
    from diffcli.generate import plan_jobs, run_plan

    plans = plan_jobs(jobs)
    records: list[dict] = []
    warned: set[str] = set()
    spec, plan = plans[0].spec, plans[0]  # the cells of a sweep share model, size and (unless swept) seed
    if spec.source == "bundled" and not plan.job.model:
        say(f"Using the bundled demo model {spec.name!r} (no download). For real images pass --model "
            "with a Hub id, a diffusers folder or a .safetensors checkpoint.", quiet)
    say(f"model {spec.name} ({spec.family}, {spec.source}), seed {plan.seeds[0]}, "
        f"{plan.width}x{plan.height}, {sum(len(p.seeds) for p in plans)} image(s)", quiet)
    for plan in plans:
        for warning in plan.warnings:  # what the model was not trained for: once per run, not once per sweep cell
            if warning not in warned:
                warned.add(warning)
                say(warning, quiet)
        first = True

        def on_image(record: dict) -> None:
            nonlocal first
            if first:
                say(f"device {record['device']}, dtype {record['dtype']}, scheduler {record['scheduler']}, "
                    f"steps {record['steps']}, cfg {record['cfg']:g}", quiet)
                first = False
            records.append(record)
            emit_line(json.dumps(record, sort_keys=True) if as_json else record["path"])

        run_plan(plan, on_image, progress=not quiet and sys.stderr.isatty(), notify=lambda m: say(m, quiet))
    return records


def _run_to_stdout(job: Job, as_json: bool, quiet: bool) -> None:
    """`-o -`: make the one image in a temporary folder, then write its PNG bytes to stdout."""
    import contextlib
    import io
    import tempfile

    if job.num_images != 1:
        raise UsageError(f"--out - writes one image to stdout, got --num-images {job.num_images}", "use a folder or a template")
    if as_json:
        raise UsageError("--out - and --json both want stdout", "drop one of them")
    if sys.stdout.isatty():
        raise UsageError("--out - would write PNG bytes to the terminal", "redirect stdout: > image.png, or | another program")
    with tempfile.TemporaryDirectory(prefix="diffcli-stdout-") as folder:
        job.out = str(Path(folder) / "image.png")
        path = io.StringIO()
        with contextlib.redirect_stdout(path):
            run_jobs([job], False, quiet)
        data = Path(path.getvalue().strip()).read_bytes()
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # the reader has gone (`| head -c 1`, a closed pipe)
        try:  # what is left in the buffer goes nowhere, so Python's exit flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file descriptor (in-process tests)
            pass
        raise RuntimeFailure("stdout closed before the image was written (the reader of the pipe has gone)") from None


@app.command()
def txt2img(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    negative: Negative = "",
    cfg: CfgList = None,
    steps: StepsList = None,
    seed: SeedList = None,
    width: Width = None,
    height: Height = None,
    num_images: NumImages = 1,
    batch_size: BatchSize = 1,
    scheduler: SchedulerList = None,
    model: Model = None,
    model_config: ModelConfig = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    out: Out = None,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
    safety_checker: SafetyChecker = False,
    allow_pickle: AllowPickle = False,
    optimize: Optimize = True,
    low_vram: LowVram = None,
    threads: Threads = None,
    weighting: Weighting = True,
    clip_skip: ClipSkip = None,
    variation_seed: VariationSeed = None,
    variation_strength: VariationStrength = None,
    lora: Lora = None,
    lora_dir: LoraDir = None,
    embedding: Embedding = None,
    embedding_dir: EmbeddingDir = None,
    grid: Grid = False,
    hires: Hires = None,
    hires_steps: HiresSteps = None,
    hires_strength: HiresStrength = None,
    hires_upscaler: HiresUpscaler = "latent",
    hires_upscaler_model: HiresUpscalerModel = None,
    refiner: Refiner = None,
    refiner_start: RefinerStart = None,
    deep_cache: DeepCache = None,
    prompt_sr: PromptSR = None,
    vae: Vae = None,
) -> None:
    """Generate images from a text prompt; comma lists in --cfg/--steps/--seed/--scheduler/--prompt-sr sweep."""
    swept = {"cfg": cfg, "steps": steps, "seed": seed, "scheduler": scheduler, "prompt_sr": prompt_sr}
    options = {k: v for k, v in locals().items() if k not in ("prompt", "grid", "as_json", "quiet", "swept", *swept)}
    _sweep(txt2img_job(prompt, **options), swept, grid, as_json, quiet)


def txt2img_job(prompt: str, negative: str = "", width: int | None = None, height: int | None = None, num_images: int = 1,
                batch_size: int = 1, model: str | None = None, model_config: str | None = None, device: str = "auto",
                dtype: str = "auto", out: str | None = None, overwrite: bool = False, safety_checker: bool = False,
                allow_pickle: bool = False, optimize: bool = True, low_vram: bool | None = None,
                threads: int | None = None, weighting: bool = True, clip_skip: int | None = None,
                variation_seed: int | None = None, variation_strength: float | None = None, lora: list | None = None,
                lora_dir: str | None = None, embedding: list | None = None, embedding_dir: str | None = None,
                hires: float | None = None, hires_steps: int | None = None, hires_strength: float | None = None,
                hires_upscaler: str = "latent", hires_upscaler_model: str | None = None, refiner: str | None = None,
                refiner_start: float | None = None, deep_cache: int | None = None, vae: str | None = None) -> Job:
    """The txt2img Job from its options (all but the swept ones): the one builder txt2img and replay share."""
    from diffcli.hires import hires_settings
    from diffcli.noise import variation_settings
    from diffcli.refiner import refiner_settings

    job = Job("txt2img", prompt, negative, None, None, None, width, height, num_images, batch_size, None,
              model, model_config, device, dtype, out, overwrite, safety_checker, allow_pickle, optimize, low_vram, threads)
    job.extra.update(weighting=weighting, **variation_settings(variation_seed, variation_strength),
                     **hires_settings(hires, hires_steps, hires_strength, hires_upscaler, hires_upscaler_model),
                     **refiner_settings(refiner, refiner_start))
    job.extra.update({k: v for k, v in (("clip_skip", clip_skip), ("lora_specs", lora), ("lora_dir", lora_dir),
                                        ("embedding_specs", embedding), ("embedding_dir", embedding_dir),
                                        ("deep_cache", deep_cache), ("vae", vae)) if v})
    if deep_cache:  # its hooks on the U-Net's blocks and a compiled U-Net exclude each other
        job.optimize = False
    return job


def _sweep(job: Job, swept: dict, grid: bool, as_json: bool, quiet: bool) -> None:
    """Run one job per combination of the comma-list values, then the --grid contact sheet if asked."""
    from diffcli.sweep import expand, write_grid

    from diffcli.options import RANDOM_SEED, draw_seed

    seeds = swept.get("seed")
    if COLLECTING.get() is None:  # (a batch resolves its seeds itself: batch.plan_batch)
        if seeds:  # -1 in the list: a random seed of its own
            swept["seed"] = Values(draw_seed() if each == RANDOM_SEED else each for each in seeds)
        elif job.seed in (None, RANDOM_SEED):
            job.seed = draw_seed()  # one random seed for every combination, so the cells differ only in what is swept
    jobs = expand(job, **swept)
    if len(jobs) > 1:
        say(f"sweep: {len(jobs)} combinations", quiet)
    if "strength" in job.extra:  # strength x steps is checked per combination before any model loads
        from diffcli.tasks import check_strength

        for each in jobs:
            check_strength(job.extra["strength"], each.steps)
    records = run_jobs(jobs, as_json, quiet)
    if grid and records:
        sheet = write_grid(records, job.overwrite)
        print(json.dumps(sheet, sort_keys=True) if as_json else sheet["grid"], flush=True)


Input = Annotated[str, typer.Argument(help="Input image (PNG, JPEG, WebP...; EXIF orientation applied).")]
Strength = Annotated[float, typer.Option("--strength", help="How much to change the input: 0 keeps it, 1 ignores it.")]


SWEPT = ("cfg", "steps", "seed", "scheduler")


def _job(task: str, prompt: str, common: dict) -> tuple[Job, dict]:
    """A Job from the options every image-to-image command shares, and the swept (comma-list) values apart."""
    weighting = common.pop("weighting")
    vae = common.pop("vae", None)
    swept = {name: common.pop(name) for name in SWEPT}
    job = Job(task, prompt, **common)
    job.extra["weighting"] = weighting
    if vae:
        job.extra["vae"] = vae
    return job, swept


def _run_task(job: Job, swept: dict, grid: bool, as_json: bool, quiet: bool) -> None:
    for note in ("resized", "tiling"):  # size and tiling decisions the user did not spell out
        if note in job.extra:
            say(job.extra[note], quiet)
    _sweep(job, swept, grid, as_json, quiet)


@app.command()
def img2img(
    input: Input,
    prompt: Annotated[str, typer.Argument(help="What the result should show.")],
    strength: Strength = 0.75,
    resize: Annotated[str, typer.Option("--resize", help="With --width/--height: fit (pad), crop or stretch.")] = "fit",
    negative: Negative = "", cfg: CfgList = None, steps: StepsList = None, seed: SeedList = None, width: Width = None,
    height: Height = None, num_images: NumImages = 1, batch_size: BatchSize = 1, scheduler: SchedulerList = None, grid: Grid = False,
    model: Model = None, model_config: ModelConfig = None, device: Device = "auto", dtype: Dtype = "auto",
    out: Out = None, overwrite: Overwrite = False, as_json: JsonOut = False, quiet: Quiet = False,
    safety_checker: SafetyChecker = False, allow_pickle: AllowPickle = False, optimize: Optimize = True,
    low_vram: LowVram = None, threads: Threads = None, weighting: Weighting = True, vae: Vae = None,
) -> None:
    """Change an image following a prompt (size kept, rounded to the model's multiple)."""
    from diffcli import tasks

    common = {k: v for k, v in locals().items() if k not in ("input", "prompt", "strength", "resize", "grid", "as_json", "quiet", "tasks")}
    job, swept = _job("img2img", prompt, common)
    _run_task(tasks.img2img(job, input, strength, resize), swept, grid, as_json, quiet)


@app.command()
def inpaint(
    input: Input,
    prompt: Annotated[str, typer.Argument(help="What to paint into the masked area.")],
    mask: Annotated[Optional[str], typer.Option("--mask", help="Mask image: white = repaint, black = keep.")] = None,
    mask_blur: Annotated[int, typer.Option("--mask-blur", help="Feather the mask edge by PX pixels.")] = 4,
    invert_mask: Annotated[bool, typer.Option("--invert-mask", help="Repaint the black part instead.")] = False,
    mask_from_alpha: Annotated[bool, typer.Option("--mask-from-alpha", help="Repaint the input's transparent pixels.")] = False,
    masked_only: Annotated[bool, typer.Option("--masked-only", help="Inpaint a crop around the mask at full resolution, paste back.")] = False,
    padding: Annotated[int, typer.Option("--padding", help="Pixels around the mask in the --masked-only crop.")] = 32,
    resize_mask: Annotated[bool, typer.Option("--resize-mask", help="Stretch a mask whose size differs from the image.")] = False,
    fill: Annotated[str, typer.Option("--fill", help="What the masked area starts from (A1111's masked content): original (the input's pixels), fill (the colours around it), latent-noise, latent-nothing. Matters below --strength 1.")] = "original",
    strength: Strength = 1.0,
    negative: Negative = "", cfg: CfgList = None, steps: StepsList = None, seed: SeedList = None, width: Width = None,
    num_images: NumImages = 1, batch_size: BatchSize = 1, scheduler: SchedulerList = None, grid: Grid = False,
    model: Model = None, model_config: ModelConfig = None, device: Device = "auto", dtype: Dtype = "auto",
    out: Out = None, overwrite: Overwrite = False, as_json: JsonOut = False, quiet: Quiet = False,
    safety_checker: SafetyChecker = False, allow_pickle: AllowPickle = False, optimize: Optimize = True,
    low_vram: LowVram = None, threads: Threads = None, weighting: Weighting = True, vae: Vae = None,
) -> None:
    """Repaint the white area of a mask; pixels outside the (blurred) mask stay exactly as they were."""
    from diffcli import tasks

    settings = ("input", "prompt", "mask", "mask_blur", "invert_mask", "mask_from_alpha", "masked_only", "padding",
                "resize_mask", "fill", "strength", "grid", "as_json", "quiet", "tasks", "settings")
    common = {k: v for k, v in locals().items() if k not in settings}
    job, swept = _job("inpaint", prompt, common)
    job = tasks.inpaint(job, input, mask, mask_blur, invert_mask, mask_from_alpha, masked_only, padding, strength, resize_mask,
                        fill)
    _run_task(job, swept, grid, as_json, quiet)


@app.command()
def outpaint(
    input: Input,
    prompt: Annotated[str, typer.Argument(help="What the new area should show.")],
    extend: Annotated[str, typer.Option("--extend", help="Pixels to add: left=128,right=128,top=0,bottom=64 or all=64.")] = "all=64",
    feather: Annotated[int, typer.Option("--feather", help="Width of the soft seam into the original, in pixels.")] = 8,
    fill: Annotated[str, typer.Option("--fill", help="What the new area starts from: fill (the colours around it), original (the stretched edge pixels), latent-noise, latent-nothing. Matters below --strength 1.")] = "fill",
    strength: Strength = 1.0,
    negative: Negative = "", cfg: CfgList = None, steps: StepsList = None, seed: SeedList = None,
    num_images: NumImages = 1, batch_size: BatchSize = 1, scheduler: SchedulerList = None, grid: Grid = False,
    model: Model = None, model_config: ModelConfig = None, device: Device = "auto", dtype: Dtype = "auto",
    out: Out = None, overwrite: Overwrite = False, as_json: JsonOut = False, quiet: Quiet = False,
    safety_checker: SafetyChecker = False, allow_pickle: AllowPickle = False, optimize: Optimize = True,
    low_vram: LowVram = None, threads: Threads = None, weighting: Weighting = True, vae: Vae = None,
) -> None:
    """Extend the canvas and paint the new area; the original pixels are kept."""
    from diffcli import tasks

    common = {k: v for k, v in locals().items() if k not in ("input", "prompt", "extend", "feather", "fill", "strength", "grid", "as_json", "quiet", "tasks")}
    job, swept = _job("inpaint", prompt, common)
    _run_task(tasks.outpaint(job, input, extend, feather, strength, fill), swept, grid, as_json, quiet)


@app.command()
def upscale(
    input: Input,
    prompt: Annotated[str, typer.Argument(help="Optional description of the image.")] = "",
    scale: Annotated[int, typer.Option("--scale", help="Upscaling factor: 4 with --method x4, 2 with --method latent.")] = 4,
    method: Annotated[str, typer.Option("--method", help="x4 (SD x4 upscaler) or latent (SD x2 latent upscaler).")] = "x4",
    noise_level: Annotated[int, typer.Option("--noise-level", help="Noise added to the input (0-350): more invents more detail.")] = 20,
    tile: Annotated[Optional[int], typer.Option("--tile", help="Process the input in tiles of SIZE pixels; 0: whole image. Default: 256 (x4) or 512 (latent) when the input is larger.")] = None,
    tile_overlap: Annotated[Optional[int], typer.Option("--tile-overlap", help="Input pixels shared by neighbouring tiles (default: an eighth of --tile).")] = None,
    negative: Negative = "", cfg: CfgList = None, steps: StepsList = None, seed: SeedList = None,
    num_images: NumImages = 1, batch_size: BatchSize = 1, scheduler: SchedulerList = None, grid: Grid = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", envvar="DIFFCLI_UPSCALE_MODEL", help="An SD x4 upscaler (default: bundled tiny-shapes-x4) or, with --method latent, an SD x2 latent upscaler.")] = None,
    device: Device = "auto", dtype: Dtype = "auto",
    out: Out = None, overwrite: Overwrite = False, as_json: JsonOut = False, quiet: Quiet = False,
    allow_pickle: AllowPickle = False, optimize: Optimize = True, low_vram: LowVram = None, threads: Threads = None,
    weighting: Weighting = True, vae: Vae = None,
) -> None:
    """Upscale an image x4 (SD x4 upscaler) or x2 (latent upscaler), optionally in overlapping tiles."""
    from diffcli import tasks

    common = {k: v for k, v in locals().items() if k not in ("input", "prompt", "scale", "method", "noise_level", "tile", "tile_overlap", "grid", "as_json", "quiet", "tasks")}
    job, swept = _job("upscale", prompt, common)
    _run_task(tasks.upscale(job, input, scale, method, noise_level, tile, tile_overlap), swept, grid, as_json, quiet)


@app.command()
def replay(
    image: Annotated[str, typer.Argument(help="An image made by diffcli, or by A1111 or another tool writing A1111's parameters text.")],
    verify: Annotated[bool, typer.Option("--verify", help="Compare the replay with IMAGE: max and mean absolute pixel difference (stderr, or a 'verify' entry with --json).")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Use this model instead of the recorded one (bundled name, Hub id, folder or file).")] = None,
    model_config: ModelConfig = None,
    vae: Vae = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (default: the recorded ones).")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale (default: the recorded one).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed (default: the recorded one); -1: random, reported.")] = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Sampler by name (default: the recorded one; A1111 names are mapped).")] = None,
    width: Annotated[Optional[int], typer.Option("--width", help="Width in pixels (default: the recorded size).")] = None,
    height: Annotated[Optional[int], typer.Option("--height", help="Height in pixels (default: the recorded size).")] = None,
    device: Device = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp16 | bf16 | fp32 | auto; default: the recorded one on the same kind of device, else auto.")] = None,
    out: Out = None,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
    safety_checker: SafetyChecker = False,
    allow_pickle: AllowPickle = False,
    optimize: Optimize = True,
    low_vram: LowVram = None,
    threads: Threads = None,
    lora: Lora = None,
    lora_dir: LoraDir = None,
    embedding: Embedding = None,
    embedding_dir: EmbeddingDir = None,
) -> None:
    """Make an image again from its own metadata (diffcli's, or A1111's parameters text); flags override recorded values."""
    import contextlib
    import io

    from diffcli import replay as recorded
    from diffcli.options import RANDOM_SEED, check_path, draw_seed

    check_path("IMAGE", image)
    meta, text = recorded.read_parameters(image)
    if meta:
        settings, unused = recorded.settings_from_diffcli(meta), []
    elif text:
        settings, unused = recorded.settings_from_a1111(text, image)
    else:
        raise UsageError(f"{image} has no generation parameters",
                         "replay reads diffcli's metadata or the A1111 `parameters` text other tools write")
    if unused:
        say(f"replay: ignoring what diffcli does not use: {', '.join(unused)}", quiet)
    if verify and out == "-":
        raise UsageError("--verify compares a saved image with IMAGE; --out - saves none", "drop one of them")
    recorded.check_inputs(settings, image)
    name = model or recorded.resolve_model_name(settings.get("model"), settings.get("model_hash"), image, allow_pickle)
    recorded_vae = settings.get("vae")
    if not vae and recorded_vae and not recorded.vae_found(recorded_vae):
        say(f"replay: the image was made with VAE {recorded_vae!r}, not found here: using the model's own "
            "(pass --vae FILE to use it)", quiet)
        recorded_vae = None
    options = dict(negative=settings.get("negative") or "", width=width or settings.get("width"),
                   height=height or settings.get("height"), model=name, model_config=model_config, device=device,
                   dtype=recorded.recorded_dtype(settings, device, dtype), out=out, overwrite=overwrite,
                   safety_checker=safety_checker, allow_pickle=allow_pickle, optimize=optimize, low_vram=low_vram,
                   threads=threads, weighting=settings.get("weighting", True), vae=vae or recorded_vae)
    if settings.get("task", "txt2img") == "txt2img":
        refiner = settings.get("refiner")
        job = txt2img_job(
            settings["prompt"], **options, clip_skip=settings.get("clip_skip"), variation_seed=settings.get("variation_seed"),
            variation_strength=settings.get("variation_strength"), lora=lora, lora_dir=lora_dir or settings.get("lora_dir"),
            embedding=embedding, embedding_dir=embedding_dir or settings.get("embedding_dir"), hires=settings.get("hires_scale"),
            hires_steps=settings.get("hires_steps"), hires_strength=settings.get("hires_strength"),
            hires_upscaler=settings.get("hires_upscaler") or "latent", hires_upscaler_model=settings.get("hires_upscaler_model"),
            refiner="none" if "refiner" in settings and refiner is None else refiner, refiner_start=settings.get("refiner_start"),
            deep_cache=settings.get("deep_cache"))
    else:
        job, _ = _job("img2img", settings["prompt"], dict(options, num_images=1, batch_size=1, **dict.fromkeys(SWEPT)))
    job.steps = steps or settings.get("steps")
    job.cfg = cfg if cfg is not None else settings.get("cfg")
    job.scheduler = scheduler or recorded.resolve_scheduler(settings, image)
    job.seed = seed if seed is not None else settings.get("seed")
    if job.seed in (None, RANDOM_SEED):  # --seed -1, or parameters without a seed: random, reported as always
        job.seed = draw_seed()
    if job.task == "img2img":
        from diffcli import tasks

        recorded.fit_size(job, settings["input"], width, height)
        job = tasks.img2img(job, settings["input"], settings.get("strength", 0.75), "fit")
    for kind, given, folder in (("lora", lora, "lora_dir"), ("embedding", embedding, "embedding_dir")):
        if settings.get(kind) and not (given or job.extra.get(folder)):  # the metadata names them, no file is at hand
            say(f"replay: the image used {kind} {settings[kind]}; pass it again with --{kind} (or --{kind}-dir)", quiet)
    if not model:
        recorded.note_model_hash(job, settings.get("model_hash"), lambda message: say(message, quiet))
    if not verify:
        run_jobs([job], as_json, quiet)
        return
    with contextlib.redirect_stdout(io.StringIO()):  # the record is printed below, with the comparison
        records = run_jobs([job], False, quiet)
    result = recorded.difference(image, records[0]["path"])
    if as_json:
        print(json.dumps(dict(records[0], verify=result), sort_keys=True), flush=True)
    else:
        print(records[0]["path"], flush=True)
        say(recorded.summary(result), quiet)


@app.command()
def bench(
    arch: Annotated[str, typer.Option("--arch", help="sd15, sd21, sdxl (random weights, no download) or all.")] = "sd15",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Benchmark this model instead of an --arch.")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    steps: Annotated[int, typer.Option("--steps", min=3, help="Steps per image.")] = 30,
    cfg: Annotated[float, typer.Option("--cfg", help="Guidance scale (>1 runs the U-Net on a batch of 2).")] = 7.5,
    size: Annotated[Optional[int], typer.Option("--size", help="Image side in pixels (default: native).")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma list for the images/s figures.")] = "1,4,8",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats; medians are reported.")] = 3,
    compare: Annotated[Optional[str], typer.Option("--compare", help="'plain': also run plain diffusers eager, same process.")] = None,
    optimize: Optimize = True,
    low_vram: Annotated[bool, typer.Option("--low-vram", help="Measure the memory-saving path instead.")] = False,
    deep_cache: Annotated[Optional[int], typer.Option("--deep-cache", min=2, help="Also measure DeepCache every N steps: speed-up and PSNR vs uncached.")] = None,
    threads: Threads = None,
    contended: Annotated[bool, typer.Option("--contended", help="Also measure with one CPU-bound process competing (started and stopped by the bench): times and ratio.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object per model instead of a table.")] = False,
) -> None:
    """Measure load time, first-image latency, ms per step, end-to-end time, images/s and peak memory."""
    from diffcli.bench import ARCHITECTURES, format_table, run_bench
    from diffcli.options import check_threads

    check_threads(threads)
    if compare not in (None, "plain"):
        raise UsageError(f"--compare must be 'plain', got {compare!r}")
    archs = list(ARCHITECTURES) if arch == "all" else [arch]
    if not model and any(a not in ARCHITECTURES for a in archs):
        raise UsageError(f"--arch must be one of {', '.join(ARCHITECTURES)} or all, got {arch!r}")
    try:
        sizes = [int(b) for b in batch_sizes.split(",")]
    except ValueError:
        raise UsageError(f"--batch-sizes must be a comma list of integers, got {batch_sizes!r}") from None
    for name in [None] if model else archs:
        report = run_bench(name, model, device, dtype, steps, cfg, size, sizes, repeats, compare == "plain", optimize, low_vram,
                           deep_cache, threads, contended)
        print(json.dumps(report, sort_keys=True) if as_json else format_table(report), flush=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def batch(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="Jobs: prompts (.txt, one per line), JSON Lines (.jsonl) or CSV (.csv); - reads stdin.")],
    fmt: Annotated[Optional[str], typer.Option("--format", help="text | jsonl | csv (default: from the extension; stdin: sniffed).")] = None,
    command: Annotated[str, typer.Option("--command", help="Command of lines that name none (a line may say \"command\": ...).")] = "txt2img",
    wildcards: Annotated[Optional[str], typer.Option("--wildcards", help="Folder of NAME.txt files for __NAME__ in prompts.")] = None,
    random: Annotated[Optional[int], typer.Option("--random", help="Draw N prompts from each {a|b} template instead of all combinations.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the expanded jobs (seeds, paths, ids) as JSON lines; load no model.")] = False,
    manifest: Annotated[Optional[str], typer.Option("--manifest", help="Record of finished images (default: diffcli-manifest.jsonl in the output folder).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Make every image again, even those the manifest records.")] = False,
    processes: Annotated[int, typer.Option("--processes", help="Local processes (one per GPU); same as accelerate launch.")] = 1,
    negative: Negative = "",
    cfg: Cfg = None,
    steps: Steps = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Base seed: a job without a seed gets base + images before it. Default (or -1): recorded in the manifest, else random.")] = None,
    width: Width = None,
    height: Height = None,
    num_images: NumImages = 1,
    batch_size: BatchSize = 1,
    scheduler: Scheduler = None,
    model: Model = None,
    model_config: ModelConfig = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    out: Annotated[Optional[str], typer.Option("--out", "-o", envvar="DIFFCLI_OUTPUT", help="Folder or template; default outputs/{job:05d}-{seed}-{slug}.png.")] = None,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
    safety_checker: SafetyChecker = False,
    allow_pickle: AllowPickle = False,
    threads: Threads = None,
    vae: Vae = None,
) -> None:
    """Run many jobs from a file or stdin: resumable, and shardable over processes and GPUs.

    Options after FILE that batch does not know (e.g. --strength for img2img lines) are passed to each line's command.
    """
    from diffcli.batch import BatchOptions, children_argv, run_batch

    if any(arg == "--grid" or arg.startswith("--grid=") for arg in ctx.args):
        raise UsageError("batch --grid: a batch writes no contact sheets", "run the sweep with txt2img ... --grid instead")
    from diffcli.options import RANDOM_SEED, check_threads

    check_threads(threads)  # a whole-run setting: once here, not once per line
    if seed is not None and not RANDOM_SEED <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, or -1 (random), got {seed}")
    seed = None if seed == RANDOM_SEED else seed  # -1 is the default: the manifest's base seed, else a random one
    given = {name: ctx.params[name] for name in ctx.params if ctx.get_parameter_source(name).name == "COMMANDLINE"}
    per_job = ("negative", "cfg", "steps", "width", "height", "num_images", "batch_size", "scheduler", "model",
               "model_config", "device", "dtype", "overwrite", "safety_checker", "allow_pickle", "threads", "vae")
    options = BatchOptions(file, fmt, command, {k: v for k, v in given.items() if k in per_job}, list(ctx.args), seed, out,
                           manifest, wildcards, random, dry_run, force, processes, as_json, quiet)
    code = run_batch(options, lambda base, source: children_argv(ctx, base, source))
    if code:
        raise typer.Exit(code)


EVAL_SEED_STRIDE = 100_000  # shapes.evaluate seeds image i of --seed s with s * 100000 + i


@app.command(name="eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="A tiny-shapes style model (bundled name or folder).")] = "tiny-shapes",
    # image i of seed s is drawn with generator seed s * EVAL_SEED_STRIDE + i (shapes.evaluate): both bounded so it fits
    n: Annotated[int, typer.Option("--n", min=2, max=EVAL_SEED_STRIDE, help="Held-out prompts (half one-object, half two-object).")] = 200,
    seed: Annotated[int, typer.Option("--seed", min=-1, max=MAX_SEED // EVAL_SEED_STRIDE - 1, help="Seed of the prompt draw and the images; -1: random (the report says which).")] = 0,
    steps: Steps = None,
    cfg: Cfg = None,
    scheduler: Scheduler = None,
    device: Device = "auto",
    refiner: Refiner = None,
    refiner_start: RefinerStart = None,
    threads: Threads = None,
) -> None:
    """Measure prompt adherence of the shapes model: per-attribute accuracy from a pixel judge (JSON).

    For an x4 upscaler (tiny-shapes-x4): PSNR of upscaled 32 px renders against the 128 px truth, bicubic alongside.
    """
    from diffcli import speed
    from diffcli.models import resolve_model
    from diffcli.options import check_threads
    from diffcli.pipeline import normalize_scheduler_name, resolve_device
    from diffcli.refiner import refiner_settings
    from diffcli.shapes.evaluate import evaluate as run_eval
    from diffcli.shapes.evaluate import evaluate_upscaler

    check_threads(threads)
    if seed == -1:  # random, as everywhere: the report's "seed" says which
        from diffcli.options import draw_seed

        seed = draw_seed()
    spec = resolve_model(model)
    if not (Path(spec.location) / "diffcli.json").is_file():
        raise UsageError(f"--model {model!r} is not a shapes model (no diffcli.json)", "eval judges tiny-shapes models only")
    name = normalize_scheduler_name(scheduler) if scheduler else None
    if resolve_device(device) == "cpu":  # the lab's own loader places the pipelines: set the threads here, once
        speed.configure_cpu_threads(threads)
    if spec.family == "sd-x4-upscaler":
        if cfg is not None:
            raise UsageError("--cfg does not apply to an upscaler's eval", "it upscales without a prompt (cfg 1)")
        report = evaluate_upscaler(spec.location, n, seed, steps, None, name, resolve_device(device))
    else:
        refiner_settings(refiner, refiner_start)  # the range check
        report = run_eval(spec.location, n, seed, steps, cfg, name, resolve_device(device), refiner=refiner,
                          refiner_start=refiner_start)
    print(json.dumps(report, sort_keys=True))


@app.command()
def schedulers() -> None:
    """List the scheduler names --scheduler accepts, with A1111's names and default steps."""
    from diffcli.pipeline import SCHEDULERS

    for name, entry in SCHEDULERS.items():
        print(f"{name:20} {entry.label:22} {entry.class_name:34} steps {entry.steps}")


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object.")] = False) -> None:
    """Versions, devices found and the default model."""
    import platform

    import torch

    from diffcli.generate import versions
    from diffcli.models import DEFAULT_MODEL, bundled_models

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    report = {
        "versions": dict(versions(), python=platform.python_version()),
        "devices": {"cuda": cuda, "mps": mps, "cpu_threads": torch.get_num_threads()},
        "default_model": os.environ.get("DIFFCLI_MODEL") or DEFAULT_MODEL,
        "bundled_models": sorted(bundled_models()),
    }
    if as_json:
        print(json.dumps(report, sort_keys=True))
        return
    for key, value in report.items():
        print(f"{key}: {json.dumps(value)}")


def _on_sigterm(signum, frame):
    raise Interrupted("terminated", EXIT_TERMINATED)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app and turn every expected failure into one stderr line."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    STATE["debug"] = bool(os.environ.get("DIFFCLI_DEBUG"))
    from diffcli.speed import set_passive_wait

    set_passive_wait()  # before anything imports torch: OpenMP reads it once, when torch loads it
    try:
        code = app(args=argv, prog_name="diffcli", standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # Typer turns Ctrl-C into this exit code
            print("diffcli: interrupted; finished images were kept", file=sys.stderr)
        return code if isinstance(code, int) else 0
    except typer.Abort:
        print("diffcli: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TyperException as exc:  # bad flags or values, found by the parser
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message()
        if not message and ctx is not None:  # no arguments at all: show the help
            print(ctx.get_help(), file=sys.stderr)
        else:
            print(f"diffcli: error: {message}", file=sys.stderr)
            if ctx is not None:
                print(f"Try '{ctx.command_path} --help'.", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("diffcli: interrupted; finished images were kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DiffcliError as exc:
        if STATE["debug"]:
            raise
        print(f"diffcli: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if STATE["debug"]:
            raise
        print(f"diffcli: error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    """setuptools console-script wrapper."""
    sys.exit(main())
