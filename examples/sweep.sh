#!/usr/bin/env bash
# A cfg x steps sweep of one prompt at one seed: comma lists run every combination with the model
# loaded once, names say which is which, and --grid writes a labelled contact sheet (grid-*.png).
# A rerun replaces the same images (--overwrite: the sweep is deterministic).
# Usage: examples/sweep.sh [PROMPT] [OUT]    env: DIFFCLI_MODEL, CFGS ("2,3,5"), STEPS_LIST ("8,14,20")
set -euo pipefail
# diffcli from PATH, else this checkout's .venv (no need to activate it)
diffcli=${DIFFCLI:-$(command -v diffcli || echo "$(dirname "$0")/../.venv/bin/diffcli")}
prompt=${1:-"a red circle on a blue background"}
out=${2:-sweep-out}
"$diffcli" txt2img "$prompt" --seed 42 --cfg "${CFGS:-2,3,5}" --steps "${STEPS_LIST:-8,14,20}" \
    -o "$out/cfg{cfg}-steps{steps}.png" --grid --overwrite --quiet
