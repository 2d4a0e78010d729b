"""What a run shows the person watching: the model-loading line (or spinner) and the step bar, both on stderr."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable


@contextmanager
def loading(name: str, loading: bool, progress: bool, notify: Callable[[str], None]):
    """Say that a model is loading (7-10 s on 2 CPU cores) and how long it took: a spinner when stderr is a terminal
    (`progress`), else the two lines "loading model NAME..." and "loaded in X.Xs"; nothing when it is loaded already."""
    if not loading:
        yield
        return
    began = time.perf_counter()
    if progress:
        from rich.console import Console

        with Console(file=sys.stderr).status(f"loading model {name}..."):
            yield
        notify(f"loading model {name}... loaded in {time.perf_counter() - began:.1f}s")
        return
    notify(f"loading model {name}...")
    yield
    notify(f"loaded in {time.perf_counter() - began:.1f}s")


def step_bar(steps: int):
    """A rich progress bar on stderr (only used when stderr is a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("steps"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                   console=Console(file=sys.stderr), transient=True)
    bar.add_task("steps", total=steps)
    return bar
