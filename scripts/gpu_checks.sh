#!/usr/bin/env bash
# GPU checks on the lent H100 (docs/performance.md): gpu-marked tests and `diffcli bench` runs.
# Run through the device tool from the repo root with carry [".whl"] (made by scripts/gpu_wheels.sh); results land
# in $OUT. A device command may run 600 s, so the steps go in two calls:
#   bash scripts/gpu_checks.sh sd15 second lowvram deepcache      (at most 480 s of benches)
#   bash scripts/gpu_checks.sh sdxl tests                         (at most 490 s)
#   bash scripts/gpu_checks.sh flux zimage                        (at most 390 s; sd35 qwen: 500 s)
set -uo pipefail
declare -A limit=([sd15]=200 [second]=90 [lowvram]=70 [deepcache]=120 [sdxl]=240 [tests]=250
                 [flux]=240 [sd35]=200 [qwen]=300 [zimage]=150)
total=0
for step in "$@"; do
  [ -n "${limit[$step]:-}" ] || { echo "unknown step $step (steps: ${!limit[*]})"; exit 2; }
  total=$((total + limit[$step]))
done
[ "$#" -gt 0 ] && [ "$total" -le 540 ] || { echo "name steps whose limits add up to at most 540 s (asked: $total s)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 DIFFCLI_HOME=/tmp/diffcli-home
OUT="${OUT:-/tmp/diffcli-gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
bench() { local name=$1; shift; timeout "${limit[$name]}" python3 -m diffcli bench "$@" --json 2>"$OUT/$name.err" | tee "$OUT/$name.json"; }
for step in "$@"; do
  case $step in
    tests) timeout "${limit[tests]}" python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/test_txt2img.py tests/test_bench.py 2>&1 | tee "$OUT/gpu-tests.txt" ;;
    sd15) bench sd15 --arch sd15 --compare plain --batch-sizes 1,4 --repeats 3 ;;
    second) bench second --arch sd15 --batch-sizes 1 --repeats 2 ;;
    lowvram) bench lowvram --arch sd15 --low-vram --batch-sizes 1 --repeats 2 ;;
    sdxl) bench sdxl --arch sdxl --compare plain --batch-sizes 1 --repeats 2 ;;
    deepcache) bench deepcache --arch sd15 --deep-cache 3 --no-optimize --batch-sizes 1 --repeats 2 ;;
    # the flow-matching families at full size (8-29 B parameters, bf16), fewer steps than their defaults to fit
    flux) bench flux --arch flux --compare plain --steps 8 --batch-sizes 1 --repeats 2 ;;
    sd35) bench sd35 --arch sd35 --compare plain --steps 8 --batch-sizes 1 --repeats 2 ;;
    qwen) bench qwen --arch qwen-image --compare plain --steps 6 --batch-sizes 1 --repeats 2 ;;
    zimage) bench zimage --arch z-image --compare plain --batch-sizes 1 --repeats 2 ;;
  esac
done
tail -n 3 "$OUT"/*.err 2>/dev/null
