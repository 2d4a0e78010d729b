"""Batch mode: many jobs from a file or stdin, resumable through a manifest, sharded over processes.

The way a batch travels (each step finishes for ALL jobs before the next starts):
```
file | stdin ──> entries    (one dict per line: text, JSON Lines or CSV; line numbers kept)
          ──> templates  ({a|b} and __wildcard__ expanded by dynamicprompts, one entry per prompt)
          ──> jobs       (each entry parsed by ITS command's own Typer options -> Job: no second parser)
          ──> plans      (generate.plan_job: validation, model spec, size; stable seeds and paths)
          ──> ids        (hash of every resolved setting that changes the pixels, per image)
          ──> manifest   (skip images already recorded; shard the rest: job i goes to rank i % world)
          ──> run        (generate.run_plans per group of jobs that can share pipeline calls;
                          each saved image appended to the manifest)
```
Stability is what makes reruns resume instead of redo: a job without a seed gets `base + n`, n being
the number of images before it in the batch (a line's sweep cells share one seed), base being --seed or the base seed recorded in the
manifest on the first run; paths come from `{job}` (position in the batch), never "next free index".
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import os
import random as random_module  # (`random` is the --random option's name here)
import re
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffcli import identity, weights
from diffcli.output import emit_line
from diffcli.errors import EXIT_INTERRUPTED, Interrupted, RuntimeFailure, UsageError, first_line
from diffcli.options import RANDOM_SEED, Job, check_path, draw_seed

FORMATS = {".txt": "text", ".prompts": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
TASKS = ("txt2img", "img2img", "inpaint", "outpaint", "upscale")  # commands a batch line may name (once they exist)
BATCH_TEMPLATE = "{job:05d}-{seed}-{slug}.png"  # stable across reruns, unlike {index} ("next free number")
MANIFEST_NAME = "diffcli-manifest.jsonl"
DRAWN = "drawn at random"  # how a base seed came about when neither --seed nor the manifest gave one
PER_RUN_KEYS = {"as_json", "json", "quiet", "help", "grid", "threads"}  # whole-run switches, not settings of one job
# (threads: torch has one CPU thread pool per process; batch's --threads reaches every line's job as a default)
TRUST_KEYS = {"allow_pickle"}  # trust comes from the command line only, never from a jobs file
MAX_EXPANSION = 100_000  # one template line may not make more jobs than this (typo guard)
TEMPLATE_MARK = re.compile(r"\{[^{}]*\|[^{}]*\}|__[\w./*-]+__")
WILDCARD = re.compile(r"__([\w./*-]+)__")
BATCH_FIELDS = re.compile(r"\{(job|line|index)(![rsa])?(:[^{}]*)?\}")


@dataclass
class Entry:
    """One job as read from the file: its line number and its raw key/value settings."""

    line: int
    values: dict


@dataclass
class BatchJob:
    """A job of the batch with its plan, its place in the batch and the stable id of each image."""

    number: int  # position in the expanded batch (0-based): the {job} field and the shard key
    line: int  # line of the jobs file it came from (1-based)
    plan: object  # generate.Plan
    ids: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # indices of the images still to make
    from_base: bool = False  # its seeds derive from the base seed (the line gave none, or -1)

    @property
    def where(self) -> str:
        return f"line {self.line}"


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


# ---------------------------------------------------------------- reading entries


def read_source(source: str) -> str:
    """The jobs file's text (or stdin's)."""
    if source == "-":
        hint = "pipe the jobs in (cat jobs.txt | diffcli batch -), or name a jobs file"
        if sys.stdin is None:  # started with stdin closed (<&-)
            raise UsageError("no jobs on stdin: it is closed", hint)
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise UsageError(f"the jobs on stdin are not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        except (OSError, ValueError) as exc:  # a closed or unreadable descriptor
            raise UsageError(f"no jobs on stdin: cannot read it: {first_line(exc)}", hint) from None
    check_path("FILE", source)
    try:
        return Path(source).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"jobs file {source!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"jobs file {source!r} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise UsageError(f"cannot read jobs file {source!r}: {exc.strerror or exc}") from None


def detect_format(source: str, fmt: str | None, text: str) -> str:
    """--format, else the extension, else (stdin or unknown extension) JSON Lines if it starts with '{'."""
    if fmt:
        if fmt not in ("text", "jsonl", "csv"):
            raise UsageError(f"--format must be text, jsonl or csv, got {fmt!r}")
        return fmt
    by_suffix = FORMATS.get(Path(source).suffix.lower()) if source != "-" else None
    if by_suffix:
        return by_suffix
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    return "jsonl" if first.startswith("{") else "text"


def parse_entries(text: str, fmt: str) -> list[Entry]:
    """One Entry per job line; blank lines and '#' comments are skipped (CSV: blank rows)."""
    entries = []
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        try:
            if not reader.fieldnames:
                return []
            for row in reader:
                if None in row:
                    raise UsageError(f"line {reader.line_num}: more cells than header columns ({len(reader.fieldnames)})")
                values = {key.strip(): value for key, value in row.items() if key and value not in (None, "")}
                if values:
                    entries.append(Entry(reader.line_num, values))
        except csv.Error as exc:  # e.g. a cell over csv's field size limit
            raise UsageError(f"line {reader.line_num}: not valid CSV: {exc}") from None
        return entries
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if fmt == "text":
            entries.append(Entry(number, {"prompt": line}))
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # a number of thousands of digits, arrays nested thousands deep
            raise UsageError(f"line {number}: not valid JSON: {first_line(exc)}") from None
        if not isinstance(values, dict):
            raise UsageError(f"line {number}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(values).__name__}")
        entries.append(Entry(number, values))
    return entries


# ---------------------------------------------------------------- templates


def expand_templates(entries: list[Entry], wildcards: str | None, random: int | None, base_seed: int) -> list[Entry]:
    """Expand `{a|b}` and `__name__` in prompts with dynamicprompts: all combinations, or `random` draws.

    Prompts without such marks pass through untouched (dynamicprompts would eat '#' and '%' in them).
    Random draws are seeded from the base seed and the line, so a rerun draws the same prompts.
    """
    if wildcards is not None:
        check_path("--wildcards", wildcards)
    if wildcards is not None and not Path(wildcards).is_dir():
        raise UsageError(f"--wildcards {wildcards!r} is not a folder")
    out = []
    manager = None
    for entry in entries:
        prompt = entry.values.get("prompt")
        if not isinstance(prompt, str) or not TEMPLATE_MARK.search(prompt):
            out.append(entry)
            continue
        if manager is None:
            from dynamicprompts.wildcards import WildcardManager

            manager = WildcardManager(Path(wildcards) if wildcards else None)
        for name in WILDCARD.findall(prompt):
            if wildcards is None:
                raise UsageError(f"line {entry.line}: __{name}__ needs --wildcards DIR (a folder of NAME.txt files)")
            if not manager.get_all_values(name):
                raise UsageError(f"line {entry.line}: wildcard __{name}__ not found in {wildcards}",
                                 f"expected {Path(wildcards) / name}.txt with one value per line")
        prompts = _generate(manager, prompt, random, base_seed + entry.line, entry.line)
        out.extend(Entry(entry.line, dict(entry.values, prompt=text)) for text in prompts)
    return out


def _generate(manager, prompt: str, random: int | None, seed: int, line: int) -> list[str]:
    """dynamicprompts' combinatorial (default) or seeded random generator, errors made one line."""
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator

    try:
        if random:
            return [str(p) for p in RandomPromptGenerator(manager, seed=seed).generate(prompt, random)]
        prompts = [str(p) for p in CombinatorialPromptGenerator(manager).generate(prompt, max_prompts=MAX_EXPANSION + 1)]
    except Exception as exc:  # pyparsing and dynamicprompts raise many types; all mean a bad template
        raise UsageError(f"line {line}: cannot read the prompt template: {first_line(exc)}") from None
    if len(prompts) > MAX_EXPANSION:
        raise UsageError(f"line {line}: the template makes more than {MAX_EXPANSION} prompts", "use --random N to draw N of them")
    return prompts


