"""A tiny byte-level BPE tokenizer trained on the caption grammar, saved in the CLIP file format."""

import json
from pathlib import Path

from diffcli.shapes.world import vocabulary

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def build_tokenizer(out_dir) -> Path:
    """Train BPE (end-of-word suffix </w>, lowercase, CLIP pre-tokenizer) so every grammar word is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIALS[1], end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>")
    tok.train_from_iterator([" ".join(vocabulary())] * 4 + [c + "</w>" for c in alphabet], trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = json.loads(tok.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "pad_token": SPECIALS[1], "unk_token": SPECIALS[1]}))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1], "pad_token": SPECIALS[1], "unk_token": SPECIALS[1]}, indent=1))
    return out
