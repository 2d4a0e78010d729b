"""SD3 and FLUX.1 (the flow-matching families) on tiny real components, through the CLI: txt2img, img2img and inpaint
equal to the plain diffusers pipeline, the defaults of each variant, the metadata, a batch line, and every setting
they cannot honour refused with exit 2 before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flow_models import FAST, SIZE, TOLERANCE, check_img2img_and_inpaint, check_outpaint, diffusers_image, model, tiny_flux, tiny_flux_fill, tiny_flux_lora, tiny_flux_schnell, tiny_sd3  # noqa: F401 (fixtures)
from PIL import Image
from task_inputs import pixels, write_mask, write_photo

from diffcli.output import read_metadata

def test_folders_resolve_to_their_family_variant_and_defaults(tiny_sd3, tiny_flux, tiny_flux_schnell):
    from diffcli.models import resolve_model

    sd3, dev, schnell = (resolve_model(str(folder)) for folder in (tiny_sd3, tiny_flux, tiny_flux_schnell))
    assert (sd3.family, sd3.guidance, sd3.defaults, sd3.sample_size) == ("sd3", "cfg", {"steps": 28, "cfg": 4.5}, 256)
    assert (dev.family, dev.guidance, dev.defaults) == ("flux", "distilled", {"steps": 28, "cfg": 3.5})
    assert (schnell.family, schnell.guidance, schnell.defaults) == ("flux", "none", {"steps": 4, "cfg": 0.0})
    assert dev.sample_size == schnell.sample_size == 1024  # no sample_size in a FLUX.1 config: the family's
    assert sd3.size_multiple == dev.size_multiple == 16


def test_sd35_large_turbo_is_told_by_its_name(cli, tiny_sd3, tmp_path):
    """SD3.5 Large Turbo has Large's configs: its name gives it its model card's 4 steps and no guidance (a negative
    prompt then unread, said); the same folder under another name keeps SD3.5's defaults."""
    import shutil

    from diffcli.models import resolve_model

    turbo = shutil.copytree(tiny_sd3, tmp_path / "sd3.5_Large_Turbo")
    assert resolve_model(str(turbo)).defaults == {"steps": 4, "cfg": 0.0}
    assert resolve_model(str(tiny_sd3)).defaults == {"steps": 28, "cfg": 4.5}
    inside = shutil.copytree(tiny_sd3, tmp_path / "large-turbo-tries" / "sd3.5-medium")  # only its own name counts
    assert resolve_model(str(inside)).defaults == {"steps": 28, "cfg": 4.5}
    result = cli("txt2img", "a cat", "-n", "blurry", "--model", turbo, "--width", "32", "--height", "32", "--seed", "1",
                 "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["steps"], record["cfg"]) == (4, 0.0)
    assert record["warnings"] == ["--negative has no effect on sd3 models at --cfg 0: their pipeline reads the negative "
                                  "prompt only above --cfg 1"]


@pytest.mark.parametrize("model, class_name, args, kwargs, parameters", [
    ("tiny_sd3", "StableDiffusion3Pipeline", ("-n", "blurry", "--cfg", "5", "--clip-skip", "2"),
     {"negative_prompt": "blurry", "guidance_scale": 5.0, "clip_skip": 1}, "CFG scale: 5, Seed: 1"),
    ("tiny_flux", "FluxPipeline", ("--cfg", "4"), {"guidance_scale": 4.0}, "CFG scale: 1, Distilled CFG Scale: 4, "),
    ("tiny_flux_schnell", "FluxPipeline", ("--scheduler", "flow-euler"), {"guidance_scale": 0.0},
     "Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 0, "),
], indirect=["model"], ids=["sd3", "flux-dev", "flux-schnell"])
def test_txt2img_equals_diffusers(cli, model, class_name, args, kwargs, parameters):
    result = cli("txt2img", "a red cat", "--model", model, "--width", SIZE[0], "--height", SIZE[1], *FAST, *args,
                 "-o", "t.png", "--json")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image(class_name, model, "a red cat", width=SIZE[0], height=SIZE[1], **kwargs)
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    meta = read_metadata("t.png")
    assert (meta["model_family"], meta["steps"], meta["cfg"]) == (result.json_lines()[0]["model_family"], 2, kwargs["guidance_scale"])
    assert parameters in Image.open("t.png").info["parameters"] and not meta["warnings"]


@pytest.mark.parametrize("model, prefix", [("tiny_sd3", "StableDiffusion3"), ("tiny_flux", "Flux")],
                         indirect=["model"], ids=["sd3", "flux"])
def test_img2img_and_inpaint_equal_diffusers(cli, model, prefix, tmp_path):
    check_img2img_and_inpaint(cli, model, prefix, {"guidance_scale": 3.0}, tmp_path)


def test_outpaint_runs_the_inpaint_pipeline(cli, tiny_flux, tmp_path):
    check_outpaint(cli, tiny_flux, tmp_path)


def test_a_fill_model_inpaints_as_diffusers_and_only_inpaints(cli, tiny_flux_fill, tmp_path):
    photo, mask = write_photo(tmp_path, SIZE), write_mask(tmp_path, SIZE, box=(16, 8, 40, 32))
    result = cli("inpaint", photo, "a dog", "--mask", mask, "--mask-blur", "0", "--model", tiny_flux_fill, *FAST,
                 "-o", "f.png", "--json")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["model_family"], record["cfg"], record["guidance"]) == ("flux-fill", 30.0, "distilled")
    repaint = np.asarray(Image.open(mask)) == 255
    expected = diffusers_image("FluxFillPipeline", tiny_flux_fill, "a dog", image=Image.open(photo),
                               mask_image=Image.open(mask), guidance_scale=30.0, width=SIZE[0], height=SIZE[1])
    assert np.abs(pixels("f.png")[repaint] - expected[repaint]).max() <= TOLERANCE
    result = cli("txt2img", "a dog", "--model", tiny_flux_fill, *FAST)
    assert result.exit_code == 2 and "txt2img does not work with" in result.stderr and "only inpaints" in result.stderr


