#!/usr/bin/env bash
# The same batch over several processes: one per GPU (cuda:LOCAL_RANK), or CPU processes that form a
# gloo group when there is no GPU. Job i goes to rank i % NPROC; every job is made exactly once and
# all ranks append to one manifest. `diffcli batch JOBS --processes N` is the shortcut for one machine;
# for several machines see "Batch and scripts" in the README (accelerate config: num_machines, ...).
# Usage: examples/accelerate.sh [JOBS] [OUT]    env: DIFFCLI_MODEL, STEPS (default: the model's own), NPROC (default 2)
set -euo pipefail
# accelerate from PATH, else this checkout's .venv (no need to activate it)
accelerate=${ACCELERATE:-$(command -v accelerate || echo "$(dirname "$0")/../.venv/bin/accelerate")}
jobs=${1:-"$(dirname "$0")/prompts.txt"}
out=${2:-accelerate-out}
# --multi_gpu starts NPROC processes through torchrun even on a machine without CUDA
# (`--cpu --num_processes N` would start only one there).
"$accelerate" launch --multi_gpu --num_processes "${NPROC:-2}" --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m diffcli batch "$jobs" --seed 7 ${STEPS:+--steps "$STEPS"} -o "$out/" --json --quiet
