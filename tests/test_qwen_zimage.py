"""Qwen-Image and Z-Image on tiny real components, through the CLI: txt2img, img2img and inpaint equal to the plain
diffusers pipeline, each family's guidance argument and defaults, the metadata, a batch line, and what they cannot
honour refused with exit 2 before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flow_models import FAST, SIZE, TOLERANCE, check_img2img_and_inpaint, check_outpaint, diffusers_image, model, tiny_qwen_image, tiny_z_image  # noqa: F401 (fixtures)
from PIL import Image
from task_inputs import pixels, write_mask, write_photo

from diffcli.output import read_metadata

def test_folders_resolve_to_their_family_and_defaults(tiny_qwen_image, tiny_z_image):
    from diffcli.models import resolve_model

    qwen, z_image = resolve_model(str(tiny_qwen_image)), resolve_model(str(tiny_z_image))
    assert (qwen.family, qwen.guidance, qwen.defaults, qwen.sample_size) == ("qwen-image", "cfg", {"steps": 50, "cfg": 4.0}, 1328)
    assert (z_image.family, z_image.guidance, z_image.defaults, z_image.sample_size) == ("z-image", "cfg",
                                                                                          {"steps": 9, "cfg": 0.0}, 1024)
    assert qwen.size_multiple == z_image.size_multiple == 16


@pytest.mark.parametrize("model, class_name, args, kwargs", [
    ("tiny_qwen_image", "QwenImagePipeline", ("-n", "blurry", "--cfg", "3"),
     {"negative_prompt": "blurry", "true_cfg_scale": 3.0}),
    ("tiny_qwen_image", "QwenImagePipeline", (), {"negative_prompt": "", "true_cfg_scale": 4.0}),  # CFG on, empty negative
    ("tiny_z_image", "ZImagePipeline", ("-n", "blurry", "--cfg", "2"), {"negative_prompt": "blurry", "guidance_scale": 2.0}),
], indirect=["model"], ids=["qwen-cfg", "qwen-default-cfg", "z-image-cfg"])
def test_txt2img_equals_diffusers(cli, model, class_name, args, kwargs):
    result = cli("txt2img", "a red cat", "--model", model, "--width", SIZE[0], "--height", SIZE[1], *FAST, *args,
                 "-o", "t.png", "--json")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image(class_name, model, "a red cat", width=SIZE[0], height=SIZE[1], **kwargs)
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    meta = read_metadata("t.png")
    cfg = kwargs.get("true_cfg_scale", kwargs.get("guidance_scale"))
    assert (meta["model_family"], meta["steps"], meta["cfg"], meta["warnings"]) == (model.name[5:], 2, cfg, [])
    assert f"CFG scale: {cfg:g}, Seed: 1" in Image.open("t.png").info["parameters"]


def test_qwen_image_runs_in_bf16_on_the_cpu_with_its_video_vae(cli, tiny_qwen_image):
    """The CPU's bf16 path lays convolutions out channels_last; the Qwen-Image VAE's are 3-D (5-D weights), which torch
    refuses that format for: they stay as they are (the run used to fail there), the 2-D ones of other VAEs do not."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    from diffcli import cpu

    result = cli("txt2img", "a red cat", "--model", tiny_qwen_image, "--width", SIZE[0], "--height", SIZE[1], *FAST,
                 "--dtype", "bf16", "-o", "b.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["optimizations"][-1].startswith("cpu bf16 + channels_last")
    assert not cpu.channels_last(AutoencoderKLQwenImage.from_pretrained(tiny_qwen_image, subfolder="vae"))
    from flow_models import FLUX_VAE_FACTORS, tiny_vae

    flat = tiny_vae(FLUX_VAE_FACTORS, 16)
    assert cpu.channels_last(flat) and flat.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_z_image_takes_turbo_defaults(cli, tiny_z_image):
    result = cli("txt2img", "a cat", "--model", tiny_z_image, "--width", "32", "--height", "32", "--seed", "2",
                 "-o", "d.png", "--json")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["steps"], record["cfg"], record["warnings"]) == (9, 0.0, [])
    expected = diffusers_image("ZImagePipeline", tiny_z_image, "a cat", steps=9, seed=2, width=32, height=32,
                               guidance_scale=0.0)
    assert np.abs(pixels("d.png") - expected).max() <= TOLERANCE


@pytest.mark.parametrize("model, prefix, guidance", [
    ("tiny_qwen_image", "QwenImage", {"true_cfg_scale": 3.0, "negative_prompt": ""}),
    ("tiny_z_image", "ZImage", {"guidance_scale": 3.0}),
], indirect=["model"], ids=["qwen-image", "z-image"])
def test_img2img_and_inpaint_equal_diffusers(cli, model, prefix, guidance, tmp_path):
    check_img2img_and_inpaint(cli, model, prefix, guidance, tmp_path)


def test_outpaint_runs_the_inpaint_pipeline(cli, tiny_z_image, tmp_path):
    check_outpaint(cli, tiny_z_image, tmp_path)


def test_a_batch_line_runs_a_qwen_image_folder(cli, tiny_qwen_image):
    line = {"prompt": "a cat", "model": str(tiny_qwen_image), "steps": 2, "width": 32, "height": 32, "seed": 3}
    Path("jobs.jsonl").write_text(json.dumps(line) + "\n")
    result = cli("batch", "jobs.jsonl", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["model_family"], record["cfg"], record["steps"]) == ("qwen-image", 4.0, 2)
    assert Image.open(record["path"]).size == (32, 32)


