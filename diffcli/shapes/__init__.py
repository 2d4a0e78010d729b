"""Synthetic shapes world, judge, evaluation and prompt vocabulary of the bundled tiny-shapes model (its training
lives in the repository's lab/, outside the package)."""
