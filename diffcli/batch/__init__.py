"""Batch mode: many jobs from a file or stdin, resumable through a manifest, sharded over processes.

The way a batch travels (each step finishes for ALL jobs before the next starts):
```
file | stdin ──> entries    (one dict per line: text, JSON Lines or CSV; line numbers kept: files.py)
          ──> templates  ({a|b} and __wildcard__ expanded by dynamicprompts, one entry per prompt: files.py)
          ──> jobs       (each entry's values converted by ITS command's declared options, flags.COMMANDS,
                          and built by jobs.build, as the CLI builds them: lines.build_jobs)
          ──> plans      (plan.plan_job: every check, model spec, size; stable seeds and paths: lines.plan_batch)
          ──> ids        (hash of every resolved setting that changes the pixels, per image)
          ──> manifest   (skip images already recorded; shard the rest: job i goes to rank i % world: manifest.py,
                          processes.py)
          ──> run        (run.run_plans per group of jobs that can share pipeline calls;
                          each saved image appended to the manifest)
```
Stability is what makes reruns resume instead of redo: a job without a seed gets `base + n`, n being
the number of images before it in the batch (a line's sweep cells share one seed), base being --seed or the base seed recorded in the
manifest on the first run; paths come from `{job}` (position in the batch), never "next free index".
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffcli import identity, weights
from diffcli.batch.files import detect_format, expand_templates, parse_entries, read_source
from diffcli.batch.lines import BatchJob, batch_out, build_jobs, output_folder, plan_batch
from diffcli.batch.manifest import DRAWN, MANIFEST_NAME, Manifest, mark_finished, record_base_seed, resolve_base_seed
from diffcli.batch.manifest import record as manifest_record
from diffcli.batch.processes import Ranks, StopOnSignal, children_argv, ranks_from_env, spawn
from diffcli.errors import Interrupted, UsageError
from diffcli.options import MAX_SEED, RANDOM_SEED, check_path, check_threads
from diffcli.output import emit_line
from diffcli.plan import share_calls

# Batch options that are defaults for every line's job (when given on the command line or by their env var).
PER_JOB = ("negative", "cfg", "steps", "width", "height", "num_images", "batch_size", "scheduler", "model",
           "model_config", "base", "device", "dtype", "overwrite", "safety_checker", "allow_pickle", "threads", "vae")


@dataclass
class BatchOptions:
    """The batch command line: where the jobs come from and how to run them."""

    source: str  # path or "-"
    fmt: str | None = None
    command: str = "txt2img"
    defaults: dict = field(default_factory=dict)  # per-job options given on the batch command line
    extra_args: list[str] = field(default_factory=list)  # task options batch does not declare itself
    seed: int | None = None  # base seed
    out: str | None = None
    manifest: str | None = None
    wildcards: str | None = None
    random: int | None = None
    dry_run: bool = False
    force: bool = False
    processes: int = 1
    as_json: bool = False
    quiet: bool = False


def batch_options(ctx, values: dict) -> BatchOptions:
    """The batch command line (`values` by option name, flags.BATCH; `ctx.args` the flags after FILE), checked."""
    if any(arg == "--grid" or arg.startswith("--grid=") for arg in ctx.args):
        raise UsageError("batch --grid: a batch writes no contact sheets", "run the sweep with txt2img ... --grid instead")
    check_threads(values["threads"])  # a whole-run setting: once here, not once per line
    seed = values["seed"]
    if seed is not None and not RANDOM_SEED <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, or -1 (random), got {seed}")
    given = {name: values[name] for name in PER_JOB
             if ctx.get_parameter_source(name).name in ("COMMANDLINE", "ENVIRONMENT")}
    return BatchOptions(values["file"], values["fmt"], values["command"], given, list(ctx.args),
                        None if seed == RANDOM_SEED else seed,  # -1 is the default: the manifest's, else random
                        values["out"], values["manifest"], values["wildcards"], values["random"], values["dry_run"],
                        values["force"], values["processes"], values["as_json"], values["quiet"])


def run_command(ctx, values: dict, options: BatchOptions) -> int:
    """The batch command's local run (`options` from batch_options)."""
    from diffcli.flags import BATCH

    return run_batch(options, lambda base, source: children_argv(BATCH, values, list(ctx.args), base, source))


