#!/usr/bin/env bash
# Continue training the bundled tiny-shapes base (UNet + text encoder, zero-terminal-SNR v-prediction) on the lent GPU
# (lab/NOTEBOOK.md) with the relation head and the text encoder anchored to the bundled one, which
# tiny-shapes-refiner reads; evaluate the pair on two seeds, run
# lab/relation_probe.py on it, and pack the new weights and sampler config into $OUT in parts under the device
# tool's 16 MiB file limit.
# Usage (device `run` with carry [".whl"]; make .whl with scripts/gpu_wheels.sh):
#   bash lab/gpu_train.sh MINUTES [more train flags, e.g. --lr 3e-4 --seed 5]
# Back here: cat weights.tar.part-* | tar -C diffcli/bundled/tiny-shapes -xf -   (then diffcli eval on the CPU)
set -uo pipefail
minutes=${1:?usage: bash lab/gpu_train.sh MINUTES [train flags]}
shift
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/diffcli-train-out}"
run="${RUN_DIR:-/tmp/tiny-shapes-run}"
mkdir -p "$OUT"
python3 -m lab.train --out "$run" --resume diffcli/bundled --stage unet --seed 3 --batch 512 --lr 5e-4 \
  --schedule zero-snr --relation-head 1.0 --anchor-text 10 --minutes "$minutes" "$@" > "$OUT/train.txt" 2>&1 \
  || { tail -n 20 "$OUT/train.txt"; exit 1; }
grep "unet step" "$OUT/train.txt" | tail -n 3
cp "$run/log_unet.json" "$OUT/"
for seed in 0 1; do
  python3 -m diffcli eval --model "$run/tiny-shapes" --n "${EVAL_N:-200}" --seed "$seed" \
    --refiner diffcli/bundled/tiny-shapes-refiner --refiner-start 0.5 2>/dev/null \
    | tee "$OUT/eval-seed$seed.json"
done
python3 -m lab.relation_probe "$run/tiny-shapes" 2>/dev/null | tee "$OUT/relation_probe.txt"
tar -C "$run/tiny-shapes" -cf - unet text_encoder scheduler | split -b 15m - "$OUT/weights.tar.part-"
ls -l "$OUT"
