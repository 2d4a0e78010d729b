#!/usr/bin/env bash
# GPU checks on the lent H100 (docs/performance.md): gpu-marked tests and `diffcli bench` runs.
# Run through the device tool from the repo root with `.whl` carried (wheels of diffusers, typer and
# their missing dependencies, downloaded as the device README explains); results land in $OUT.
# Usage: bash scripts/gpu_checks.sh [tests] [sd15] [second] [lowvram] [sdxl] [deepcache]   (default: all)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 DIFFCLI_HOME=/tmp/diffcli-home
OUT="${OUT:-/tmp/diffcli-gpu-out}"
mkdir -p "$OUT"
steps="${*:-sd15 second lowvram sdxl deepcache tests}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
bench() { local name=$1 limit=$2; shift 2; timeout "$limit" python3 -m diffcli bench "$@" --json 2>"$OUT/$name.err" | tee "$OUT/$name.json"; }
for step in $steps; do
  case $step in
    tests) timeout 100 python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/test_txt2img.py tests/test_bench.py 2>&1 | tee "$OUT/gpu-tests.txt" ;;
    sd15) bench sd15 200 --arch sd15 --compare plain --batch-sizes 1,4 --repeats 3 ;;
    second) bench sd15-second-process 90 --arch sd15 --batch-sizes 1 --repeats 2 ;;
    lowvram) bench sd15-low-vram 70 --arch sd15 --low-vram --batch-sizes 1 --repeats 2 ;;
    sdxl) bench sdxl 240 --arch sdxl --compare plain --batch-sizes 1 --repeats 2 ;;
    deepcache) bench sd15-deepcache 120 --arch sd15 --deep-cache 3 --no-optimize --batch-sizes 1 --repeats 2 ;;
  esac
done
tail -n 3 "$OUT"/*.err
