"""Sweeps: comma lists for --cfg/--steps/--seed/--scheduler become one Job per combination, and an X/Y grid.

Every combination is an ordinary Job, run one after the other on the model loaded once; `--grid`
pastes the images into one labelled contact sheet (A1111's X/Y plot) after they are all saved.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import typer

from diffcli.options import Job

AXES = ("cfg", "steps", "scheduler", "seed")  # grid axes in this order: the first that varies is X


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


def expand(job: Job, cfg=None, steps=None, seed=None, scheduler=None) -> list[Job]:
    """One Job per combination of the swept values (cartesian product, cfg varying slowest)."""
    axes = {"cfg": cfg, "steps": steps, "scheduler": scheduler, "seed": seed}
    lists = {key: list(values) if values else [getattr(job, key)] for key, values in axes.items()}
    return [replace(job, extra=dict(job.extra), **dict(zip(lists, combo))) for combo in itertools.product(*lists.values())]


def grid_layout(records: list[dict]) -> tuple[str | None, list[str], list, list]:
    """(X key, Y keys, X values, Y value tuples) from the records; keys that never vary are left out."""
    distinct = {key: list(dict.fromkeys(r[key] for r in records)) for key in AXES}
    varying = [key for key in AXES if len(distinct[key]) > 1]
    x_key, y_keys = (varying[0], varying[1:]) if varying else (None, [])
    x_values = distinct[x_key] if x_key else [None]
    y_values = list(dict.fromkeys(tuple(r[k] for k in y_keys) for r in records))
    return x_key, y_keys, x_values, y_values


def label(key: str | None, value) -> str:
    """'cfg 7.5', 'steps 20', 'seed 3', or the scheduler's name."""
    if key is None:
        return ""
    if key == "cfg":
        return f"cfg {value:g}"
    return str(value) if key == "scheduler" else f"{key} {value}"


def write_grid(records: list[dict], overwrite: bool = False) -> dict:
    """Paste the images into an X/Y contact sheet with axis labels; returns its record (path, axes)."""
    import io

    from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

    from diffcli import output

    x_key, y_keys, x_values, y_values = grid_layout(records)
    images = {(r[x_key] if x_key else None, tuple(r[k] for k in y_keys)): r["path"] for r in records}
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
