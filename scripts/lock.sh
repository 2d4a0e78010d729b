#!/usr/bin/env bash
# Regenerate constraints.txt, the full lock that the README's Quickstart and CI install with (-c):
# every package pinned, so CI and a fresh clone get exactly the versions the suite passed with.
# pyproject.toml keeps the ranges users install with. Run it from a venv where the suite passes:
#   python3.11 -m venv /tmp/lockenv && /tmp/lockenv/bin/pip install -e ".[dev]" torch==2.13.0 && scripts/lock.sh /tmp/lockenv
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."
{
    echo "# The full lock for the Quickstart and CI (regenerate with scripts/lock.sh; pyproject.toml keeps the ranges)."
    echo "# torch 2.13.0 is the CPU build pip finds on this project's machines (a bare torch pulls a multi-GB CUDA"
    echo "# build); on a CUDA machine drop -c constraints.txt. transformers stays below 5.24 (its LoRA path needs peft>=0.22)."
    "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' | LC_ALL=C sort -f
} > constraints.txt