# ---------------------------------------------------------------- entries -> jobs (through each command's own options)


def command_group():
    """The click group behind the Typer app (built once: it is the same for every line)."""
    import typer.main

    from diffcli.cli import app

    return typer.main.get_command(app)


def job_keys(command) -> dict[str, object]:
    """Every key a batch line may use for this command -> its click parameter."""
    keys = {}
    for param in command.params:
        if param.name in PER_RUN_KEYS or param.name in TRUST_KEYS:
            continue
        keys[param.name] = param
        keys[param.name.replace("_", "-")] = param
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:]] = param
                keys[opt[2:].replace("-", "_")] = param
    return keys


def to_argv(command, values: dict, where: str) -> list[str]:
    """Parameter values -> the command-line tokens that would set them (booleans as flags)."""
    options, arguments = [], []
    for param in command.params:
        if param.name not in values or values[param.name] is None:
            continue
        value = values[param.name]
        if param.param_type_name == "argument":
            arguments.append(_text(value, param, where))
            continue
        long = next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            on = _boolean(value, long, where)
            if on:
                options.append(long)
            elif param.secondary_opts:
                options.append(param.secondary_opts[0])
            continue
        items = value if isinstance(value, (list, tuple)) and param.multiple else [value]
        if isinstance(value, (list, tuple, dict)) and not param.multiple and not _is_text(param):
            raise UsageError(f"{where}: {long} takes one value, got {json.dumps(value)[:80]}")
        for item in items:
            text = _text(item, param, where)
            options.append(f"{long}={text}" if long.startswith("--") else long)
            if not long.startswith("--"):
                options.append(text)
    return options + (["--", *arguments] if arguments else [])


