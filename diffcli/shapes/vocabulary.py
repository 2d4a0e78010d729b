"""What a tiny-shapes model knows of a prompt: the caption grammar's words that its tokenizer keeps whole.

Named by `"limits": {"vocabulary": "shapes"}` in the model's diffcli.json; diffcli.limits reads it at plan time.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=4)
def known_words(model_dir: str) -> frozenset:
    """world.vocabulary() (every word its captions were made of) that the model's tokenizer has as one `word</w>`
    token; without a readable tokenizer/vocab.json, the grammar's words alone."""
    from diffcli.shapes.world import vocabulary

    words = set(vocabulary())
    try:
        tokens = json.loads((Path(model_dir) / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tokens = None
    if not isinstance(tokens, dict):
        return frozenset(words)
    return frozenset(word for word in words if f"{word}</w>" in tokens)


def summary() -> str:
    """What the world has, counted from world.py: '5 shapes, 8 colours, sizes, positions, relations'."""
    from diffcli.shapes import world

    return f"{len(world.SHAPES)} shapes, {len(world.COLOURS)} colours, sizes, positions, relations"
