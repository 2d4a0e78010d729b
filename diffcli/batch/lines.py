"""From entries to planned jobs: each line's values converted by its command's declared options (flags.COMMANDS) and
built by the one Job builder; stable seeds (base + images before) and paths ({job}); plans and image ids."""

from __future__ import annotations

import difflib
import os
import random as random_module  # (`random` is the --random option's name in the batch command)
import re
from dataclasses import dataclass, field
from pathlib import Path

from diffcli import declare, flags, identity, jobs
from diffcli.batch.files import Entry
from diffcli.errors import UsageError
from diffcli.jobs import Job
from diffcli.options import RANDOM_SEED

TASKS = ("txt2img", "img2img", "inpaint", "outpaint", "upscale", "edit")  # commands a batch line may name
PER_RUN_KEYS = {"threads"}  # one CPU thread pool per process: batch's --threads reaches every line, a line sets none
TRUST_KEYS = {"allow_pickle"}  # trust comes from the command line only, never from a jobs file
BATCH_TEMPLATE = "{job:05d}-{seed}-{slug}.png"  # stable across reruns, unlike {index} ("next free number")
BATCH_FIELDS = re.compile(r"\{(job|line|index)(![rsa])?(:[^{}]*)?\}")


@dataclass
class BatchJob:
    """A job of the batch with its plan, its place in the batch and the stable id of each image."""

    number: int  # position in the expanded batch (0-based): the {job} field and the shard key
    line: int  # line of the jobs file it came from (1-based)
    plan: object  # plan.Plan
    ids: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # indices of the images still to make
    from_base: bool = False  # its seeds derive from the base seed (the line gave none, or -1)

    @property
    def where(self) -> str:
        return f"line {self.line}"


def build_jobs(entries: list[Entry], command: str, defaults: dict, extra_args: list[str]) -> list[tuple[Entry, Job]]:
    """Each entry as Jobs of its command (the line's "command", else `command`): `defaults` (batch's own options
    given) first, then `extra_args` (flags after FILE), then the line's own values."""
    result, passed = [], {}
    for entry in entries:
        where = entry.where
        values = dict(entry.values)
        name = values.pop("command", None) or values.pop("task", None) or command
        if name not in TASKS:
            raise UsageError(f"{where}: command {name!r} cannot run in a batch", f"available: {', '.join(TASKS)}")
        options = {key: flag for key, flag in flags.COMMANDS[name].items() if key not in PER_RUN_KEYS}
        keys = declare.lookup(options)
        merged = {key: value for key, value in defaults.items() if key in flags.COMMANDS[name]}
        if name not in passed:
            passed[name] = declare.parse_tokens(extra_args, options, where)
        merged.update(passed[name])
        for key, value in values.items():
            if str(key).lstrip("-").replace("-", "_").lower() in TRUST_KEYS:
                raise UsageError(f"{where}: {key!r} cannot be set in a jobs file",
                                 "trust flags come from the command line only: pass --allow-pickle to batch itself")
            flag = keys.get(str(key))
            if flag is None:
                names = sorted(k for k in keys if "-" not in k and k not in TRUST_KEYS)
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"keys for {name}: {', '.join(names)}"
                raise UsageError(f"{where}: unknown key {key!r}", hint)
            merged[flag.name] = flag.convert(value, where)
        for flag in options.values():
            if not flag.flags and flag.default is None and merged.get(flag.name) is None:
                raise UsageError(f"{where}: Missing argument '{flag.name.upper()}'.")
        if merged.get("out") == "-":
            raise UsageError(f"{where}: out '-' (stdout) is for single txt2img runs, not batches")
        try:
            made = jobs.build(name, merged)
        except UsageError as exc:
            raise type(exc)(f"{where}: {exc.message}", exc.hint) from None
        for job in made:
            if "out" not in merged:
                job.output.out = None  # the batch decides (its --out, else $DIFFCLI_OUTPUT, else outputs/)
            result.append((entry, job))
    return result


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


def assign_seeds(pairs: list[tuple[Entry, Job]], base_seed: int, out: str) -> list[tuple[Entry, Job, bool]]:
    """Each job's seed (base + images before it; a line's sweep cells share one) and --out with {job} filled in: the
    half of planning that needs no model (a --server batch plans the rest on the server). The bool: from the base."""
    result, position, line_seeds, drawn = [], 0, {}, {}
    for number, (entry, job) in enumerate(pairs):
        sampling = job.sampling
        from_base = sampling.seed is None or sampling.seed == RANDOM_SEED
        if sampling.seed == RANDOM_SEED:  # "seed": -1: random, yet drawn from the base seed and the line's first job so a
            if id(entry) not in drawn:  # rerun resumes; a line's cells share it, as --seed -1 on the command line
                drawn[id(entry)] = random_module.Random(f"{base_seed}:{number}").randrange(2**32)
                position += sampling.num_images
            sampling.seed = drawn[id(entry)]
        elif sampling.seed is None and id(entry) in line_seeds:  # the cells of one line's sweep share its seed
            sampling.seed = line_seeds[id(entry)]
        else:
            if sampling.seed is None:
                sampling.seed = line_seeds[id(entry)] = base_seed + position
            position += sampling.num_images
        job.output.out = job_out(job.output.out or out, number, entry.line)
        result.append((entry, job, from_base))
    return result


def claim_paths(owners: dict, paths: list[Path], where: str, line: int) -> None:
    """No two jobs of a batch write the same file."""
    for path in paths:
        if path in owners:
            raise UsageError(f"{where}: writes {path}, as line {owners[path]} does",
                             "put {job} or {seed} in --out so every image has its own name")
        owners[path] = line


def plan_batch(pairs: list[tuple[Entry, Job]], base_seed: int, out: str) -> list[BatchJob]:
    """Seeds `base + images before`, stable paths, plans (no weights) and ids; clashes are errors."""
    from diffcli.plan import plan_job

    batch, owners = [], {}
    for number, (entry, job, from_base) in enumerate(assign_seeds(pairs, base_seed, out)):
        wanted = job.output.overwrite
        job.output.overwrite = True  # existing files are judged later, with the manifest
        try:
            plan = plan_job(job)
        except UsageError as exc:
            raise type(exc)(f"{entry.where}: {exc.message}", exc.hint) from None
        plan.job.output.overwrite = job.output.overwrite = wanted
        claim_paths(owners, plan.paths, entry.where, entry.line)
        batch.append(BatchJob(number, entry.line, plan, [identity.image_id(plan.identity, seed) for seed in plan.seeds],
                              from_base=from_base))
    return batch
