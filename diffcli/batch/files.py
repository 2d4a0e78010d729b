"""Reading a jobs file: its text (or stdin's), its format, one Entry per line, templates expanded."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from diffcli import extras
from diffcli.errors import UsageError, first_line
from diffcli.options import check_path

JOB_FORMATS = {".txt": "text", ".prompts": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
MAX_EXPANSION = 100_000  # one template line may not make more jobs than this (typo guard)
TEMPLATE_MARK = re.compile(r"\{[^{}]*\|[^{}]*\}|__[\w./*-]+__")
WILDCARD = re.compile(r"__([\w./*-]+)__")


@dataclass
class Entry:
    """One job as read from the file: its line number and its raw key/value settings."""

    line: int
    values: dict
    label: str = ""  # how messages name it; default "line N" (a server request says "request")

    @property
    def where(self) -> str:
        return self.label or f"line {self.line}"



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
    by_suffix = JOB_FORMATS.get(Path(source).suffix.lower()) if source != "-" else None
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
            extras.require("dynamicprompts", f"line {entry.line}: the prompt template ({{a|b}} or __name__)")
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


