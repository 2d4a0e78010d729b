"""--max-sequence-length (the T5/LLM prompt's token limit) and --true-cfg (FLUX.1's true CFG beside its distilled
guidance), issue #28: pixel-equal to the plain diffusers pipeline called with them on the tiny SD3 and FLUX.1 models,
recorded and replayed, and refused with exit 2 before any model loads where the family has no such argument."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flow_models import FAST, SIZE, TOLERANCE, diffusers_image, model, tiny_flux, tiny_flux_fill, tiny_flux_kontext, tiny_qwen_image, tiny_sd3, tiny_z_image  # noqa: F401 (fixtures)
from PIL import Image
from task_inputs import pixels, write_mask, write_photo

from diffcli.output import read_metadata

SIZED = ("--width", SIZE[0], "--height", SIZE[1])


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))


def test_flux_true_cfg_and_sequence_length_equal_diffusers_and_replay(cli, tiny_flux):
    result = cli("txt2img", "a red cat", "--model", tiny_flux, *SIZED, *FAST, "--cfg", "4", "-n", "blurry",
                 "--true-cfg", "3", "--max-sequence-length", "16", "-o", "t.png", "--json")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image("FluxPipeline", tiny_flux, "a red cat", width=SIZE[0], height=SIZE[1], guidance_scale=4.0,
                               negative_prompt="blurry", true_cfg_scale=3.0, max_sequence_length=16)
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    plain = diffusers_image("FluxPipeline", tiny_flux, "a red cat", width=SIZE[0], height=SIZE[1], guidance_scale=4.0)
    assert np.abs(expected - plain).max() > 5 * TOLERANCE  # both flags change the image
    meta = read_metadata("t.png")
    assert (meta["true_cfg"], meta["max_sequence_length"], meta["cfg"], meta["warnings"]) == (3.0, 16, 4.0, [])
    parameters = Image.open("t.png").info["parameters"]
    assert "CFG scale: 3, Distilled CFG Scale: 4, " in parameters and "Max sequence length: 16, " in parameters
    again = cli("replay", "t.png", "--verify", "-o", "again.png")
    assert again.exit_code == 0 and "verify: identical to t.png" in again.stderr, again.stderr
    replayed = read_metadata("again.png")
    assert (replayed["true_cfg"], replayed["max_sequence_length"]) == (3.0, 16)


def test_unset_flags_are_not_recorded(cli, tiny_flux):
    result = cli("txt2img", "a cat", "--model", tiny_flux, "--width", "32", "--height", "32", *FAST, "-o", "u.png")
    assert result.exit_code == 0, result.stderr
    meta = read_metadata("u.png")
    assert "true_cfg" not in meta and "max_sequence_length" not in meta
    parameters = Image.open("u.png").info["parameters"]
    assert "CFG scale: 1, " in parameters and "Max sequence length" not in parameters


def test_true_cfg_on_flux_img2img_equals_diffusers(cli, tiny_flux, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    result = cli("img2img", photo, "a dog", "--model", tiny_flux, "--strength", "0.6", "--cfg", "3", *FAST,
                 "-n", "blurry", "--true-cfg", "2.5", "-o", "i.png")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image("FluxImg2ImgPipeline", tiny_flux, "a dog", image=Image.open(photo), strength=0.6,
                               guidance_scale=3.0, negative_prompt="blurry", true_cfg_scale=2.5,
                               width=SIZE[0], height=SIZE[1])
    assert np.abs(pixels("i.png") - expected).max() <= TOLERANCE


def test_sd3_sequence_length_equals_diffusers(cli, tiny_sd3):
    result = cli("txt2img", "a red cat on a mat", "--model", tiny_sd3, *SIZED, *FAST, "--cfg", "5", "-n", "blurry",
                 "--max-sequence-length", "8", "-o", "s.png")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image("StableDiffusion3Pipeline", tiny_sd3, "a red cat on a mat", width=SIZE[0], height=SIZE[1],
                               guidance_scale=5.0, negative_prompt="blurry", max_sequence_length=8)
    assert np.abs(pixels("s.png") - expected).max() <= TOLERANCE
    assert read_metadata("s.png")["max_sequence_length"] == 8
    again = cli("replay", "s.png", "--verify", "-o", "again.png")
    assert again.exit_code == 0 and "verify: identical to s.png" in again.stderr, again.stderr


def test_a_batch_line_takes_both(cli, tiny_flux):
    line = {"prompt": "a cat", "negative": "blurry", "model": str(tiny_flux), "steps": 2, "width": 32, "height": 32,
            "seed": 3, "true_cfg": 2, "max_sequence_length": 12}
    Path("jobs.jsonl").write_text(json.dumps(line) + "\n")
    result = cli("batch", "jobs.jsonl", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["true_cfg"], record["max_sequence_length"]) == (2.0, 12)
    expected = diffusers_image("FluxPipeline", tiny_flux, "a cat", seed=3, width=32, height=32, guidance_scale=3.5,
                               negative_prompt="blurry", true_cfg_scale=2.0, max_sequence_length=12)
    assert np.abs(pixels(record["path"]) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("model, args, message", [
    (None, ["--max-sequence-length", "64"], "--max-sequence-length: 'tiny-shapes' (sd1) encodes prompts with CLIP only"),
    ("tiny_flux", ["--max-sequence-length", "513"], "--max-sequence-length: flux pipelines take at most 512 tokens, got 513"),
    ("tiny_sd3", ["--max-sequence-length", "600"], "--max-sequence-length: sd3 pipelines take at most 512 tokens, got 600"),
    ("tiny_flux", ["--true-cfg", "3"], "--true-cfg 3 needs --negative"),
    ("tiny_sd3", ["--true-cfg", "3", "-n", "x"], "(sd3) takes none: its --cfg already is classifier-free guidance"),
    (None, ["--true-cfg", "3", "-n", "x"], "(sd1) takes none: its --cfg already is classifier-free guidance"),
], ids=["sd1-length", "flux-length", "sd3-length", "no-negative", "sd3-true-cfg", "sd1-true-cfg"])
def test_what_a_family_cannot_take_is_refused_before_loading(cli, request, no_loading, model, args, message):
    where = ["--model", request.getfixturevalue(model), "--width", "32", "--height", "32"] if model else []
    result = cli("txt2img", "a cat", *where, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_refusal_names_the_families_that_take_it(cli, no_loading):
    result = cli("txt2img", "a cat", "--max-sequence-length", "64")
    assert result.exit_code == 2 and "it works with sd3, flux, flux-fill, qwen-image, z-image" in result.stderr


def test_fill_has_no_true_cfg(cli, tiny_flux_fill, no_loading, tmp_path):
    photo, mask = write_photo(tmp_path, SIZE), write_mask(tmp_path, SIZE)
    result = cli("inpaint", photo, "a dog", "--mask", mask, "--model", tiny_flux_fill, "--true-cfg", "2", "-n", "x")
    assert result.exit_code == 2 and "(flux-fill) takes none: its pipeline has no true CFG" in result.stderr, result.stderr


def test_bounds_below_are_refused(cli, no_loading):
    for args in (["--max-sequence-length", "0"], ["--true-cfg", "0.5", "-n", "x"]):
        result = cli("txt2img", "a cat", *args)
        assert result.exit_code == 2, result.stderr


def test_forge_true_cfg_reads_back():
    from diffcli.replay import settings_from_a1111

    settings, unused = settings_from_a1111("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, CFG scale: 3, "
                                           "Distilled CFG Scale: 3.5, Seed: 7, Size: 1024x1024, Max sequence length: 64",
                                           "x.png")
    assert (settings["cfg"], settings["true_cfg"], settings["max_sequence_length"], unused) == (3.5, 3.0, 64, [])
    settings, unused = settings_from_a1111("a cat\nSteps: 20, Sampler: Euler, CFG scale: 3, Distilled CFG Scale: 3.5, "
                                           "Seed: 7, Size: 1024x1024", "x.png")
    assert "true_cfg" not in settings and unused[0].startswith("CFG scale 3 (true CFG without a negative prompt")


def test_both_are_part_of_the_image_identity(tiny_flux):
    from diffcli import jobs
    from diffcli.plan import plan_job

    base = {"prompt": "a cat", "negative": "blurry", "model": str(tiny_flux), "seed": 1, "width": 32, "height": 32,
            "out": "x.png"}
    ids = {plan_job(jobs.build("txt2img", dict(base, **extra))[0]).identity
           for extra in ({}, {"true_cfg": 2.0}, {"true_cfg": 3.0}, {"max_sequence_length": 16})}
    assert len(ids) == 4


@pytest.mark.parametrize("model, class_name, args, kwargs", [
    ("tiny_qwen_image", "QwenImagePipeline", ("--cfg", "3"), {"negative_prompt": "", "true_cfg_scale": 3.0}),
    ("tiny_z_image", "ZImagePipeline", ("--cfg", "2"), {"guidance_scale": 2.0}),
], indirect=["model"], ids=["qwen-image", "z-image"])
def test_llm_families_take_the_sequence_length(cli, model, class_name, args, kwargs):
    result = cli("txt2img", "a red cat on a mat", "--model", model, *SIZED, *FAST, *args, "--max-sequence-length", "4",
                 "-o", "q.png")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image(class_name, model, "a red cat on a mat", width=SIZE[0], height=SIZE[1],
                               max_sequence_length=4, **kwargs)
    assert np.abs(pixels("q.png") - expected).max() <= TOLERANCE
    assert read_metadata("q.png")["max_sequence_length"] == 4


def test_qwen_image_bounds_and_true_cfg_refused(cli, tiny_qwen_image, no_loading):
    base = ("txt2img", "a cat", "--model", tiny_qwen_image, "--width", "32", "--height", "32")
    result = cli(*base, "--max-sequence-length", "1025")
    assert result.exit_code == 2 and "qwen-image pipelines take at most 1024 tokens, got 1025" in result.stderr
    result = cli(*base, "--true-cfg", "3", "-n", "x")
    assert result.exit_code == 2 and "its --cfg already is true CFG (the pipeline's true_cfg_scale)" in result.stderr


def test_kontext_edit_takes_true_cfg(cli, tiny_flux_kontext, tmp_path):
    from test_edit import kontext_image

    photo = write_photo(tmp_path, SIZE)
    result = cli("edit", photo, "make it blue", "--model", tiny_flux_kontext, *FAST, "-n", "red", "--true-cfg", "2",
                 "--max-sequence-length", "8", "-o", "k.png")
    assert result.exit_code == 0, result.stderr
    expected = kontext_image(tiny_flux_kontext, photo, "make it blue", negative_prompt="red", true_cfg_scale=2.0,
                             max_sequence_length=8)
    assert np.abs(pixels("k.png") - expected).max() <= TOLERANCE
