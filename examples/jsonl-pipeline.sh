#!/usr/bin/env bash
# jq builds JSON Lines jobs from a prompts file, `diffcli batch -` reads them on stdin and prints one
# JSON line per finished image, and jq turns those into a seed/path table. Rerunning skips the
# images already made (the manifest in OUT remembers them) and prints nothing for them.
# Usage: examples/jsonl-pipeline.sh [PROMPTS] [OUT]    env: DIFFCLI_MODEL, STEPS (default: the model's own); needs jq
set -euo pipefail
# diffcli from PATH, else this checkout's .venv (no need to activate it)
diffcli=${DIFFCLI:-$(command -v diffcli || echo "$(dirname "$0")/../.venv/bin/diffcli")}
prompts=${1:-"$(dirname "$0")/prompts.txt"}
out=${2:-pipeline-out}
jq -Rc 'select(test("^\\s*(#|$)") | not) | {prompt: ., negative: "blurry", cfg: 6.5}' "$prompts" \
    | "$diffcli" batch - --json --seed 100 ${STEPS:+--steps "$STEPS"} -o "$out/" --quiet \
    | jq -r '[.seed, .cfg, .path] | @tsv' \
    | tee -a "$out-index.tsv"
