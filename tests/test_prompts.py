"""A1111 prompt weighting, long prompts, clip skip and variation seeds: parser units and CLI runs on tiny components."""

import numpy as np
import pytest
from PIL import Image

from diffcli.output import read_metadata
from diffcli.prompts import CHUNK, chunk_tokens, parse_weights

FAST = ("--steps", "2", "--quiet")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def approx(parts):
    return [(text, pytest.approx(weight)) for text, weight in parts]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("a (word: 0.5 ) b", [("a ", 1.0), ("word", 0.5), (" b", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),  # an unclosed opening weights the rest, as in A1111
        ("a [b", [("a ", 1.0), ("b", 1 / 1.1)]),
        ("stray) and] closings", [("stray) and] closings", 1.0)]),  # unmatched closings stay text
        ("ratio 16:9 and a:b", [("ratio 16:9 and a:b", 1.0)]),
        ("a :1.5) b", [("a :1.5) b", 1.0)]),  # a weight with no open bracket is text
        ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
        ("", [("", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)],
        ),
        ("cat BREAK dog", [("cat", 1.0), ("BREAK", -1.0), ("dog", 1.0)]),
    ],
)
def test_parse_weights_matches_a1111(prompt, expected):
    assert approx(parse_weights(prompt)) == approx(expected)


def test_chunks_of_75_break_after_a_nearby_comma_and_on_break():
    comma = 9
    plain = chunk_tokens([(list(range(100, 260)), 1.0)], comma)
    assert [len(t) for t, _ in plain] == [75, 75, 10]
    with_comma = chunk_tokens([([1] * 70 + [comma] + [2] * 10, 1.3)], comma)
    assert [len(t) for t, _ in with_comma] == [71, 10]  # the 4 words after the comma moved to chunk 2
    assert with_comma[1][1] == [1.3] * 10
    broken = chunk_tokens([([1, 2], 1.0), ([], -1.0), ([3], 1.0)], comma)
    assert [t for t, _ in broken] == [[1, 2], [3]]
    assert chunk_tokens([([], 1.0)], comma) == [([], [])]


def test_the_comma_id_is_the_vocabularys_or_none(tmp_path):
    """comma_id looks the comma up alone (get_vocab builds the whole dict); a vocabulary without it gives None, not the
    unknown token's id (which would break chunks at every unknown word)."""
    import json

    from transformers import CLIPTokenizer

    from diffcli.prompts import COMMA, comma_id
    from conftest import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path / "with")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "with")
    assert comma_id(tokenizer) == tokenizer.get_vocab()[COMMA]
    vocab = json.loads((tmp_path / "with" / "vocab.json").read_text())
    del vocab[COMMA]
    (tmp_path / "without").mkdir()
    for name in ("merges.txt", "tokenizer_config.json"):
        (tmp_path / "without" / name).write_bytes((tmp_path / "with" / name).read_bytes())
    (tmp_path / "without" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    assert comma_id(CLIPTokenizer.from_pretrained(tmp_path / "without")) is None


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)


def test_plain_prompt_encodes_exactly_as_diffusers(tiny_pipe):
    import torch

    from diffcli.prompts import encode

    ours, pooled = encode(tiny_pipe, ["a red car", "blurry"])
    theirs, negative = tiny_pipe.encode_prompt("a red car", "cpu", 1, True, "blurry")
    assert pooled is None and ours.shape == (2, 77, 32)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], negative[0])


def test_long_prompts_become_chunks_and_negative_is_padded(tiny_pipe):
    from diffcli.prompts import encode

    embeds, _ = encode(tiny_pipe, ["x" * (CHUNK + 5), ""])  # the test tokenizer has one token per character
    assert embeds.shape == (2, 154, 32)
    weighted, _ = encode(tiny_pipe, ["a (cat:1.5)", ""])
    plain, _ = encode(tiny_pipe, ["a cat", ""])
    assert not np.allclose(weighted[0].numpy(), plain[0].numpy())
    assert abs(float(weighted[0].mean() - plain[0].mean())) < 1e-5  # A1111 restores the chunk's mean


def test_weighting_changes_the_image_and_can_be_turned_off(cli, tiny_model):
    base = ("--model", tiny_model, "--seed", "3", *FAST)
    assert cli("txt2img", "a (cat:1.8) [dog]", *base, "-o", "weighted.png").exit_code == 0
    assert cli("txt2img", "a (cat:1.8) [dog]", *base, "--no-weighting", "-o", "literal.png").exit_code == 0
    assert cli("txt2img", "a cat dog", *base, "-o", "plain.png").exit_code == 0
    assert cli("txt2img", "a cat dog", *base, "--no-weighting", "-o", "plain-off.png").exit_code == 0
    assert np.abs(pixels("weighted.png") - pixels("literal.png")).max() > 0
    assert np.abs(pixels("weighted.png") - pixels("plain.png")).max() > 0
    assert np.array_equal(pixels("plain.png"), pixels("plain-off.png"))
    assert read_metadata("weighted.png")["weighting"] is True and read_metadata("literal.png")["weighting"] is False


