"""What the generating commands do once Typer has parsed their options: build Jobs, plan them all (bad input fails
before any model loads), report, run, print one line per image; `-o -` and --grid; replay; preprocess."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from diffcli import jobs, output
from diffcli.errors import UsageError
from diffcli.jobs import Job
from diffcli.options import RANDOM_SEED, draw_seed
from diffcli.output import emit_line
from diffcli.sweep import Values

REPORTING = ("as_json", "quiet", "grid", "server")  # whole-run switches, not job settings


def say(message: str, quiet: bool) -> None:
    """Human-facing line on stderr."""
    if not quiet:
        print(message, file=sys.stderr)


def generate(command: str, values: dict) -> None:
    """A generating command's body: values keyed by option name (flags.COMMANDS[command] plus REPORTING)."""
    as_json, quiet, grid, server = (values.pop(name, None) for name in REPORTING)
    values["seed"] = shared_seed(values.get("seed"))
    if server:
        from diffcli.server import client

        url = client.server_url(server)
        if url:
            client.generate(url, command, values, as_json, quiet, grid)
            return
    made = jobs.build(command, values)
    if len(made) > 1:
        say(f"sweep: {len(made)} combinations", quiet)
    records = run_jobs(made, as_json, quiet)
    if grid and records:
        from diffcli.sweep import write_grid

        sheet = write_grid(records, made[0].output.overwrite)
        emit_line(json.dumps(sheet, sort_keys=True) if as_json else sheet["grid"])


def batch(ctx, values: dict) -> int:
    """`diffcli batch`: on a server when --server names one that answers (server.client.batch), else here."""
    from diffcli.batch import batch_options, run_command

    options = batch_options(ctx, values)
    if values.get("server"):
        from diffcli.server import client

        url = client.server_url(values["server"])
        if url:
            return client.batch(url, options, lambda message: say(message, options.quiet))
    return run_command(ctx, values, options)


def shared_seed(seed):
    """A command's seeds: without --seed (or with -1) one random seed every sweep cell shares, so the cells differ only
    in what is swept; -1 in a comma list is a random seed of its own."""
    if isinstance(seed, Values) and len(seed) > 1:
        return Values(draw_seed() if each == RANDOM_SEED else each for each in seed)
    if seed is None or list(seed) == [RANDOM_SEED]:
        return draw_seed()
    return seed


def run_jobs(made: list[Job], as_json: bool, quiet: bool, emit: bool = True) -> list[dict]:
    """Plan every job first (so bad input fails before any model loads), then run them; returns the image records.
    `emit`: print each image's line (path or JSON) on stdout."""
    from diffcli.plan import plan_jobs
    from diffcli.run import run_plan

    if len(made) == 1 and made[0].output.out == "-":
        return _run_to_stdout(made[0], as_json, quiet)
    if any(job.output.out == "-" for job in made):
        raise UsageError(f"--out - writes one image to stdout, got a sweep of {len(made)} combinations",
                         "use a folder, or a template with {cfg}, {steps}, {seed} or {scheduler}")
    plans = plan_jobs(made)
    records: list[dict] = []
    spec, plan = plans[0].spec, plans[0]  # the cells of a sweep share model, size and (unless swept) seed
    if spec.source == "bundled" and not plan.job.model.name and plan.job.command != "upscale":  # (its own default)
        say(f"Using the bundled demo model {spec.name!r} (no download). For real images pass --model "
            "with a Hub id, a diffusers folder or a .safetensors checkpoint.", quiet)
    say(f"model {spec.name} ({spec.family}, {spec.source}), seed {plan.seeds[0]}, "
        f"{plan.width}x{plan.height}, {sum(len(p.seeds) for p in plans)} image(s)", quiet)
    said: set[str] = set()
    for plan in plans:
        for line in plan.notes + plan.warnings:  # once per run, not once per sweep cell
            if line not in said:
                said.add(line)
                say(line, quiet)
        first = True

        def on_image(record: dict) -> None:
            nonlocal first
            if first:
                say(f"device {record['device']}, dtype {record['dtype']}, scheduler {record['scheduler']}, "
                    f"steps {record['steps']}, cfg {record['cfg']:g}", quiet)
                first = False
            records.append(record)
            if emit:
                emit_line(json.dumps(record, sort_keys=True) if as_json else record["path"])

        run_plan(plan, on_image, progress_bar=not quiet and sys.stderr.isatty(), notify=lambda m: say(m, quiet))
    return records


