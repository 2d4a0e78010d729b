#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels the lent GPU machine lacks (Python 3.12 there; nothing downloads
# there), for `run` calls with carry [".whl"]. Run here, from the repo root: bash scripts/gpu_wheels.sh
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  diffusers==0.42.1 DeepCache==0.1.1 typer==0.29.2 pydantic==2.14.3 pydantic_core==2.50.4 typing-inspection==0.4.5 \
  annotated-types==0.8.0 typing_extensions==4.16.0 torchsde==0.2.6 trampoline==0.1.2
du -sh .whl