def test_a_token_past_77_changes_the_image(cli, tiny_model):
    head = "a photo of a cat sitting on a mat, " * 3  # 105 characters = 105 tokens
    assert len(head) > 77
    base = ("--model", tiny_model, "--seed", "5", *FAST)
    assert cli("txt2img", head + "red", *base, "-o", "red.png").exit_code == 0
    assert cli("txt2img", head + "blue", *base, "-o", "blue.png").exit_code == 0
    assert np.abs(pixels("red.png") - pixels("blue.png")).max() > 0


def test_clip_skip_changes_the_image_and_is_recorded(cli, tiny_model):
    base = ("a cat", "--model", tiny_model, "--seed", "2", *FAST)
    assert cli("txt2img", *base, "-o", "skip1.png").exit_code == 0
    assert cli("txt2img", *base, "--clip-skip", "2", "-o", "skip2.png").exit_code == 0
    assert np.abs(pixels("skip1.png") - pixels("skip2.png")).max() > 0
    assert read_metadata("skip2.png")["clip_skip"] == 2 and "Clip skip: 2" in Image.open("skip2.png").info["parameters"]
    bad = cli("txt2img", *base, "--clip-skip", "0")
    assert bad.exit_code == 2 and "--clip-skip" in bad.stderr
    deep = cli("txt2img", "a cat", "--clip-skip", "12", *FAST)  # the bundled model's CLIP has 4 layers
    assert deep.exit_code == 2 and "text encoder has 4 layers, got 12" in deep.stderr, deep.stderr


def test_variation_seed_slerps_between_seeds_and_keeps_batch_equal_single(cli, tiny_model):
    base = ("a cat", "--model", tiny_model, *FAST)
    assert cli("txt2img", *base, "--seed", "10", "-o", "s10.png").exit_code == 0
    assert cli("txt2img", *base, "--seed", "20", "-o", "s20.png").exit_code == 0
    assert cli("txt2img", *base, "--seed", "10", "--variation-seed", "20", "--variation-strength", "0", "-o", "v0.png").exit_code == 0
    assert cli("txt2img", *base, "--seed", "10", "--variation-seed", "20", "--variation-strength", "1", "-o", "v1.png").exit_code == 0
    batch = cli("txt2img", *base, "--seed", "10", "--variation-seed", "20", "--variation-strength", "0.4", "-N", "2",
                "--batch-size", "2", "-o", "b-{seed}.png")
    single = cli("txt2img", *base, "--seed", "11", "--variation-seed", "21", "--variation-strength", "0.4", "-o", "one.png")
    assert batch.exit_code == single.exit_code == 0, batch.stderr
    assert np.array_equal(pixels("v0.png"), pixels("s10.png"))
    assert np.abs(pixels("v1.png") - pixels("s20.png")).max() <= 1  # DDIM is deterministic: all the variation seed's noise
    assert np.abs(pixels("b-10.png") - pixels("s10.png")).max() > 0
    assert np.abs(pixels("b-11.png") - pixels("one.png")).max() <= 2
    meta = read_metadata("b-11.png")
    assert (meta["seed"], meta["variation_seed"], meta["variation_strength"]) == (11, 21, 0.4)
    assert "Variation seed: 21, Variation seed strength: 0.4" in Image.open("b-11.png").info["parameters"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variation-seed", "3"], "--variation-seed 3 needs --variation-strength"),
        (["--variation-strength", "0.5"], "--variation-strength 0.5 needs --variation-seed"),
        (["--variation-seed", "3", "--variation-strength", "1.5"], "--variation-strength"),
    ],
)
def test_variation_flag_errors(cli, tiny_model, args, message):
    result = cli("txt2img", "a", "--model", tiny_model, *FAST, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_weighting_a_zero_mean_chunk_stays_finite():
    import torch

    from diffcli.prompts import apply_weights

    z = torch.randn(1, 77, 8)
    z -= z.mean()  # the tiny models' layer norm gives chunks a mean of ~0: the A1111 ratio would explode
    weights = torch.ones(1, 77)
    weights[0, 3] = 1.3
    out = apply_weights(z, weights)
    assert torch.isfinite(out).all() and torch.allclose(out, z * weights.unsqueeze(-1))