def _run_to_stdout(job: Job, as_json: bool, quiet: bool) -> list[dict]:
    """`-o -`: make the one image in a temporary folder, then write its PNG bytes to stdout."""
    if job.sampling.num_images != 1:
        raise UsageError(f"--out - writes one image to stdout, got --num-images {job.sampling.num_images}",
                         "use a folder or a template")
    output.check_stdout(as_json)
    with tempfile.TemporaryDirectory(prefix="diffcli-stdout-") as folder:
        job.output.out = str(Path(folder) / "image.png")
        records = run_jobs([job], False, quiet, emit=False)
        data = Path(records[0]["path"]).read_bytes()
    output.write_stdout(data)
    return records


def replay(image: str, verify: bool, given: dict, as_json: bool, quiet: bool) -> None:
    """`diffcli replay`: the image's recorded settings, overridden by the flags `given` (None: not given), built into
    a Job by the same builder as txt2img/img2img, then planned and run like any other."""
    from diffcli import replay as recorded
    from diffcli.options import check_path

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
    if verify and given.get("out") == "-":
        raise UsageError("--verify compares a saved image with IMAGE; --out - saves none", "drop one of them")
    recorded.check_inputs(settings, image)
    values = recorded.job_values(settings, image, given, lambda message: say(message, quiet))
    command = settings.get("task", "txt2img")
    if values["seed"] in (None, RANDOM_SEED):  # --seed -1, or parameters without a seed: random, reported as always
        values["seed"] = draw_seed()
    job = jobs.build(command, values)[0]
    if command in ("img2img", "edit"):  # sized by their input image
        recorded.fit_size(job, settings["input"], given.get("width"), given.get("height"))
    for kind, folder in (("lora", job.adapters.lora_dir), ("embedding", job.adapters.embedding_dir)):
        if settings.get(kind) and not (given.get(kind) or folder):  # the metadata names them, no file is at hand
            say(f"replay: the image used {kind} {settings[kind]}; pass it again with --{kind} (or --{kind}-dir)", quiet)
    if not given.get("model"):
        recorded.note_model_hash(job, settings.get("model_hash"), lambda message: say(message, quiet))
    records = run_jobs([job], as_json, quiet, emit=not verify)
    if not verify:
        return
    result = recorded.difference(image, records[0]["path"])
    emit_line(json.dumps(dict(records[0], verify=result), sort_keys=True) if as_json else records[0]["path"])
    if not as_json:
        say(recorded.summary(result), quiet)


def _map_path(out: str | None, image: str, name: str, overwrite: bool) -> Path:
    """--out as a .png file or a folder (existing, or ending in /); default outputs/STEM-TYPE.png; PNG only, as a
    map's edges must survive exactly; an existing file is refused here, before any work, unless `overwrite`."""
    from diffcli.options import check_path
    from diffcli.output import DEFAULT_DIR, check_paths

    if out:
        check_path("--out", out)
    path = Path(out or DEFAULT_DIR)
    if out is None or out.endswith(("/", os.sep)) or path.is_dir():
        path = path / f"{Path(image).stem}-{name}.png"
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out: a control map is written as PNG, got {path.suffix or '(no suffix)'!r}",
                         "name a .png file (lossless: a map's edges stay exact) or a folder")
    check_paths([path], overwrite)  # as an image's: not a folder, no silent overwrite, a writable folder
    return path


def preprocess(image: str, type: str, out: str | None, overwrite: bool, allow_pickle: bool, as_json: bool) -> None:
    """`diffcli preprocess`: every check first (type, input, output name, annotator), then one atomic write of a PNG
    recording how it was made, and one line on stdout (the path, or a JSON record)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    from diffcli.control import METADATA_KEY, make, parse_type
    from diffcli.images import load_image
    from diffcli.output import write_atomic

    name, params = parse_type(type)
    picture = load_image(image, "IMAGE")
    path = _map_path(out, image, name, overwrite)
    control = make(picture, name, params, allow_pickle)
    record = {"input": image, "type": name, "params": params, "width": control.width, "height": control.height}
    info, buffer = PngInfo(), io.BytesIO()
    info.add_text(METADATA_KEY, json.dumps(record, sort_keys=True))
    control.save(buffer, "PNG", pnginfo=info)
    write_atomic(path, buffer.getvalue(), overwrite)
    emit_line(json.dumps({"path": str(path), **record}, sort_keys=True) if as_json else str(path))
