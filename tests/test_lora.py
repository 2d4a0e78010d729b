"""LoRA (--lora, <lora:name:w> with --lora-dir) and textual-inversion embeddings, on tiny real components."""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcli.output import read_metadata

FAST = ("--steps", "2", "--quiet", "--seed", "3")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_lora_changes_the_image_scale_zero_does_not_and_it_switches_off(cli, tiny_model, tiny_lora):
    base = ("a cat", "--model", tiny_model, *FAST)
    assert cli("txt2img", *base, "-o", "plain.png").exit_code == 0
    with_lora = cli("txt2img", *base, "--lora", tiny_lora, "-o", "lora.png")
    assert with_lora.exit_code == 0, with_lora.stderr
    assert cli("txt2img", *base, "--lora", f"{tiny_lora}:0", "-o", "zero.png").exit_code == 0
    assert cli("txt2img", *base, "-o", "after.png").exit_code == 0
    assert np.abs(pixels("lora.png") - pixels("plain.png")).max() > 0
    assert np.abs(pixels("zero.png") - pixels("plain.png")).max() <= 1
    assert np.array_equal(pixels("after.png"), pixels("plain.png"))  # the next job runs without it
    assert read_metadata("lora.png")["lora"] == "shiny:1"
    data = tiny_lora.read_bytes()  # A1111 hashes a LoRA's tensor bytes, after the safetensors header
    tensors_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert f'Lora hashes: "shiny: {tensors_hash}"' in Image.open("lora.png").text["parameters"]


def test_prompt_tag_with_lora_dir_equals_the_flag(cli, tiny_model, tiny_lora):
    tag = cli("txt2img", "a cat <lora:shiny:0.7>", "--model", tiny_model, "--lora-dir", tiny_lora.parent, *FAST, "-o", "tag.png")
    flag = cli("txt2img", "a cat", "--model", tiny_model, "--lora", f"{tiny_lora}:0.7", *FAST, "-o", "flag.png")
    assert tag.exit_code == flag.exit_code == 0, tag.stderr
    assert np.abs(pixels("tag.png") - pixels("flag.png")).max() <= 1
    assert read_metadata("tag.png")["prompt"] == "a cat <lora:shiny:0.7>"  # kept in the metadata, as A1111 does


def test_embedding_token_changes_the_image(cli, tiny_model, tiny_embedding):
    base = ("--model", tiny_model, *FAST)
    assert cli("txt2img", "a mystyle cat", *base, "-o", "without.png").exit_code == 0
    flag = cli("txt2img", "a mystyle cat", *base, "--embedding", tiny_embedding, "-o", "flag.png")
    folder = cli("txt2img", "a mystyle cat", *base, "--embedding-dir", tiny_embedding.parent, "-o", "dir.png")
    assert flag.exit_code == folder.exit_code == 0, flag.stderr
    assert np.abs(pixels("flag.png") - pixels("without.png")).max() > 0
    assert np.array_equal(pixels("flag.png"), pixels("dir.png"))
    assert read_metadata("flag.png")["embedding"] == "mystyle"
    file_hash = hashlib.sha256(tiny_embedding.read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "mystyle: {file_hash}"' in Image.open("dir.png").text["parameters"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora", "missing.safetensors"], "--lora 'missing.safetensors': no such file or folder"),
        (["--lora", "x.ckpt"], "is a pickle file"),
        (["--lora", "{lora}:abc"], "scale 'abc' is not a number"),
        (["--embedding", "nope.safetensors"], "--embedding 'nope.safetensors': no such file or folder"),
        (["--prompt-tag", "<lora:shiny:1>"], "<lora:shiny> in the prompt needs --lora-dir"),
        (["--prompt-tag", "<lora:other:1>", "--lora-dir", "{dir}"], "no other.safetensors in --lora-dir"),
    ],
)
def test_adapter_errors_exit_2_before_loading(cli, tiny_model, tiny_lora, args, message):
    Path("x.ckpt").write_bytes(pickle.dumps({"a": 1}))
    prompt = "a cat"
    if args[0] == "--prompt-tag":
        prompt, args = f"a cat {args[1]}", args[2:]
    args = [a.format(lora=tiny_lora, dir=tiny_lora.parent) for a in args]
    result = cli("txt2img", prompt, "--model", tiny_model, *FAST, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not Path("outputs").exists()