def _is_text(param) -> bool:
    """Whether a command's parameter takes text (str, or a list of str): a prompt, a path, a name."""
    import typing

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:  # a click parameter without Typer's type descriptor
        return type(getattr(param, "type", None)).__name__ == "StringParamType"
    return annotation is str or typing.get_args(annotation) == (str,)


def _text(value, param, where: str) -> str:
    """One jobs-file value as command-line text. Objects and lists are never stringified, and a text parameter
    (prompt, negative, paths, names) takes only a string: `"prompt": 5` is refused, not made "5"."""
    if isinstance(value, str):
        return value
    if _is_text(param) or isinstance(value, (dict, list, tuple)):
        raise UsageError(f"{where}: {param.name} must be a string, got {json.dumps(value)[:80]}")
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _boolean(value, flag: str, where: str) -> bool:
    """JSON booleans, and CSV/text spellings of them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise UsageError(f"{where}: {flag} must be true or false, got {value!r}")


def jobs_from_command(group, name: str, tokens: list[str], where: str) -> list[Job]:
    """Parse tokens with the command's own options and run its body with run_jobs collecting the Jobs."""
    from typer.exceptions import TyperException

    from diffcli.cli import COLLECTING
    from diffcli.errors import DiffcliError

    command = group.commands[name]
    collected: list[Job] = []
    token = COLLECTING.set(collected)
    try:
        ctx = command.make_context(name, list(tokens))
        with ctx:
            command.invoke(ctx)
    except TyperException as exc:
        raise UsageError(f"{where}: {exc.format_message()}") from None
    except DiffcliError as exc:
        raise type(exc)(f"{where}: {exc.message}", exc.hint) from None
    finally:
        COLLECTING.reset(token)
    return collected


