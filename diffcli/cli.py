"""The Typer app: commands declared from flags.COMMANDS (every option declared once), failures mapped to exit codes.

Nothing heavy is imported here so that `diffcli --help` stays fast; each command's body lives in the module named in
it (commands, batch, bench, shapes.evaluate).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from diffcli import __version__, declare, flags
from diffcli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, DiffcliError, Interrupted, UsageError
from diffcli.declare import Flag
from diffcli.flags import COMMANDS, GRID, REPORTING, RUNTIME, SECOND_PASSES, SERVER
from diffcli.options import MAX_SEED
from diffcli.shapes import SEED_STRIDE as EVAL_SEED_STRIDE

app = typer.Typer(
    name="diffcli",
    help="Text-to-image and friends on Stable Diffusion, for people and shell scripts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
STATE = {"debug": False}
# Annotated types of shared options for the commands declared by hand below (bench, batch, eval, info).
Device, Dtype, Threads = (RUNTIME[name].annotation() for name in ("device", "dtype", "threads"))
Scheduler = Flag("scheduler", ("--scheduler",), str, None, "Sampler by name, A1111 names too (see `diffcli schedulers`).").annotation()
Steps = Flag("steps", ("--steps",), int, None, "Denoising steps (default suits the scheduler).").annotation()
Cfg = Flag("cfg", ("--cfg",), float, None, "Guidance scale (default 7.5, or the model's recommendation).").annotation()
Optimize = RUNTIME["optimize"].annotation()
Refiner, RefinerStart = SECOND_PASSES["refiner"].annotation(), SECOND_PASSES["refiner_start"].annotation()

GENERATING = {  # command -> its docstring (the --help text)
    "txt2img": "Generate images from a text prompt; comma lists in --cfg/--steps/--seed/--scheduler/--prompt-sr sweep.",
    "img2img": "Change an image following a prompt (size kept, rounded to the model's multiple).",
    "inpaint": "Repaint the white area of a mask; pixels outside the (blurred) mask stay exactly as they were.",
    "outpaint": "Extend the canvas and paint the new area; the original pixels are kept.",
    "edit": "Edit an image following an instruction (\"make the car blue\") with FLUX.1 Kontext, Qwen-Image-Edit "
            "or FLUX.2 models; size kept, rounded to the model's multiple.",
    "upscale": "Upscale an image x4 (SD x4 upscaler) or x2 (latent upscaler), optionally in overlapping tiles.",
}


def _generating(name: str) -> None:
    def body(**values) -> None:
        from diffcli import commands

        commands.generate(name, values)

    server = {} if name in flags.LOCAL_ONLY else {"server": SERVER}  # the server does not run them
    declare.command(app, name, {**COMMANDS[name], **REPORTING, "grid": GRID, **server}, GENERATING[name])(body)


for _name in GENERATING:
    _generating(_name)


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


@declare.command(app, "replay", flags.REPLAY, "Make an image again from its own metadata (diffcli's, or A1111's "
               "parameters text); flags override recorded values.")
def replay(image: str, verify: bool, as_json: bool, quiet: bool, **given) -> None:
    from diffcli import commands

    commands.replay(image, verify, given, as_json, quiet)


@app.command()
def bench(
    arch: Annotated[str, typer.Option("--arch", help="sd15, sd21, sdxl, flux, sd35, qwen-image, z-image (full size, random weights, no download; the last four are 10-29 B parameters: a GPU's) or all.")] = "sd15",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Benchmark this model instead of an --arch.")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    steps: Annotated[Optional[int], typer.Option("--steps", min=3, help="Steps per image (default: 30; the family's usual for flux 28, sd35 28, qwen-image 50, z-image 9).")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale as the family reads it: CFG (>1 runs the denoiser on a batch of 2), FLUX.1's distilled guidance, Qwen-Image's true CFG (default: 7.5; flux 3.5, sd35 4.5, qwen-image 4, z-image 0).")] = None,
    size: Annotated[Optional[int], typer.Option("--size", help="Image side in pixels (default: native).")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma list for the images/s figures.")] = "1,4,8",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats; medians are reported.")] = 3,
    compare: Annotated[Optional[str], typer.Option("--compare", help="Comma list: plain (plain diffusers eager, same process), openvino (optimum-intel, in a child process: $DIFFCLI_OPENVINO_PYTHON), sdcpp (stable-diffusion.cpp's Python bindings on an fp16 single file, in a child process: $DIFFCLI_SDCPP_PYTHON); each with its PSNR against plain's seed-0 image.")] = None,
    optimize: Optimize = True,
    low_vram: Annotated[bool, typer.Option("--low-vram", help="Measure the memory-saving path instead.")] = False,
    deep_cache: Annotated[Optional[int], typer.Option("--deep-cache", min=2, help="Also measure DeepCache every N steps: speed-up and PSNR vs uncached.")] = None,
    threads: Threads = None,
    contended: Annotated[bool, typer.Option("--contended", help="Also measure with one CPU-bound process competing (started and stopped by the bench): times and ratio.")] = False,
    backend: Annotated[str, typer.Option("--backend", help="diffcli's CPU engine: auto (OpenVINO where it is installed and the CPU runs bf16), torch or openvino.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object per model instead of a table.")] = False,
) -> None:
    """Measure load time, first-image latency, ms per step, end-to-end time, images/s and peak memory."""
    from diffcli.bench import arch_defaults, arch_names, check_backend, format_table, parse_compare, run_bench, weights_fit
    from diffcli.options import check_threads

    check_threads(threads)
    check_backend(backend, device)
    peers = parse_compare(compare)
    archs = list(arch_names()) if arch == "all" else [arch]
    if not model and any(a not in arch_names() for a in archs):
        raise UsageError(f"--arch must be one of {', '.join(arch_names())} or all, got {arch!r}")
    try:
        sizes = [int(b) for b in batch_sizes.split(",")]
    except ValueError:
        raise UsageError(f"--batch-sizes must be a comma list of integers, got {batch_sizes!r}") from None
    if not model:  # before anything is built: one too big is refused, and skipped by all
        unfit = {name: why for name in archs if (why := weights_fit(name, device, dtype))}
        if unfit and arch != "all":
            raise UsageError(unfit[arch], "run it on a GPU with that much free memory")
        for name, why in unfit.items():
            typer.echo(f"diffcli: skipping {name}: {why}", err=True)
        archs = [name for name in archs if name not in unfit]
    for name in [None] if model else archs:
        _, default_steps, default_cfg = arch_defaults(name)
        report = run_bench(name, model, device, dtype, steps or default_steps, default_cfg if cfg is None else cfg, size,
                           sizes, repeats, peers, optimize, low_vram, deep_cache, threads, contended, backend)
        print(json.dumps(report, sort_keys=True) if as_json else format_table(report), flush=True)


@declare.command(app, "batch", flags.BATCH, "Run many jobs from a file or stdin: resumable, and shardable over processes "
               "and GPUs.\n\nOptions after FILE that batch does not know (e.g. --strength for img2img lines) are passed "
               "to each line's command.", context=True,
               context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def batch(ctx: typer.Context, **values) -> None:
    from diffcli import commands

    code = commands.batch(ctx, values)
    if code:
        raise typer.Exit(code)


@declare.command(app, "serve", flags.SERVE, "Keep a model warm behind AUTOMATIC1111's web API (/sdapi/v1) and "
                 "diffcli's own (/diffcli/v1); `--server URL` on the other commands uses it.")
def serve(**values) -> None:
    from diffcli.server.start import ServeOptions, serve as run_server

    run_server(ServeOptions(**values))


@declare.command(app, "preprocess", flags.PREPROCESS, "Make a ControlNet control map from an image (canny edges, "
                 "scribble, threshold, lineart, tile...) and write it, to inspect or to reuse as a map.")
def preprocess(**values) -> None:
    from diffcli import commands

    commands.preprocess(**values)


@app.command(name="eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="A tiny-shapes style model (bundled name or folder).")] = "tiny-shapes",
    # image i of seed s is drawn with generator seed s * EVAL_SEED_STRIDE + i: both bounded so it fits
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
    from diffcli.shapes.evaluate import run

    report = run(model, n, seed, steps, cfg, scheduler, device, refiner, refiner_start, threads)
    print(json.dumps(report, sort_keys=True))


@app.command()
def schedulers(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only those this model's family takes (its own "
                                                 "marked *): bundled name, Hub id, folder or file; no weights load.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="The base a transformer-only --model file is completed "
                                                "from (as txt2img's --base).")] = None,
) -> None:
    """List the scheduler names --scheduler accepts, with A1111's names and default steps."""
    from diffcli import families
    from diffcli.pipeline import SCHEDULERS

    own, flow_match = None, None
    if model:
        from diffcli.models import resolve_model

        spec = resolve_model(model, base=base)
        own, flow_match = spec.defaults.get("scheduler"), families.of(spec).flow_match
    for name, entry in SCHEDULERS.items():
        if flow_match is None or entry.flow_match == flow_match:
            mark = "*" if name == own or (own is None and flow_match and entry.flow_match) else " "
            print(f"{name:20}{mark}{entry.label:22} {entry.class_name:34} steps {entry.steps}")


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object.")] = False) -> None:
    """Versions, devices found and the default model."""
    import platform

    import torch

    from diffcli.models import DEFAULT_MODEL, bundled_models
    from diffcli.run import versions

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
