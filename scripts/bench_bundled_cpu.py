"""Time one 128x128 image of the bundled tiny-shapes model on 2 CPU threads at its diffcli.json defaults (its
refiner included).

Usage: python scripts/bench_bundled_cpu.py [--runs 5] [--threads 2] [--steps N]
Prints a JSON line with the median pipeline seconds (model loading excluded).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from diffcli.speed import set_passive_wait

set_passive_wait()  # as the diffcli command does, before torch loads OpenMP
import torch  # noqa: E402

from diffcli.shapes.evaluate import defaults, generate, load, load_refiner  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "diffcli" / "bundled" / "tiny-shapes"


def main():
    """Load once, warm up, then time `runs` generations."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = defaults(MODEL)
    steps = a.steps or d["steps"]
    pipe, expert = load(MODEL, d["scheduler"], "cpu"), load_refiner(MODEL, "cpu")
    run = lambda seed: generate(pipe, ["a small yellow triangle to the left of a big purple cross on white"],  # noqa: E731
                                [torch.Generator("cpu").manual_seed(seed)], steps, d["cfg"], expert)
    run(0)
    times = []
    for seed in range(a.runs):
        t0 = time.perf_counter()
        run(seed)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"model": MODEL.name, "threads": a.threads, "steps": steps, "cfg": d["cfg"],
                      "scheduler": d["scheduler"], "refiner": expert and expert["name"], "median_s": round(statistics.median(times), 3),
                      "runs_s": [round(t, 3) for t in times]}))


if __name__ == "__main__":
    main()
