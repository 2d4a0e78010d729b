"""Sweeps: comma lists for --cfg/--steps/--seed/--scheduler (and --prompt-sr) become one Job per combination, and an
X/Y grid.

Every combination is an ordinary Job, run one after the other on the model loaded once; `--grid`
pastes the images into one labelled contact sheet (A1111's X/Y plot) after they are all saved.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from pathlib import Path

import typer

from diffcli.errors import UsageError
from diffcli.options import MAX_IMAGES

AXES = ("prompt_sr", "cfg", "steps", "scheduler", "seed")  # grid axes in this order: the first that varies is X


class Values(tuple):
    """The values of one swept option (one value when no comma was given)."""


def _parser(flag: str, kind, what: str):
    """A Typer parser for one value or a comma list; a bad item names the flag and the item (exit 2)."""

    def parse(text) -> Values:
        if isinstance(text, Values):
            return text
        items = [item.strip() for item in str(text).split(",")]
        values = []
        for item in items:
            try:
                values.append(kind(item))
            except ValueError:
                raise typer.BadParameter(f"{item!r} is not {what}", param_hint=f"'{flag}'") from None
        return Values(values)

    return parse


def _integer(text: str) -> int:
    """An integer, also written 20.0 or 1e3, never 2.5."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


def _float(text: str) -> float:
    """A finite number."""
    value = float(text)
    if value != value or abs(value) == float("inf"):
        raise ValueError(text)
    return value


def _name(text: str) -> str:
    if not text:
        raise ValueError(text)
    return text


parse_cfg = _parser("--cfg", _float, "a number")
parse_steps = _parser("--steps", _integer, "an integer")
parse_seed = _parser("--seed", _integer, "an integer")
parse_scheduler = _parser("--scheduler", _name, "a scheduler name")


def parse_prompt_sr(text) -> Values:
    """--prompt-sr 'red,green,"blue, dark"': the word to replace, then its replacements, read as one CSV row as
    A1111's Prompt S/R reads it (quotes keep commas; items stripped; an empty replacement removes the word)."""
    if isinstance(text, Values):
        return text
    items = [item.strip() for row in csv.reader(io.StringIO(str(text)), skipinitialspace=True) for item in row]
    if not items or not items[0]:
        raise typer.BadParameter(f"{str(text)!r}: the first item is the text to replace and cannot be empty",
                                 param_hint="'--prompt-sr'")
    return Values(items)


def expand(job, cfg=None, steps=None, seed=None, scheduler=None, prompt_sr=None) -> list:
    """One jobs.Job per combination of the swept values (cartesian product, the prompt S/R varying slowest, then cfg); at
    most MAX_IMAGES images in all, counted before any Job is made."""
    axes = {"cfg": cfg, "steps": steps, "scheduler": scheduler, "seed": seed}
    lists = {key: list(values) if values else [getattr(job.sampling, key)] for key, values in axes.items()}
    words = list(prompt_sr) if prompt_sr else [None]
    if prompt_sr and words[0] not in job.prompt.text and words[0] not in job.prompt.negative:  # A1111 looks in both
        raise UsageError(f"--prompt-sr: {words[0]!r} is not in the prompt", "the first item is the text each later item replaces")
    count = job.sampling.num_images
    lists_counted = dict(lists, prompt_sr=words)
    combinations = math.prod(len(values) for values in lists_counted.values())
    if combinations * max(count, 1) > MAX_IMAGES:
        if combinations == 1:
            raise UsageError(f"--num-images must be at most {MAX_IMAGES}, got {count}", "run several commands")
        swept = " x ".join(f"{len(values)} {key}" for key, values in lists_counted.items() if len(values) > 1)
        raise UsageError(f"the sweep makes {combinations} combinations ({swept}) x --num-images {count} = "
                         f"{combinations * count} images, over the limit of {MAX_IMAGES}",
                         "sweep fewer values, or run several commands")
    jobs = [job.copy(**dict(zip(lists, combo))) for combo in itertools.product(*lists.values())]
    if prompt_sr is None:
        return jobs
    return [prompt_replaced(each, words[0], word) for word in words for each in jobs]


