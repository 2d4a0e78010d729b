"""Synthetic shapes world, judge, evaluation and prompt vocabulary of the bundled tiny-shapes model (its training
lives in the repository's lab/, outside the package)."""

SEED_STRIDE = 100_000  # `diffcli eval` draws image i of --seed s with generator seed s * SEED_STRIDE + i
