"""Time one 128x128 image of the bundled tiny-shapes model on the CPU at its diffcli.json defaults (its refiner
included), through diffcli's own plan and run (model loading excluded, first image as warm-up).

Usage: python scripts/bench_bundled_cpu.py [--runs 5] [--threads 2] [--steps N]
Prints a JSON line with the median seconds per image.
"""

import argparse
import json
import statistics
import tempfile
import time

from diffcli.speed import set_passive_wait

set_passive_wait()  # as the diffcli command does, before torch loads OpenMP

from diffcli.jobs import build  # noqa: E402
from diffcli.plan import plan_job  # noqa: E402
from diffcli.run import images  # noqa: E402

PROMPT = "a small yellow triangle to the left of a big purple cross on white"


def main():
    """Plan once per seed, warm up (loads the model), then time `runs` generations."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        def plan(seed):
            return plan_job(build("txt2img", dict(prompt=PROMPT, seed=seed, steps=a.steps, device="cpu",
                                                  threads=a.threads, out=f"{folder}/x.png"))[0])

        first = plan(0)
        list(images([first]))
        times = []
        for seed in range(a.runs):
            each = plan(seed)
            t0 = time.perf_counter()
            list(images([each]))
            times.append(time.perf_counter() - t0)
    job = first.job
    print(json.dumps({"model": first.spec.name, "threads": a.threads, "steps": job.sampling.steps or first.spec.defaults.get("steps"),
                      "cfg": first.cfg, "scheduler": first.scheduler, "refiner": job.second.refiner,
                      "median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}))


if __name__ == "__main__":
    main()
