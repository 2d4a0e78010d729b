"""The tiny-shapes tokenizer builder (lab/tokenizer.py): every grammar word one token, CLIP file format."""

from diffcli.shapes import world


def test_tokenizer_round_trips_captions(tmp_path):
    from transformers import CLIPTokenizer

    from lab.tokenizer import build_tokenizer

    tok = CLIPTokenizer.from_pretrained(build_tokenizer(tmp_path))
    assert tok.model_max_length == 77
    text = "a small yellow triangle to the left of a big purple cross on white"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1] and len(ids) == len(text.split()) + 2
    assert len(set(tok(w).input_ids[1] for w in world.vocabulary())) == len(world.vocabulary())
    assert tok("zebra quux 42!").input_ids[-1] == tok.eos_token_id  # unknown words do not crash