def test_they_warn_about_what_they_read_otherwise(cli, tiny_z_image):
    result = cli("txt2img", "a (cat:1.3)", "-n", "blurry", "--model", tiny_z_image, "--width", "32", "--height", "32",
                 "--steps", "2", "-o", "w.png")
    assert result.exit_code == 0, result.stderr
    warnings = read_metadata("w.png")["warnings"]
    assert len(warnings) == 2 and all(line in result.stderr for line in warnings)
    assert "z-image models read attention brackets like (word:1.2) and BREAK as plain text" in warnings[0]
    assert warnings[1].startswith("--negative has no effect on z-image models at --cfg 0: their pipeline reads")


@pytest.fixture
def flux_layout_vae(tmp_path) -> Path:
    """An AutoencoderKL of FLUX.1's layout with 16 latent channels, as Z-Image's (not Qwen-Image's video VAE)."""
    from flow_models import FLUX_VAE_FACTORS, tiny_vae

    tiny_vae(FLUX_VAE_FACTORS, 16).save_pretrained(tmp_path / "flux-vae")
    return tmp_path / "flux-vae"


@pytest.mark.parametrize("model, args, message", [
    ("tiny_qwen_image", ["--hires", "2"], "--hires: works with U-Net models (SD 1.x, 2.x, XL) only, got"),
    ("tiny_z_image", ["--deep-cache", "3"], "--deep-cache: works with U-Net models"),
    ("tiny_qwen_image", ["--variation-seed", "5", "--variation-strength", "0.5"], "--variation-seed: works with U-Net"),
    ("tiny_z_image", ["--embedding", "{embedding}"], "--embedding: textual inversion works with the CLIP prompts"),
    ("tiny_qwen_image", ["--vae", "{vae}"], "--vae: replaces an AutoencoderKL, the model"),
    ("tiny_qwen_image", ["--width", "72"], "--width and --height must be multiples of 16 for this model, got 72x32"),
    ("tiny_z_image", ["--scheduler", "dpm++2m"], "is a flow-matching model (z-image) and takes flow-euler, got dpm++2m"),
    ("tiny_qwen_image", ["--clip-skip", "2"], "takes no CLIP skip, got 2"),
    ("tiny_z_image", ["--max-sequence-length", "100000"], "text encoder takes at most 512 tokens, got 100000"),
], indirect=["model"], ids=["hires", "deep-cache", "variation-seed", "embedding", "vae", "size", "scheduler", "clip-skip",
                            "sequence-length"])
def test_what_they_cannot_do_is_refused_before_loading(cli, model, tiny_embedding, flux_layout_vae, monkeypatch, args,
                                                        message):
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [a.format(embedding=tiny_embedding, vae=flux_layout_vae) for a in args]
    result = cli("txt2img", "a cat", "--model", model, "--width", "32", "--height", "32", *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_latent_fills_are_refused(cli, tiny_qwen_image, tmp_path):
    photo, mask = write_photo(tmp_path, SIZE), write_mask(tmp_path, SIZE)
    result = cli("inpaint", photo, "a dog", "--mask", mask, "--fill", "latent-nothing", "--model", tiny_qwen_image)
    assert result.exit_code == 2 and "--fill: " in result.stderr and "got latent-nothing" in result.stderr


def test_replay_makes_a_qwen_image_image_again(cli, tiny_qwen_image):
    made = cli("txt2img", "a cat", "-n", "dull", "--model", tiny_qwen_image, "--width", "32", "--height", "32", "--cfg", "2.5",
               *FAST, "-o", "r.png")
    assert made.exit_code == 0, made.stderr
    result = cli("replay", "r.png", "--verify", "-o", "again.png")
    assert result.exit_code == 0 and "verify: identical to r.png" in result.stderr, result.stderr


@pytest.fixture(scope="session")
def tiny_z_image_lora(tiny_z_image, tmp_path_factory) -> Path:
    """A peft LoRA for the tiny Z-Image transformer (attention: enough to show), saved as diffusers does."""
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_z_image, subfolder="transformer")
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    folder = tmp_path_factory.mktemp("z-image-loras")
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     weight_name="shiny.safetensors")
    return folder / "shiny.safetensors"


def test_lora_loads_into_the_z_image_transformer_as_diffusers_loads_it(cli, tiny_z_image, tiny_z_image_lora):
    import torch
    from diffusers import ZImagePipeline

    base = ("a cat", "--model", tiny_z_image, "--width", "32", "--height", "32", "--cfg", "1", *FAST)
    assert cli("txt2img", *base, "--lora", f"{tiny_z_image_lora}:0.8", "-o", "lora.png").exit_code == 0
    assert cli("txt2img", *base, "-o", "plain.png").exit_code == 0  # the next job of the process: the LoRA off again
    pipe = ZImagePipeline.from_pretrained(tiny_z_image)
    pipe.load_lora_weights(tiny_z_image_lora, adapter_name="shiny")
    pipe.set_adapters(["shiny"], [0.8])
    expected = pipe("a cat", width=32, height=32, num_inference_steps=2, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.abs(pixels("lora.png") - np.round(expected * 255)).max() <= TOLERANCE
    assert np.abs(pixels("lora.png") - pixels("plain.png")).max() > 5 * TOLERANCE
    assert read_metadata("lora.png")["lora"] == "shiny:0.8"