def prepare(options: BatchOptions, ranks: Ranks, text: str | None = None) -> tuple[list[BatchJob], Manifest, int, str]:
    """Everything up to the plans and ids, identical on every rank; loads no weights. `text`: the jobs, read already."""
    pairs, manifest, base, how, out = prepare_jobs(options, ranks, text)
    return plan_batch(pairs, base, out), manifest, base, how


def prepare_jobs(options: BatchOptions, ranks: Ranks, text: str | None = None):
    """The model-free part of prepare: (entry, Job) pairs, the manifest, the base seed, how it was chosen, --out."""
    text = read_source(options.source) if text is None else text
    fmt = detect_format(options.source, options.fmt, text)
    entries = parse_entries(text, fmt)
    if not entries:
        raise UsageError(f"jobs file {options.source!r} has no jobs", "one prompt per line, or JSON Lines, or CSV with a header")
    if options.out:
        check_path("--out", options.out)
    out = batch_out(options.out)
    manifest = Manifest(Path(options.manifest) if options.manifest else output_folder(out) / MANIFEST_NAME)
    manifest.check("--manifest" if options.manifest else "--out", writing=not options.dry_run)
    base, how = resolve_base_seed(options.seed, manifest) if ranks.rank == 0 else (None, "")
    base = ranks.broadcast(base)  # every rank must derive the same seeds, hence the same ids
    entries = expand_templates(entries, options.wildcards, options.random, base)
    return build_jobs(entries, options.command, options.defaults, options.extra_args), manifest, base, how, out


def run_batch(options: BatchOptions, argv_for_children) -> int:
    """The batch command: validate every job, then (dry run | spawn ranks | run this rank's share)."""
    say = (lambda message: None) if options.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    if options.processes < 1:
        raise UsageError(f"--processes must be at least 1, got {options.processes}")
    if options.random is not None and options.random < 1:
        raise UsageError(f"--random must be at least 1, got {options.random}")
    stdin = None  # --processes: the children cannot share our stdin; kept in a file once the jobs are valid
    if options.processes > 1 and options.source == "-":
        stdin = read_source("-")
    ranks = Ranks() if options.dry_run or options.processes > 1 else ranks_from_env()
    try:
        with weights.no_payloads() if options.dry_run else contextlib.nullcontext():
            batch, manifest, base, how = prepare(options, ranks, stdin)  # every job is valid from here on
        if options.dry_run:
            _mark_dry(batch, manifest, options.force)
        else:
            if ranks.rank == 0:
                record_base_seed(manifest, base)
            mark_finished(batch, manifest, options.force, say)
        images = sum(len(item.ids) for item in batch)
        todo = sum(len(item.pending) for item in batch)
        unseeded = options.dry_run and how == DRAWN  # the real run draws its own base seed: these would not be its seeds
        if ranks.rank == 0 and not os.environ.get("DIFFCLI_BATCH_SPAWNED"):
            seed_note = "base seed drawn at run time (pass --seed to fix it)" if unseeded else f"base seed {base} ({how})"
            say(f"batch: {len(batch)} job(s), {images} image(s); {seed_note}; "
                f"{images - todo} already made (manifest {manifest.path}), {todo} to make")
        if options.dry_run:
            for item in batch:
                emit_line(json.dumps(dry_record(item, unseeded and item.from_base), sort_keys=True))
            return 0
        if options.processes > 1:
            if todo == 0:
                return 0
            if stdin is None:
                return spawn(options.processes, argv_for_children(base, options.source),
                             options.defaults.get("threads"))
            source = _stdin_to_file(options, stdin, manifest)
            try:
                return spawn(options.processes, argv_for_children(base, str(source)),
                             options.defaults.get("threads"))
            finally:
                source.unlink(missing_ok=True)
        return run_share(batch, manifest, ranks, options, say)
    finally:
        ranks.close()


def _mark_dry(batch: list[BatchJob], manifest: Manifest, force: bool) -> None:
    finished = set() if force else manifest.made()
    for item in batch:
        item.pending = [i for i, (image, path) in enumerate(zip(item.ids, item.plan.paths))
                        if not ((image, str(path)) in finished and path.is_file())]