def build_jobs(entries: list[Entry], options: BatchOptions) -> list[tuple[Entry, Job]]:
    """Each entry through its command's parser; batch-line options are defaults a line overrides."""
    group = command_group()
    available = [name for name in TASKS if name in group.commands]
    result = []
    for entry in entries:
        where = f"line {entry.line}"
        values = dict(entry.values)
        name = values.pop("command", None) or values.pop("task", None) or options.command
        if name not in available:
            raise UsageError(f"{where}: command {name!r} cannot run in a batch", f"available: {', '.join(available)}")
        command = group.commands[name]
        keys = job_keys(command)
        merged = {key: value for key, value in options.defaults.items() if key in {p.name for p in command.params}}
        for key, value in values.items():
            if str(key).lstrip("-").replace("-", "_").lower() in TRUST_KEYS:
                raise UsageError(f"{where}: {key!r} cannot be set in a jobs file",
                                 "trust flags come from the command line only: pass --allow-pickle to batch itself")
            param = keys.get(str(key))
            if param is None:
                close = difflib.get_close_matches(str(key), [k for k in keys if "-" not in k], n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"keys for {name}: {', '.join(sorted(p for p in keys if '-' not in p))}"
                raise UsageError(f"{where}: unknown key {key!r}", hint)
            merged[param.name] = value
        if merged.get("out") == "-":
            raise UsageError(f"{where}: out '-' (stdout) is for single txt2img runs, not batches")
        jobs = jobs_from_command(group, name, [*options.extra_args, *to_argv(command, merged, where)], where)
        for job in jobs:
            if "out" not in merged:
                job.out = None  # the batch decides (its --out, else $DIFFCLI_OUTPUT, else outputs/)
            result.append((entry, job))
    return result


# ---------------------------------------------------------------- seeds, paths, plans, ids


def batch_out(out: str | None) -> str:
    """The batch-level --out as a template (a file name would give every job the same name)."""
    out = out or os.environ.get("DIFFCLI_OUTPUT") or "outputs"
    if out == "-":
        raise UsageError("batch --out - (stdout, also from DIFFCLI_OUTPUT=-): a batch writes many images, each to a file",
                         "give a folder, or a template such as 'runs/{job:05d}-{seed}.png'")
    if "{" in out:
        return out
    if out.endswith(("/", os.sep)) or Path(out).is_dir() or not Path(out).suffix:
        return str(Path(out) / BATCH_TEMPLATE)
    raise UsageError(f"batch --out {out!r} names one file, but a batch makes many",
                     "give a folder, or a template such as 'runs/{job:05d}-{seed}.png'")


def job_out(out: str, number: int, line: int) -> str:
    """A job's --out with the batch fields {job}, {line} and {index} (= {job}) filled in."""
    if "{" not in out and (out.endswith(("/", os.sep)) or Path(out).is_dir() or not Path(out).suffix):
        out = str(Path(out) / BATCH_TEMPLATE)

    def fill(match: re.Match) -> str:
        value = line if match.group(1) == "line" else number
        try:
            return format(value, (match.group(3) or ":")[1:])
        except ValueError as exc:
            raise UsageError(f"--out {out!r}: {exc}") from None

    return BATCH_FIELDS.sub(fill, out)


def output_folder(template: str) -> Path:
    """The fixed folder part of a template: where the manifest lives by default."""
    head = template.split("{", 1)[0]
    return Path(head) if head.endswith(("/", os.sep)) else Path(head).parent


def plan_batch(pairs: list[tuple[Entry, Job]], base_seed: int, out: str) -> list[BatchJob]:
    """Seeds `base + images before`, stable paths, plans (no weights) and ids; clashes are errors."""
    from diffcli.generate import plan_job

    batch, owners, position, line_seeds, drawn = [], {}, 0, {}, {}
    for number, (entry, job) in enumerate(pairs):
        where = f"line {entry.line}"
        from_base = job.seed is None or job.seed == RANDOM_SEED
        if job.seed == RANDOM_SEED:  # "seed": -1: random, yet drawn from the base seed and the line's first job so a
            if id(entry) not in drawn:  # rerun resumes; a line's cells share it, as --seed -1 on the command line
                drawn[id(entry)] = random_module.Random(f"{base_seed}:{number}").randrange(2**32)
                position += job.num_images
            job.seed = drawn[id(entry)]
        elif job.seed is None and id(entry) in line_seeds:  # the cells of one line's sweep share its seed, as on the command line
            job.seed = line_seeds[id(entry)]
        else:
            if job.seed is None:
                job.seed = line_seeds[id(entry)] = base_seed + position
            position += job.num_images
        job.out = job_out(job.out or out, number, entry.line)
        wanted = job.overwrite
        try:
            plan = plan_job(replace(job, overwrite=True))  # existing files are judged below, with the manifest
        except UsageError as exc:
            raise type(exc)(f"{where}: {exc.message}", exc.hint) from None
        plan.job.overwrite = wanted
        for path in plan.paths:
            if path in owners:
                raise UsageError(f"{where}: writes {path}, as line {owners[path]} does",
                                 "put {job} or {seed} in --out so every image has its own name")
            owners[path] = entry.line
        batch.append(BatchJob(number, entry.line, plan, [identity.image_id(plan.identity, seed) for seed in plan.seeds],
                              from_base=from_base))
    return batch


# ---------------------------------------------------------------- manifest


class Manifest:
    """JSON Lines of finished images; appends are one O_APPEND write each, so ranks never collide."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[dict]:
        """Every readable record (a line cut short by a crash is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # cut short, or not ours
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def finished(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.records() if "id" in r and "path" in r}

    def base_seed(self) -> int | None:
        return next((r["base_seed"] for r in self.records() if isinstance(r.get("base_seed"), int)), None)

    def check(self, flag: str, writing: bool) -> None:
        """Refuse, before any model loads, a manifest that cannot be read or (`writing`) written: a folder, a file
        in the way of its folder, a read-only place. `flag` names where its path came from."""
        check_path(flag, self.path)
        if self.path.is_dir():
            raise UsageError(f"{flag}: the manifest {self.path} is a folder, not a file", f"e.g. {self.path / MANIFEST_NAME}")
        if self.path.exists() and not self.path.is_file():
            raise UsageError(f"{flag}: the manifest {self.path} is not a regular file")
        try:
            self.records()
        except OSError as exc:
            raise UsageError(f"{flag}: cannot read the manifest {self.path}: {exc.strerror or exc}") from None
        if not writing:
            return
        place = self.path
        while not place.exists() and place != place.parent:  # the nearest part of its path that exists
            place = place.parent
        if place != self.path and not place.is_dir():
            raise UsageError(f"{flag}: cannot create the manifest {self.path}: {place} is a file, not a folder")
        if not os.access(place, os.W_OK):
            raise UsageError(f"{flag}: the manifest {self.path} is not writable"
                             + ("" if place == self.path else f" (folder {place} is not writable)"),
                             "choose another --manifest, or fix the permissions")

    def append(self, record: dict) -> None:
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise RuntimeFailure(f"cannot write the manifest {self.path}: {exc.strerror or exc}",
                                 "check free space and permissions") from None


def resolve_base_seed(options: BatchOptions, manifest: Manifest) -> tuple[int, str]:
    """--seed, else the one recorded by the first run, else a fresh draw (recorded once jobs are valid)."""
    recorded = manifest.base_seed()
    if options.seed is not None:
        return options.seed, "--seed"
    if recorded is not None:
        return recorded, f"recorded in {manifest.path}"
    return draw_seed(), DRAWN


def record_base_seed(manifest: Manifest, base: int) -> None:
    """The first real run writes its base seed, so that reruns without --seed resolve to the same jobs."""
    if manifest.base_seed() is None:
        manifest.append({"base_seed": base, "time": _now()})


def mark_finished(batch: list[BatchJob], manifest: Manifest, force: bool, notify) -> None:
    """Decide each image's fate: done (its id in the manifest, file present), adopted (the file's own id is the one
    these settings give: saved, then stopped before recording), or to make."""
    finished = {} if force else manifest.finished()
    ours = {r["path"] for r in manifest.finished().values()}
    for item in batch:
        plan = item.plan
        for index, (seed, path, image) in enumerate(zip(plan.seeds, plan.paths, item.ids)):
            if image in finished and path.is_file():
                continue
            if path.exists() and not plan.job.overwrite:
                if force and str(path) in ours:
                    plan.job.overwrite = True  # --force remakes our own earlier output
                elif not force and _image_id_of(path) == image:
                    manifest.append(_record(item, image, path, seed, adopted=True))  # saved, then stopped before recording
                    notify(f"{path}: already made by an interrupted run; recorded it")
                    continue
                elif str(path) in ours or _image_id_of(path):
                    raise UsageError(f"{item.where}: {path} was made with other settings than this run's",
                                     "pass --force (or --overwrite) to make it again, or choose another --out")
                else:
                    raise UsageError(f"{item.where}: {path} already exists and is not in the manifest {manifest.path}",
                                     "pass --overwrite to replace it, or choose another --out")
            item.pending.append(index)


def _image_id_of(path: Path) -> str | None:
    """The id recorded in an image diffcli wrote (identity.image_id), or None for any other file."""
    from diffcli.output import read_metadata

    try:
        return read_metadata(path).get("id")
    except Exception:  # noqa: BLE001 - not an image of ours, or unreadable: it has no id
        return None


def _record(item: BatchJob, image: str, path: Path, seed: int, adopted: bool = False, rank: int = 0) -> dict:
    record = {"id": image, "path": str(path), "seed": seed, "job": item.number, "line": item.line,
              "prompt": item.plan.job.prompt, "time": _now(), "rank": rank}
    return dict(record, adopted=True) if adopted else record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------- processes


@dataclass
class Ranks:
    """Where this process stands in a launch: rank, world size, local rank (for cuda:N)."""

    rank: int = 0
    world: int = 1
    local: int = 0
    state: object = None

    def broadcast(self, value):
        """Rank 0's value on every rank (the base seed), over the process group."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def ranks_from_env() -> Ranks:
    """PartialState when launched by accelerate/torchrun/--processes (WORLD_SIZE > 1), else one rank.

    Without CUDA, PartialState(cpu=True) is what makes the processes form a gloo group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import warnings

    import torch
    from accelerate import PartialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate's OMP_NUM_THREADS notice
        state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(state.process_index, state.num_processes, state.local_process_index, state)


def spawn(processes: int, argv: list[str], quiet: bool, threads: int | None = None) -> int:
    """Start `processes` local ranks of `diffcli batch` (env:// rendezvous, as torchrun would) and wait; each gets
    --threads (in `argv` too) or, unless OMP_NUM_THREADS is set, its share of the cores."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    share = str(max(1, (os.cpu_count() or 1) // processes))
    children = []
    for rank in range(processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                   LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("OMP_NUM_THREADS", share)
        env["DIFFCLI_BATCH_SPAWNED"] = "1"  # the parent already printed the summary
        # A session of their own: a terminal's Ctrl-C reaches only us, and we pass it on once.
        children.append(subprocess.Popen([sys.executable, "-m", "diffcli", "batch", *argv], env=env, start_new_session=True))

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [code for code in codes if code != 0]
    if not failed:
        return 0
    return EXIT_INTERRUPTED if EXIT_INTERRUPTED in failed else failed[0] if failed[0] > 0 else 1


# ---------------------------------------------------------------- the run


class StopOnSignal:
    """First Ctrl-C: finish the current image, record it, then stop (exit 130). Second: abandon it."""

    def __init__(self, notify):
        self.notify = notify
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.notify("interrupt: finishing the current image (Ctrl-C again to abandon it)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def prepare(options: BatchOptions, ranks: Ranks, text: str | None = None) -> tuple[list[BatchJob], Manifest, int, str]:
    """Everything up to the plans and ids, identical on every rank; loads no weights. `text`: the jobs, read already."""
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
    base, how = resolve_base_seed(options, manifest) if ranks.rank == 0 else (None, "")
    base = ranks.broadcast(base)  # every rank must derive the same seeds, hence the same ids
    entries = expand_templates(entries, options.wildcards, options.random, base)
    batch = plan_batch(build_jobs(entries, options), base, out)
    return batch, manifest, base, how


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
                return spawn(options.processes, argv_for_children(base, options.source), options.quiet,
                             options.defaults.get("threads"))
            source = _stdin_to_file(options, stdin, manifest)
            try:
                return spawn(options.processes, argv_for_children(base, str(source)), options.quiet,
                             options.defaults.get("threads"))
            finally:
                source.unlink(missing_ok=True)
        return run_share(batch, manifest, ranks, options, say)
    finally:
        ranks.close()


def _mark_dry(batch: list[BatchJob], manifest: Manifest, force: bool) -> None:
    finished = {} if force else manifest.finished()
    for item in batch:
        item.pending = [i for i, (image, path) in enumerate(zip(item.ids, item.plan.paths)) if not (image in finished and path.is_file())]


def dry_record(item: BatchJob, seed_unknown: bool = False) -> dict:
    """What --dry-run prints per job: enough to see every seed, path and id before any compute. `seed_unknown`: the
    seeds come from a base seed the real run draws, so seeds, ids and names with {seed} are null ("drawn at run time")."""
    plan, job = item.plan, item.plan.job
    paths = None if seed_unknown and "{seed" in plan.name_template else [str(p) for p in plan.paths]
    return {"job": item.number, "line": item.line, "command": job.task, "prompt": job.prompt, "negative": job.negative,
            "seeds": None if seed_unknown else plan.seeds, "paths": paths, "ids": None if seed_unknown else item.ids,
            **({"seed": "drawn at run time"} if seed_unknown else {}),
            "done": [i not in item.pending for i in range(len(item.ids))], "model": plan.spec.name,
            "width": plan.width, "height": plan.height, "steps": job.steps, "cfg": plan.cfg,
            "scheduler": plan.scheduler, **({"extra": identity.stable(job.extra)} if job.extra else {})}


def run_share(batch: list[BatchJob], manifest: Manifest, ranks: Ranks, options: BatchOptions, say) -> int:
    """Run this rank's jobs (i % world == rank), recording each saved image; Ctrl-C stops cleanly."""
    from diffcli.generate import run_plans
    from diffcli.output import interrupt_pending

    mine = [item for item in batch if item.number % ranks.world == ranks.rank and item.pending]
    if ranks.world > 1:
        say(f"rank {ranks.rank}/{ranks.world}: {sum(len(i.pending) for i in mine)} image(s) to make")
        _own_device(mine, ranks)
    made = 0
    with StopOnSignal(say) as stop:
        for group in share_calls(mine):
            if stop.requested:
                break
            for item in group:  # size and tiling decisions the line did not spell out, what the model was not trained for
                for note in ("resized", "tiling"):
                    if note in item.plan.job.extra:
                        say(f"{item.where}: {item.plan.job.extra[note]}")
                for warning in item.plan.warnings:
                    say(f"{item.where}: {warning}")
            parts = [replace(item.plan, seeds=[item.plan.seeds[i] for i in item.pending],
                             paths=[item.plan.paths[i] for i in item.pending]) for item in group]
            by_path = {item.plan.paths[i]: (item, i) for item in group for i in item.pending}

            def on_image(record: dict, by_path=by_path) -> None:
                nonlocal made
                item, index = by_path[Path(record["path"])]
                image = item.ids[index]
                manifest.append(_record(item, image, Path(record["path"]), record["seed"], rank=ranks.rank))
                made += 1
                record = dict(record, id=image, job=item.number, line=item.line, index=index)
                emit_line(json.dumps(record, sort_keys=True) if options.as_json else record["path"])
                if stop.requested or interrupt_pending():  # pending: Ctrl-C came while this image was written
                    raise Interrupted(f"interrupted: {made} image(s) made and recorded in {manifest.path}; "
                                      "run the same command again to make the rest")

            run_plans(parts, on_image, progress=not options.quiet and sys.stderr.isatty(), notify=say)
    if stop.requested:
        raise Interrupted(f"interrupted: {made} image(s) made and recorded in {manifest.path}; "
                          "run the same command again to make the rest")
    say(f"batch: made {made} image(s)" + (f" on rank {ranks.rank}" if ranks.world > 1 else ""))
    return 0


def share_calls(items: list[BatchJob]) -> list[list[BatchJob]]:
    """Jobs whose images can share pipeline calls (same settings but prompt and seed), grouped in order of
    first appearance; every other job alone."""
    from diffcli.generate import shared_call_key

    groups: dict = {}
    for item in items:
        key = shared_call_key(item.plan)
        groups.setdefault(key if key is not None else id(item), []).append(item)
    return list(groups.values())


def _own_device(items: list[BatchJob], ranks: Ranks) -> None:
    """Each rank on its own GPU (cuda:local_rank) unless a job names a device index itself."""
    import torch

    if not torch.cuda.is_available():
        return
    for item in items:
        if item.plan.job.device in ("auto", "cuda"):
            item.plan.job.device = f"cuda:{ranks.local % torch.cuda.device_count()}"


def _stdin_to_file(options: BatchOptions, text: str, manifest: Manifest) -> Path:
    """Child processes cannot share our stdin: keep its jobs in a file of this run's own beside the manifest
    (written atomically, never over an existing file; the extension tells the children its format)."""
    from diffcli.output import write_atomic

    suffix = {"text": "txt", "jsonl": "jsonl", "csv": "csv"}[detect_format("-", options.fmt, text)]
    path = manifest.path.parent / f"diffcli-stdin-jobs-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.{suffix}"
    write_atomic(path, text.encode("utf-8"), overwrite=False)
    return path


def children_argv(ctx, base: int, source: str) -> list[str]:
    """The batch command line again for --processes ranks: same options, the resolved base seed, one process."""
    params = {name: value for name, value in ctx.params.items() if name not in ("file", "processes")}
    params["seed"] = base
    return [*to_argv(ctx.command, params, "batch"), *ctx.args, "--", source]
