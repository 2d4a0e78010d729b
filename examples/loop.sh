#!/usr/bin/env bash
# A plain bash loop: one `diffcli txt2img` per line of a prompts file (one model load per line).
# `diffcli batch prompts.txt` does the same in one process; see jsonl-pipeline.sh.
# Usage: examples/loop.sh [PROMPTS] [OUT]    env: DIFFCLI_MODEL, STEPS (default 30)
set -euo pipefail
prompts=${1:-"$(dirname "$0")/prompts.txt"}
out=${2:-loop-out}
n=0
while IFS= read -r prompt || [[ -n "$prompt" ]]; do
    [[ -z "${prompt// }" || "$prompt" == \#* ]] && continue
    diffcli txt2img "$prompt" --seed "$n" --steps "${STEPS:-30}" -o "$out/$(printf %03d "$n").png" --quiet
    n=$((n + 1))
done < "$prompts"
echo "made $n image(s) in $out/" >&2
