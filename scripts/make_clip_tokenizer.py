"""Write CLIP's vocab.json and merges.txt (gzipped) from OpenAI's bpe_simple_vocab_16e6.txt.gz.

The source file ships in the `open-clip-torch` wheel (open_clip/bpe_simple_vocab_16e6.txt.gz):
    pip download --no-deps open-clip-torch && unzip -j open_clip_torch-*.whl '*/bpe_simple_vocab_16e6.txt.gz'
    python scripts/make_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz diffcli/configs/clip-bpe
The vocab is built as OpenAI CLIP's SimpleTokenizer builds it, so ids match the Hub's CLIPTokenizer files.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

MERGES = 49152 - 256 - 2  # CLIP's merge count: a 49408-token vocab less bytes, word-final bytes and specials
CHECK_TEXT = "a photo of an astronaut riding a horse"
CHECK_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (openai/CLIP simple_tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_vocab(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id table and merge lines, as openai/CLIP's SimpleTokenizer derives them."""
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1 : MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer_files(bpe_gz: Path, out: Path) -> None:
    """Write vocab.json.gz and merges.txt.gz (Hugging Face layout, gzipped with a fixed mtime)."""
    vocab, merges = clip_vocab(bpe_gz)
    if len(vocab) != 49408:
        raise SystemExit(f"{bpe_gz}: expected 49408 tokens, got {len(vocab)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json.gz").write_bytes(gzip.compress(json.dumps(vocab, ensure_ascii=False).encode(), mtime=0))
    (out / "merges.txt.gz").write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges) + "\n").encode(), mtime=0))


def check(out: Path) -> None:
    """Tokenize the diffusers docs prompt with transformers' CLIPTokenizer and compare with the known ids."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt"):
            (Path(tmp) / name).write_bytes(gzip.decompress((out / f"{name}.gz").read_bytes()))
        ids = CLIPTokenizer.from_pretrained(tmp).encode(CHECK_TEXT)
    if ids != CHECK_IDS:
        raise SystemExit(f"{CHECK_TEXT!r} tokenized to {ids}, expected {CHECK_IDS}")
    print(f"ok: {CHECK_TEXT!r} -> {ids}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: make_clip_tokenizer.py BPE_SIMPLE_VOCAB_16E6.TXT.GZ OUT_DIR")
    write_tokenizer_files(Path(sys.argv[1]), Path(sys.argv[2]))
    check(Path(sys.argv[2]))
