#!/usr/bin/env bash
# A cfg x steps sweep of one prompt at one seed: jq -n writes one job per combination, one
# `diffcli batch` runs them all with the model loaded once, names say which is which.
# Usage: examples/sweep.sh [PROMPT] [OUT]    env: DIFFCLI_MODEL, CFGS ("4 7.5 11"), STEPS_LIST ("20 30 40"); needs jq
set -euo pipefail
prompt=${1:-"a red circle on a blue background"}
out=${2:-sweep-out}
jq -nc --arg prompt "$prompt" --arg cfgs "${CFGS:-4 7.5 11}" --arg steps "${STEPS_LIST:-20 30 40}" '
    ($cfgs | split(" ") | map(tonumber)) as $c | ($steps | split(" ") | map(tonumber)) as $s
    | $c[] as $cfg | $s[] as $n | {prompt: $prompt, seed: 42, cfg: $cfg, steps: $n}' \
    | diffcli batch - --out "$out/cfg{cfg}-steps{steps}.png" --quiet
