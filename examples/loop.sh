#!/usr/bin/env bash
# A plain bash loop: one `diffcli txt2img` per line of a prompts file (one model load per line).
# `diffcli batch prompts.txt` does the same in one process; see jsonl-pipeline.sh.
# A rerun skips the images that already exist, so an interrupted loop resumes.
# Usage: examples/loop.sh [PROMPTS] [OUT]    env: DIFFCLI_MODEL, STEPS (default: the model's own)
set -euo pipefail
# diffcli from PATH, else this checkout's .venv (no need to activate it)
diffcli=${DIFFCLI:-$(command -v diffcli || echo "$(dirname "$0")/../.venv/bin/diffcli")}
prompts=${1:-"$(dirname "$0")/prompts.txt"}
out=${2:-loop-out}
n=0 made=0
while IFS= read -r prompt || [[ -n "$prompt" ]]; do
    [[ -z "${prompt// }" || "$prompt" == \#* ]] && continue
    file="$out/$(printf %03d "$n").png"
    n=$((n + 1))
    [[ -e "$file" ]] && continue
    "$diffcli" txt2img "$prompt" --seed "$((n - 1))" ${STEPS:+--steps "$STEPS"} -o "$file" --quiet
    made=$((made + 1))
done < "$prompts"
echo "made $made new image(s) in $out/ ($n prompt(s))" >&2