def test_lora_loads_into_the_transformer_as_diffusers_loads_it(cli, tiny_flux, tiny_flux_lora):
    import torch
    from diffusers import FluxPipeline

    base = ("a cat", "--model", tiny_flux, "--width", "32", "--height", "32", *FAST)
    assert cli("txt2img", *base, "--lora", f"{tiny_flux_lora}:0.8", "-o", "lora.png").exit_code == 0
    assert cli("txt2img", *base, "-o", "plain.png").exit_code == 0  # the next job of the process: the LoRA off again
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(tiny_flux_lora, adapter_name="shiny")
    pipe.set_adapters(["shiny"], [0.8])
    expected = pipe("a cat", width=32, height=32, num_inference_steps=2, guidance_scale=3.5, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.abs(pixels("lora.png") - np.round(expected * 255)).max() <= TOLERANCE
    assert np.abs(pixels("lora.png") - pixels("plain.png")).max() > 5 * TOLERANCE
    assert read_metadata("lora.png")["lora"] == "shiny:0.8"


def test_schnell_defaults_and_a_cfg_it_ignores(cli, tiny_flux_schnell):
    result = cli("txt2img", "a cat", "--model", tiny_flux_schnell, "--width", "32", "--height", "32", "--seed", "2",
                 "-o", "s.png", "--json")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["steps"], record["cfg"], record["guidance"], record["warnings"]) == (4, 0.0, "none", [])
    result = cli("txt2img", "a cat", "--model", tiny_flux_schnell, "--width", "32", "--height", "32", "--cfg", "3", *FAST,
                 "--json")
    assert result.exit_code == 0 and result.json_lines()[0]["warnings"][0].startswith("--cfg 3 has no effect on")


def test_flux_warns_about_what_it_reads_otherwise(cli, tiny_flux):
    result = cli("txt2img", "a cat BREAK", "-n", "blurry", "--model", tiny_flux, "--width", "32", "--height", "32",
                 "--steps", "2", "-o", "w.png")
    assert result.exit_code == 0, result.stderr
    warnings = read_metadata("w.png")["warnings"]
    assert len(warnings) == 2 and all(line in result.stderr for line in warnings)
    assert warnings[0] == "BREAK has no meaning for flux models (their T5 reads one sequence): dropped"
    assert warnings[1].startswith("--negative has no effect on flux models")
    quiet = cli("txt2img", "a cat BREAK", "--no-weighting", "--model", tiny_flux, "--width", "32", "--height", "32",
                *FAST, "--json")
    assert quiet.exit_code == 0 and quiet.json_lines()[0]["warnings"] == []


