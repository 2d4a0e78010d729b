"""The manifest: JSON Lines of finished images and the base seed, so that a rerun resumes instead of redoing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from diffcli.errors import RuntimeFailure, UsageError
from diffcli.options import check_path, draw_seed

MANIFEST_NAME = "diffcli-manifest.jsonl"
DRAWN = "drawn at random"  # how a base seed came about when neither --seed nor the manifest gave one


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

    def made(self) -> set[tuple[str, str]]:
        """(image id, path) of every image recorded: an id counts as done at its own path only (a line removed from
        a jobs file moves the next one onto another's path)."""
        return {(r["id"], r["path"]) for r in self.records() if "id" in r and "path" in r}

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


def resolve_base_seed(seed: int | None, manifest: Manifest) -> tuple[int, str]:
    """--seed, else the one recorded by the first run, else a fresh draw (recorded once jobs are valid)."""
    recorded = manifest.base_seed()
    if seed is not None:
        return seed, "--seed"
    if recorded is not None:
        return recorded, f"recorded in {manifest.path}"
    return draw_seed(), DRAWN


def record_base_seed(manifest: Manifest, base: int) -> None:
    """The first real run writes its base seed, so that reruns without --seed resolve to the same jobs."""
    if manifest.base_seed() is None:
        manifest.append({"base_seed": base, "time": _now()})


def mark_finished(batch: list, manifest: Manifest, force: bool, notify) -> None:
    """Decide each image's fate: done (its id recorded at its path, file present), adopted (the file's own id is the one
    these settings give: saved, then stopped before recording), or to make."""
    made = manifest.made()
    finished = set() if force else made
    ours = {path for _, path in made}
    for item in batch:
        plan = item.plan
        overwrite = plan.job.output.overwrite  # as asked: --force below lets the writes replace our own files only
        for index, (seed, path, image) in enumerate(zip(plan.seeds, plan.paths, item.ids)):
            if (image, str(path)) in finished and path.is_file():
                continue
            if path.exists() and not overwrite:
                if force and str(path) in ours:
                    plan.job.output.overwrite = True  # --force remakes our own earlier output
                elif not force and _image_id_of(path) == image:
                    manifest.append(record(item, image, path, seed, adopted=True))  # saved, then stopped before recording
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


def record(item, image: str, path: Path, seed: int, adopted: bool = False, rank: int = 0) -> dict:
    record = {"id": image, "path": str(path), "seed": seed, "job": item.number, "line": item.line,
              "prompt": item.plan.job.prompt.text, "time": _now(), "rank": rank}
    return dict(record, adopted=True) if adopted else record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


