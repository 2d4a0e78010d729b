"""A shell loop against a warm server versus cold runs (issue: warm server): N `diffcli txt2img --server URL` calls
and N plain `diffcli txt2img` calls with the bundled model, each a new process as in a shell script; prints the median
seconds per call of both and their ratio, and checks that the server's image equals the local one.

    python scripts/bench_server.py --calls 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed(args: list[str], cwd: str) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffcli", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="the same --threads for server and cold runs")
    options = parser.parse_args()
    threads = ["--threads", str(options.threads)] if options.threads else []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as folder:
        server = subprocess.Popen([sys.executable, "-m", "diffcli", "serve", "--port", str(port), *threads],
                                  cwd=folder, stderr=subprocess.DEVNULL)
        try:
            for _ in range(1200):
                try:
                    urllib.request.urlopen(url + "/diffcli/v1/health", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            prompt = ["txt2img", "a red circle on a blue background"]
            warm = [timed([*prompt, "--seed", str(i), "--server", url, "-o", f"warm-{i}.png", "-q"], folder)
                    for i in range(options.calls)]
            cold = [timed([*prompt, "--seed", str(i), *threads, "-o", f"cold-{i}.png", "-q"], folder)
                    for i in range(options.calls)]
        finally:
            server.terminate()
            server.wait(60)
        same = all(np.array_equal(np.asarray(Image.open(Path(folder) / f"warm-{i}.png")),
                                  np.asarray(Image.open(Path(folder) / f"cold-{i}.png"))) for i in range(options.calls))
        differences = max(int(np.abs(np.asarray(Image.open(Path(folder) / f"warm-{i}.png"), dtype=np.int16)
                                     - np.asarray(Image.open(Path(folder) / f"cold-{i}.png"), dtype=np.int16)).max())
                          for i in range(options.calls))
    print(f"cpu: {os.cpu_count()} cores, threads {options.threads or 'default'}")
    print(f"warm (--server), median of {options.calls}: {statistics.median(warm):.2f} s/call  (all: "
          f"{', '.join(f'{t:.2f}' for t in warm)})")
    print(f"cold, median of {options.calls}:            {statistics.median(cold):.2f} s/call  (all: "
          f"{', '.join(f'{t:.2f}' for t in cold)})")
    print(f"ratio cold/warm: {statistics.median(cold) / statistics.median(warm):.1f}x; images pixel-identical: {same} "
          f"(max difference {differences}/255)")


if __name__ == "__main__":
    main()