@pytest.mark.parametrize(("model", "sd3"), [("tiny_sd3", True), ("tiny_flux", False)], indirect=["model"])
def test_t5_families_encode_unweighted_prompts_as_their_pipeline_does(model, sd3):
    """t5_prompts' embeddings of prompts without weights are the pipeline's own encode_prompt's (SD3: with a negative
    and clip skip; FLUX.1: pooled CLIP and T5), so weighting changes only what the weights say."""
    import diffusers
    import torch

    from diffcli import t5_prompts

    pipe = getattr(diffusers, "StableDiffusion3Pipeline" if sd3 else "FluxPipeline").from_pretrained(model)
    prompt, negative = "a red cat on a long wall, " * 12, "blurry"  # CLIP keeps 77 tokens, T5 more
    for clip_skip in ((1, 2) if sd3 else (1,)):
        ours = t5_prompts.pipeline_inputs(pipe, [prompt], [negative] if sd3 else None, clip_skip, None)
        with torch.no_grad():
            if sd3:
                theirs = pipe.encode_prompt(prompt, None, None, negative_prompt=negative, clip_skip=clip_skip - 1 or None)
                names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
            else:
                theirs = pipe.encode_prompt(prompt, None)[:2]
                names = ("prompt_embeds", "pooled_prompt_embeds")
        for name, expected in zip(names, theirs):
            assert ours[name].shape == expected.shape and torch.allclose(ours[name], expected, atol=1e-5), name


@pytest.mark.parametrize(("model", "sd3"), [("tiny_sd3", True), ("tiny_flux", False)], indirect=["model"])
def test_t5_family_weights_move_tokens_from_the_empty_prompts_states(model, sd3):
    """A token of weight w gets empty + w * (hidden - empty): affine in w at the weighted tokens only, and at w = 0 the
    empty prompt's state there (a scale would be undone by the transformers' layer norms)."""
    import diffusers
    import torch

    from diffcli import t5_prompts

    pipe = getattr(diffusers, "StableDiffusion3Pipeline" if sd3 else "FluxPipeline").from_pretrained(model)
    embeds = {w: t5_prompts.pipeline_inputs(pipe, [f"a (red:{w}) cat"], None, None, 64)["prompt_embeds"][0]
              for w in (0, 0.5, 1.5, 2.5)}
    step = embeds[2.5] - embeds[1.5]
    assert torch.allclose(step, embeds[1.5] - embeds[0.5], atol=1e-4)
    moved = step.abs().amax(dim=-1) > 1e-6  # the token positions the weight reaches
    assert 0 < int(moved.sum()) < 8, int(moved.sum())
    empty = t5_prompts.pipeline_inputs(pipe, [""], None, None, 64)["prompt_embeds"][0]
    assert torch.allclose(embeds[0][moved], empty[moved], atol=1e-5)
    pooled = [t5_prompts.pipeline_inputs(pipe, [f"a (red:{w}) cat"], None, None, 64)["pooled_prompt_embeds"] for w in (0.5, 2.5)]
    assert torch.equal(*pooled)  # the pooled vectors stay unweighted


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny_flux"], indirect=True)
def test_t5_families_take_a1111_weights(cli, model):
    """Through the CLI: a weighted prompt is encoded with its weights (no warning that brackets are text, the prompt
    recorded as written); one whose weights are all 1 but which goes diffcli's way (a BREAK, dropped and warned)
    gives the plain prompt's image; --no-weighting reads the brackets as text."""
    size = ("--width", "32", "--height", "32", *FAST)
    assert cli("txt2img", "a red cat", "--model", model, *size, "-o", "plain.png").exit_code == 0
    weighted = cli("txt2img", "(a red cat:3)", "--model", model, *size, "-o", "weighted.png", "--json")
    assert weighted.exit_code == 0, weighted.stderr
    assert weighted.json_lines()[0]["warnings"] == [] and read_metadata("weighted.png")["prompt"] == "(a red cat:3)"
    assert not np.array_equal(pixels("weighted.png"), pixels("plain.png"))
    broken = cli("txt2img", "a red cat BREAK", "--model", model, *size, "-o", "break.png", "--json")
    assert broken.exit_code == 0 and "BREAK has no meaning" in broken.json_lines()[0]["warnings"][0]
    assert np.abs(pixels("break.png") - pixels("plain.png")).max() <= TOLERANCE
    literal = cli("txt2img", "(a red cat:3)", "--no-weighting", "--model", model, *size, "-o", "literal.png")
    assert literal.exit_code == 0 and not np.array_equal(pixels("literal.png"), pixels("weighted.png"))


def test_a_batch_line_runs_a_flux_folder(cli, tiny_flux):
    line = {"prompt": "a cat", "model": str(tiny_flux), "steps": 2, "width": 32, "height": 32, "seed": 3}
    Path("jobs.jsonl").write_text(json.dumps(line) + "\n")
    result = cli("batch", "jobs.jsonl", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["model_family"], record["cfg"], record["steps"]) == ("flux", 3.5, 2)
    assert Image.open(record["path"]).size == (32, 32)