def dry_record(item: BatchJob, seed_unknown: bool = False) -> dict:
    """What --dry-run prints per job: enough to see every seed, path and id before any compute. `seed_unknown`: the
    seeds come from a base seed the real run draws, so seeds, ids and names with {seed} are null ("drawn at run time")."""
    plan, job = item.plan, item.plan.job
    paths = None if seed_unknown and "{seed" in plan.name_template else [str(p) for p in plan.paths]
    return {"job": item.number, "line": item.line, "command": job.task, "prompt": job.prompt.text,
            "negative": job.prompt.negative,
            "seeds": None if seed_unknown else plan.seeds, "paths": paths, "ids": None if seed_unknown else item.ids,
            **({"seed": "drawn at run time"} if seed_unknown else {}),
            "done": [i not in item.pending for i in range(len(item.ids))], "model": plan.spec.name,
            "width": plan.width, "height": plan.height, "steps": job.sampling.steps, "cfg": plan.cfg,
            "scheduler": plan.scheduler, "extra": identity.stable(plan.record)}


def run_share(batch: list[BatchJob], manifest: Manifest, ranks: Ranks, options: BatchOptions, say) -> int:
    """Run this rank's jobs (i % world == rank), recording each saved image; Ctrl-C stops cleanly."""
    from diffcli.output import interrupt_pending
    from diffcli.run import run_plans

    mine = [item for item in batch if item.number % ranks.world == ranks.rank and item.pending]
    if ranks.world > 1:
        say(f"rank {ranks.rank}/{ranks.world}: {sum(len(i.pending) for i in mine)} image(s) to make")
        _own_device(mine, ranks)
    made = 0
    with StopOnSignal(say) as stop:
        for group in share_calls(mine, lambda item: item.plan):  # jobs that can share pipeline calls
            if stop.requested:
                break
            for item in group:  # size and tiling decisions the line did not spell out, what the model was not trained for
                for line in item.plan.notes + item.plan.warnings:
                    say(f"{item.where}: {line}")
            parts = [replace(item.plan, seeds=[item.plan.seeds[i] for i in item.pending],
                             paths=[item.plan.paths[i] for i in item.pending]) for item in group]
            by_path = {item.plan.paths[i]: (item, i) for item in group for i in item.pending}

            def on_image(record: dict, by_path=by_path) -> None:
                nonlocal made
                item, index = by_path[Path(record["path"])]
                image = item.ids[index]
                manifest.append(manifest_record(item, image, Path(record["path"]), record["seed"], rank=ranks.rank))
                made += 1
                record = dict(record, id=image, job=item.number, line=item.line, index=index)
                emit_line(json.dumps(record, sort_keys=True) if options.as_json else record["path"])
                if stop.requested or interrupt_pending():  # pending: Ctrl-C came while this image was written
                    raise Interrupted(f"interrupted: {made} image(s) made and recorded in {manifest.path}; "
                                      "run the same command again to make the rest")

            run_plans(parts, on_image, progress_bar=not options.quiet and sys.stderr.isatty(), notify=say)
    if stop.requested:
        raise Interrupted(f"interrupted: {made} image(s) made and recorded in {manifest.path}; "
                          "run the same command again to make the rest")
    say(f"batch: made {made} image(s)" + (f" on rank {ranks.rank}" if ranks.world > 1 else ""))
    return 0


def _own_device(items: list[BatchJob], ranks: Ranks) -> None:
    """Each rank on its own GPU (cuda:local_rank) unless a job names a device index itself."""
    import torch

    if not torch.cuda.is_available():
        return
    for item in items:
        if item.plan.job.model.device in ("auto", "cuda"):
            item.plan.job.model.device = f"cuda:{ranks.local % torch.cuda.device_count()}"


def _stdin_to_file(options: BatchOptions, text: str, manifest: Manifest) -> Path:
    """Child processes cannot share our stdin: keep its jobs in a file of this run's own beside the manifest
    (written atomically, never over an existing file; the extension tells the children its format)."""
    from diffcli.output import write_atomic

    suffix = {"text": "txt", "jsonl": "jsonl", "csv": "csv"}[detect_format("-", options.fmt, text)]
    path = manifest.path.parent / f"diffcli-stdin-jobs-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.{suffix}"
    write_atomic(path, text.encode("utf-8"), overwrite=False)
    return path


