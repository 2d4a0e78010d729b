"""Per-image seconds of the bundled tiny-shapes model for OpenMP wait policy x CPU threads, idle and with one
CPU-bound competitor (in a session of its own), the configurations interleaved image by image so that they share
whatever else the machine is doing (docs/performance.md, "CPU threads under load").

Usage: python scripts/bench_cpu_wait.py [--steps 8] [--repeats 10]
Two worker processes load the model: one with libgomp's default wait (spin about 3 ms, then sleep), one with
OMP_WAIT_POLICY=PASSIVE. Prints one line per configuration, then a JSON line of medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "diffcli" / "bundled" / "tiny-shapes"
CONFIGS = [("spin", 2), ("passive", 2), ("passive", 1)]  # (wait policy, threads); spin at 1 thread waits on no one
WORKER = """
import sys, time, torch, diffusers
pipe = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
kw = dict(prompt="a small yellow triangle to the left of a big purple cross on white", num_inference_steps=int(sys.argv[2]),
          guidance_scale=3.0, width=128, height=128)
pipe(**kw)
print("ready", flush=True)
for line in sys.stdin:
    torch.set_num_threads(int(line))
    start = time.perf_counter()
    pipe(**kw, generator=torch.Generator().manual_seed(0))
    print(time.perf_counter() - start, flush=True)
"""


def main():
    """Start the workers, then time every configuration in turn, idle and contended."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    workers = {policy: subprocess.Popen([sys.executable, "-c", WORKER, str(MODEL), str(a.steps)], text=True,
                                        env=dict(base, OMP_WAIT_POLICY="PASSIVE") if policy == "passive" else base,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
               for policy in ("spin", "passive")}
    times: dict[str, list[float]] = {}
    try:
        for worker in workers.values():
            assert worker.stdout.readline().strip() == "ready"
        for state in ("idle", "contended"):
            competitor = (subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                          if state == "contended" else None)
            time.sleep(0.5)
            try:
                for i in range(a.repeats):
                    for policy, threads in CONFIGS:
                        if policy == "spin" and state == "contended" and i >= max(2, a.repeats // 3):
                            continue  # seconds per image under contention: a few are enough
                        workers[policy].stdin.write(f"{threads}\n")
                        workers[policy].stdin.flush()
                        times.setdefault(f"{state} {policy} {threads}", []).append(float(workers[policy].stdout.readline()))
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            print(f"{state}: load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", file=sys.stderr)
    finally:
        for worker in workers.values():
            worker.kill()
    for name, values in times.items():
        print(f"{name:22} median {statistics.median(values):.3f} s  n={len(values)}  {[round(v, 2) for v in values]}",
              file=sys.stderr)
    print(json.dumps({"steps": a.steps, **{name: round(statistics.median(v), 3) for name, v in times.items()}}))


if __name__ == "__main__":
    main()
