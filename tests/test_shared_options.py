"""Options declared once and attached to every command they apply to: LoRA, embeddings, --clip-skip and --deep-cache
work for img2img, inpaint and outpaint as for txt2img, through the CLI and through batch lines."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcli.output import read_metadata

FAST = ("--steps", "3", "--quiet", "--seed", "3")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture
def inputs(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    return tmp_path


def commands(inputs) -> dict:
    """Each image command with what it needs besides the prompt."""
    return {"img2img": [inputs / "in.png"], "inpaint": [inputs / "in.png", "--mask", inputs / "mask.png"],
            "outpaint": [inputs / "in.png", "--extend", "right=16"]}


@pytest.mark.parametrize("command", ["img2img", "inpaint", "outpaint"])
def test_lora_and_clip_skip_change_the_image_and_are_recorded(cli, tiny_model, tiny_lora, inputs, command):
    first, *rest = commands(inputs)[command]
    base = (command, first, "a cat", *rest, "--model", tiny_model, *FAST)
    assert cli(*base, "-o", "plain.png").exit_code == 0
    lora = cli(*base, "--lora", tiny_lora, "-o", "lora.png")
    skip = cli(*base, "--clip-skip", "2", "-o", "skip.png")
    assert lora.exit_code == skip.exit_code == 0, lora.stderr + skip.stderr
    assert np.abs(pixels("lora.png") - pixels("plain.png")).max() > 0
    assert np.abs(pixels("skip.png") - pixels("plain.png")).max() > 0
    assert read_metadata("lora.png")["lora"] == "shiny:1" and read_metadata("skip.png")["clip_skip"] == 2


def test_embedding_and_deep_cache_on_img2img(cli, tiny_model, tiny_embedding, inputs):
    base = ("img2img", inputs / "in.png", "a mystyle cat", "--model", tiny_model, *FAST, "--steps", "4")
    assert cli(*base, "-o", "plain.png").exit_code == 0
    embedded = cli(*base, "--embedding", tiny_embedding, "-o", "emb.png")
    cached = cli(*base, "--deep-cache", "2", "-o", "cached.png", "--json")
    assert embedded.exit_code == cached.exit_code == 0, embedded.stderr + cached.stderr
    assert np.abs(pixels("emb.png") - pixels("plain.png")).max() > 0
    assert read_metadata("emb.png")["embedding"] == "mystyle"
    assert read_metadata("cached.png")["deep_cache"] == 2


def test_a_batch_line_takes_them_too(cli, tiny_model, tiny_lora, inputs):
    Path("j.jsonl").write_text(json.dumps({"command": "img2img", "input": str(inputs / "in.png"), "prompt": "a cat",
                                           "lora": [str(tiny_lora)], "clip-skip": 2}) + "\n")
    result = cli("batch", "j.jsonl", "--model", tiny_model, "--seed", "3", "--steps", "3", "-o", "b", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    assert (record["lora"], record["clip_skip"]) == ("shiny:1", 2)


def test_upscale_and_the_txt2img_only_options_are_refused_elsewhere(cli, tiny_model, inputs):
    for args, flag in [(["upscale", inputs / "in.png", "--lora", "x.safetensors"], "--lora"),
                       (["img2img", inputs / "in.png", "a", "--hires", "2"], "--hires"),
                       (["inpaint", inputs / "in.png", "a", "--mask", inputs / "mask.png", "--variation-seed", "1"],
                        "--variation-seed")]:
        result = cli(*args, "--model", tiny_model)
        assert result.exit_code == 2 and f"No such option: {flag}" in result.stderr, result.stderr


def test_an_earlier_jobs_embedding_does_not_reach_the_next_job(cli, tiny_model, tiny_embedding):
    """The pipeline is cached per process (a batch, a sweep): a job without --embedding gets none of an earlier one's."""
    base = ("txt2img", "a mystyle cat", "--model", tiny_model, *FAST)
    assert cli(*base, "-o", "before.png").exit_code == 0
    assert cli(*base, "--embedding", tiny_embedding, "-o", "with.png").exit_code == 0
    assert cli(*base, "-o", "after.png").exit_code == 0
    assert cli(*base, "--embedding", tiny_embedding, "-o", "again.png").exit_code == 0
    assert np.abs(pixels("with.png") - pixels("before.png")).max() > 0
    assert np.array_equal(pixels("after.png"), pixels("before.png"))
    assert np.array_equal(pixels("again.png"), pixels("with.png"))