def prompt_replaced(job, search: str, word: str):
    """A copy of `job` with `search` replaced by `word` in its prompt and negative prompt (A1111's Prompt S/R); the
    replacement is kept as `prompt_sr`, the grid's label and a metadata field."""
    copy = job.copy(prompt_sr=word)
    copy.prompt.text, copy.prompt.negative = job.prompt.text.replace(search, word), job.prompt.negative.replace(search, word)
    return copy


def grid_layout(records: list[dict]) -> tuple[str | None, list[str], list, list]:
    """(X key, Y keys, X values, Y value tuples) from the records; keys that never vary are left out."""
    distinct = {key: list(dict.fromkeys(r.get(key) for r in records)) for key in AXES}
    varying = [key for key in AXES if len(distinct[key]) > 1]
    x_key, y_keys = (varying[0], varying[1:]) if varying else (None, [])
    x_values = distinct[x_key] if x_key else [None]
    y_values = list(dict.fromkeys(tuple(r.get(k) for k in y_keys) for r in records))
    return x_key, y_keys, x_values, y_values


def label(key: str | None, value) -> str:
    """'cfg 7.5', 'steps 20', 'seed 3', or the scheduler's name or the prompt S/R's word."""
    if key is None:
        return ""
    if key == "cfg":
        return f"cfg {value:g}"
    return str(value) if key in ("scheduler", "prompt_sr") else f"{key} {value}"


def write_grid(records: list[dict], overwrite: bool = False) -> dict:
    """Paste the images into an X/Y contact sheet with axis labels; returns its record (path, axes)."""
    import io

    from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

    from diffcli import output

    x_key, y_keys, x_values, y_values = grid_layout(records)
    images = {(r.get(x_key) if x_key else None, tuple(r.get(k) for k in y_keys)): r["path"] for r in records}
    font = ImageFont.load_default(size=12)
    sizes = []
    for record in records:  # each header read once, each file closed
        with Image.open(record["path"]) as image:
            sizes.append(image.size)
    cell_w, cell_h = max(w for w, _ in sizes), max(h for _, h in sizes)
    pad = 6

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = font.getbbox(text or " ")
        return right - left, bottom - top

    column_labels = [label(x_key, v) for v in x_values]
    row_labels = [", ".join(label(k, v) for k, v in zip(y_keys, values)) for values in y_values]
    column_w = max([cell_w] + [size(t)[0] + 2 * pad for t in column_labels])
    top = size("Ag")[1] + 2 * pad if x_key else 0
    left = max([size(t)[0] + 2 * pad for t in row_labels if t] or [0])
    sheet = Image.new("RGB", (left + column_w * len(x_values), top + cell_h * len(y_values)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(column_labels):
        draw.text((left + i * column_w + (column_w - size(text)[0]) // 2, pad), text, fill="black", font=font)
    for j, (values, text) in enumerate(zip(y_values, row_labels)):
        draw.text((pad, top + j * cell_h + (cell_h - size(text)[1]) // 2), text, fill="black", font=font)
        for i, value in enumerate(x_values):
            path = images.get((value, values))
            if path:
                with Image.open(path) as cell:
                    sheet.paste(cell.convert("RGB"), (left + i * column_w + (column_w - cell.width) // 2, top + j * cell_h))
    first = Path(records[0]["path"])
    path = first.with_name(f"grid-{first.stem}.png")
    number = 2
    while path.exists() and not overwrite:
        path, number = first.with_name(f"grid-{first.stem}-{number}.png"), number + 1
    record = {"grid": str(path), "x": x_key, "y": y_keys, "columns": column_labels, "rows": row_labels,
              "images": [r["path"] for r in records]}
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("diffcli", json.dumps(record, sort_keys=True))
    sheet.save(buffer, "PNG", pnginfo=info)
    output.write_atomic(path, buffer.getvalue(), overwrite)
    return record
