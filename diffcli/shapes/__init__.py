"""Synthetic shapes world, training, judge and evaluation of the bundled tiny-shapes model."""