@pytest.fixture
def sd_layout_vae(tmp_path) -> Path:
    """A VAE of SD's layout (quant convs) with 4 latent channels, as the tiny FLUX.1's has."""
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=[8], latent_channels=4, norm_num_groups=4).save_pretrained(tmp_path / "sd-vae")
    return tmp_path / "sd-vae"


@pytest.mark.parametrize("args, message", [
    (["--hires", "2"], "--hires: works with U-Net models (SD 1.x, 2.x, XL) only, got"),
    (["--refiner", "some-refiner"], "--refiner: works with U-Net models"),
    (["--deep-cache", "3"], "--deep-cache: works with U-Net models"),
    (["--variation-seed", "5", "--variation-strength", "0.5"], "--variation-seed: works with U-Net models"),
    (["--embedding", "{embedding}"], "--embedding: textual inversion works with the CLIP prompts diffcli encodes"),
    (["--vae", "{vae}"], "needs a VAE of the SD3/FLUX.1 layout (no quant convs), got"),
    (["--width", "72"], "--width and --height must be multiples of 16 for this model, got 72x32 (try 64x32)"),
    (["--scheduler", "dpm++2m"], "is a flow-matching model (flux) and takes flow-euler, got dpm++2m"),
    (["--clip-skip", "2"], "takes no CLIP skip, got 2"),
], ids=["hires", "refiner", "deep-cache", "variation-seed", "embedding", "vae", "size", "scheduler", "clip-skip"])
def test_what_flux_cannot_do_is_refused_before_loading(cli, tiny_flux, tiny_embedding, sd_layout_vae, monkeypatch,
                                                       args, message):
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [a.format(embedding=tiny_embedding, vae=sd_layout_vae) for a in args]
    result = cli("txt2img", "a cat", "--model", tiny_flux, "--width", "32", "--height", "32", *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sd3_and_sd_schedulers_and_latent_fills_are_refused(cli, tiny_sd3, tmp_path):
    result = cli("txt2img", "a cat", "--model", tiny_sd3, "--scheduler", "ddim")
    assert result.exit_code == 2 and "is a flow-matching model (sd3) and takes flow-euler, got ddim" in result.stderr
    result = cli("txt2img", "a cat", "--scheduler", "flow-euler")  # the bundled SD 1.x model
    assert result.exit_code == 2 and "is a noise-prediction model (sd1) and takes every scheduler but flow-euler" in result.stderr
    photo, mask = write_photo(tmp_path, SIZE), write_mask(tmp_path, SIZE)
    result = cli("inpaint", photo, "a dog", "--mask", mask, "--fill", "latent-noise", "--model", tiny_sd3)
    assert result.exit_code == 2 and "--fill: " in result.stderr and "got latent-noise" in result.stderr


def test_replay_makes_a_flux_image_again(cli, tiny_flux):
    made = cli("txt2img", "a cat", "--model", tiny_flux, "--width", "32", "--height", "32", "--cfg", "4", *FAST, "-o", "r.png")
    assert made.exit_code == 0, made.stderr
    result = cli("replay", "r.png", "--verify", "-o", "again.png")
    assert result.exit_code == 0 and "verify: identical to r.png" in result.stderr, result.stderr


def test_distilled_cfg_reads_back():
    from diffcli.replay import settings_from_a1111

    settings, unused = settings_from_a1111("a cat\nSteps: 20, Sampler: Euler, CFG scale: 1, "
                                           "Distilled CFG Scale: 3.5, Seed: 7, Size: 1024x1024", "x.png")
    assert (settings["cfg"], settings["steps"], settings["seed"], unused) == (3.5, 20, 7, [])


def test_schedulers_lists_the_flow_matching_one(cli):
    listing = cli("schedulers")
    assert listing.exit_code == 0 and "flow-euler" in listing.stdout and "FlowMatchEulerDiscreteScheduler" in listing.stdout


def test_schedulers_of_a_transformer_file_take_its_base(cli, tiny_flux, tmp_path):
    import shutil

    path = tmp_path / "flux1-tiny.safetensors"
    shutil.copy(next((tiny_flux / "transformer").glob("*.safetensors")), path)
    listing = cli("schedulers", "--model", path, "--base", tiny_flux)
    assert listing.exit_code == 0, listing.stderr
    assert "flow-euler" in listing.stdout and "dpm++2m " not in listing.stdout  # the flow-matching ones only
