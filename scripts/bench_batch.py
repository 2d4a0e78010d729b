"""Batch throughput for 1 vs N processes and batch sizes: `diffcli batch --processes N --batch-size B` on a fixed job list.

Usage: python scripts/bench_batch.py [--model PATH] [--jobs 16] [--steps 10] [--repeats 3] [--processes 1,2] [--batch-sizes 1]
Without --model it builds the tiny test model (tests/conftest.py) in a temporary folder. Reports, per
process count, the median over repeats of: wall time of the whole command (process start, model
load, generation, saving) and images/s from it; and images/s of generation alone (the slowest rank's
summed generate+save seconds). Each repeat starts from an empty output folder with the same seeds; repeats of the
configurations are interleaved. With --batch-sizes 1,4 the different prompts' jobs share pipeline calls of 4 images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(folder: Path) -> Path:
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_pipeline  # noqa: E402  (the tests' tiny real SD components)

    build_tiny_pipeline(folder).save_pretrained(folder / "tiny-sd")
    return folder / "tiny-sd"


def run_once(model: str, jobs: Path, out: Path, processes: int, batch_size: int, steps: int) -> dict:
    command = [sys.executable, "-m", "diffcli", "batch", str(jobs), "--model", model, "--steps", str(steps), "--seed", "0",
               "--json", "--quiet", "-o", f"{out}/", "--processes", str(processes), "--batch-size", str(batch_size)]
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command)} failed:\n{result.stderr}")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    rank_of = {r["id"]: r["rank"] for r in map(json.loads, (out / "diffcli-manifest.jsonl").read_text().splitlines()) if "id" in r}
    busy = defaultdict(float)
    for record in records:
        busy[rank_of[record["id"]]] += record["timings"]["generate_s"] + record["timings"]["save_s"]
    return {"images": len(records), "wall_s": wall, "busy_s": max(busy.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--batch-sizes", default="1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffcli-bench-batch-") as tmp:
        folder = Path(tmp)
        model = args.model or str(tiny_model(folder))
        jobs = folder / "jobs.txt"
        jobs.write_text("".join(f"a shape number {i}\n" for i in range(args.jobs)))
        print(f"# diffcli batch: {args.jobs} jobs x 1 image, {args.steps} steps, model {Path(model).name}, "
              f"{os.cpu_count()} CPU cores, median of {args.repeats}")
        print(f"{'processes':>9} {'batch':>5} {'wall s':>8} {'images/s':>9} {'gen-only images/s':>18}")
        configs = [(int(n), int(b)) for n in args.processes.split(",") for b in args.batch_sizes.split(",")]
        results = {config: [] for config in configs}
        for repeat in range(args.repeats):  # interleaved, so a busy moment of the machine hits every config alike
            for n, b in configs:
                results[n, b].append(run_once(model, jobs, folder / f"out-{n}-{b}-{repeat}", n, b, args.steps))
        for (processes, batch_size), runs in results.items():
            assert all(r["images"] == args.jobs for r in runs)
            wall = statistics.median(r["wall_s"] for r in runs)
            busy = statistics.median(r["busy_s"] for r in runs)
            print(f"{processes:>9} {batch_size:>5} {wall:>8.2f} {args.jobs / wall:>9.3f} {args.jobs / busy:>18.3f}", flush=True)


if __name__ == "__main__":
    main()
