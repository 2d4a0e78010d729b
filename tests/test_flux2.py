"""FLUX.2 dev and klein on tiny real components, through the CLI: txt2img, img2img and edit (input images as references,
never noised), klein's inpaint, each equal to the plain diffusers pipeline; each variant's guidance and defaults, the
metadata, a batch line, and what they cannot honour refused with exit 2 before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flow_models import TOLERANCE, model, tiny_flux2, tiny_flux2_klein, tiny_flux2_klein_base, tiny_flux2_klein_kv  # noqa: F401 (fixtures)
from PIL import Image
from task_inputs import pixels, write_mask, write_photo

from diffcli.output import read_metadata

FAST = ("--steps", "2", "--seed", "1", "--quiet")
SIZE = (80, 64)  # multiples of 16, and FLUX.2's reference images are at least 64 px a side


def flux2_image(class_name: str, folder, prompt: str, seed: int = 1, steps: int = 2, **kwargs) -> np.ndarray:
    """The plain diffusers pipeline's image as 8-bit values, with the CLI's generator (FLUX.2's pipelines take the
    image first, so the prompt goes by name)."""
    import diffusers
    import torch

    pipe = getattr(diffusers, class_name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="np", **kwargs).images[0]
    return np.round(image * 255)


@pytest.fixture(autouse=True)
def torchvision_for_dev(monkeypatch):
    """FLUX.2 dev needs torchvision for its real tokenizer (transformers' PixtralProcessor); the tiny dev model's plain
    tokenizer does not, so diffcli is told it is there where it is not."""
    import diffcli.extras

    available = diffcli.extras.available
    monkeypatch.setattr(diffcli.extras, "available", lambda module: module == "torchvision" or available(module))


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights load (plan-time refusals)."""
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))


def test_folders_resolve_to_their_family_variant_and_defaults(tiny_flux2, tiny_flux2_klein, tiny_flux2_klein_base):
    from diffcli.models import resolve_model

    dev, klein, base = (resolve_model(str(folder)) for folder in (tiny_flux2, tiny_flux2_klein, tiny_flux2_klein_base))
    assert (dev.family, dev.guidance, dev.defaults) == ("flux2", "distilled", {"steps": 50, "cfg": 4.0})
    assert (klein.family, klein.guidance, klein.defaults) == ("flux2-klein", "none", {"steps": 4, "cfg": 1.0})
    assert (base.family, base.guidance, base.defaults) == ("flux2-klein", "cfg", {"steps": 50, "cfg": 4.0})
    assert dev.sample_size == klein.sample_size == 1024 and dev.size_multiple == klein.size_multiple == 16


@pytest.mark.parametrize("model, class_name, args, kwargs, parameters", [
    ("tiny_flux2", "Flux2Pipeline", ("--cfg", "3"), {"guidance_scale": 3.0}, "CFG scale: 1, Distilled CFG Scale: 3, "),
    ("tiny_flux2_klein", "Flux2KleinPipeline", (), {"guidance_scale": 1.0}, "CFG scale: 1, Distilled CFG Scale: 1, "),
    ("tiny_flux2_klein_base", "Flux2KleinPipeline", ("--cfg", "2.5", "--max-sequence-length", "64"),
     {"guidance_scale": 2.5, "max_sequence_length": 64}, "CFG scale: 2.5, Seed: 1"),
], indirect=["model"], ids=["dev", "klein", "klein-base"])
def test_txt2img_equals_diffusers(cli, model, class_name, args, kwargs, parameters):
    result = cli("txt2img", "a red cat", "--model", model, "--width", SIZE[0], "--height", SIZE[1], *FAST, *args,
                 "-o", "t.png", "--json")
    assert result.exit_code == 0, result.stderr
    expected = flux2_image(class_name, model, "a red cat", width=SIZE[0], height=SIZE[1], **kwargs)
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    meta = read_metadata("t.png")
    assert (meta["model_family"], meta["steps"], meta["cfg"], meta["warnings"]) == (
        result.json_lines()[0]["model_family"], 2, kwargs["guidance_scale"], [])
    assert parameters in Image.open("t.png").info["parameters"]


def test_img2img_takes_the_input_as_a_reference_in_one_call(cli, tiny_flux2_klein, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    result = cli("img2img", photo, "a dog", "--model", tiny_flux2_klein, *FAST, "--num-images", "2", "--batch-size", "2",
                 "-o", "i-{seed}.png", "--json")
    assert result.exit_code == 0, result.stderr
    for seed in (1, 2):  # one call of two: each image as its seed alone, the input not noised but read beside the noise
        assert Image.open(f"i-{seed}.png").size == SIZE
        expected = flux2_image("Flux2KleinPipeline", tiny_flux2_klein, "a dog", seed=seed, image=Image.open(photo),
                               width=SIZE[0], height=SIZE[1], guidance_scale=1.0)
        assert np.abs(pixels(f"i-{seed}.png") - expected).max() <= TOLERANCE
    meta = read_metadata("i-1.png")
    assert (meta["task"], meta["model_family"], meta["input"], meta["warnings"]) == ("img2img", "flux2-klein", str(photo), [])
    assert "strength" not in meta and "Denoising strength" not in Image.open("i-1.png").info["parameters"]
    plain = cli("txt2img", "a dog", "--model", tiny_flux2_klein, "--width", SIZE[0], "--height", SIZE[1], *FAST, "-o", "t.png")
    assert plain.exit_code == 0 and np.abs(pixels("i-1.png") - pixels("t.png")).mean() > 5 * TOLERANCE  # the reference counts
    one_step = cli("img2img", photo, "a dog", "--model", tiny_flux2_klein, "--steps", "1", "-q", "-o", "one.png")
    assert one_step.exit_code == 0, one_step.stderr  # no strength x steps to check: the input is not noised


def test_edit_takes_reference_images(cli, tiny_flux2, tmp_path):
    photo, reference = write_photo(tmp_path, SIZE), write_photo(tmp_path, (64, 96), name="ref.png")
    result = cli("edit", photo, "put the hat of image 2 on it", "--image", reference, "--model", tiny_flux2, *FAST,
                 "-o", "e.png", "--json")
    assert result.exit_code == 0, result.stderr
    expected = flux2_image("Flux2Pipeline", tiny_flux2, "put the hat of image 2 on it",
                           image=[Image.open(photo), Image.open(reference)], width=SIZE[0], height=SIZE[1],
                           guidance_scale=4.0)
    assert np.abs(pixels("e.png") - expected).max() <= TOLERANCE
    meta = read_metadata("e.png")
    assert (meta["task"], meta["model_family"], meta["guidance"], meta["cfg"], meta["images"]) == (
        "edit", "flux2", "distilled", 4.0, [str(reference)])
    assert "Distilled CFG Scale: 4, Seed: 1" in Image.open("e.png").info["parameters"]
    alone = cli("edit", photo, "put the hat of image 2 on it", "--model", tiny_flux2, *FAST, "-o", "alone.png")
    assert alone.exit_code == 0 and np.abs(pixels("e.png") - pixels("alone.png")).mean() > 5 * TOLERANCE


def test_klein_inpaints_as_diffusers(cli, tiny_flux2_klein_base, tmp_path):
    photo, mask = write_photo(tmp_path, SIZE), write_mask(tmp_path, SIZE, box=(16, 16, 48, 40))
    result = cli("inpaint", photo, "a dog", "--mask", mask, "--mask-blur", "0", "--model", tiny_flux2_klein_base,
                 "--cfg", "3", "--strength", "0.8", *FAST, "-o", "m.png")
    assert result.exit_code == 0, result.stderr
    repaint = np.asarray(Image.open(mask)) == 255
    expected = flux2_image("Flux2KleinInpaintPipeline", tiny_flux2_klein_base, "a dog", image=Image.open(photo),
                           mask_image=Image.open(mask), strength=0.8, guidance_scale=3.0)
    assert np.abs(pixels("m.png")[repaint] - expected[repaint]).max() <= TOLERANCE
    assert np.array_equal(pixels("m.png")[~repaint], pixels(photo)[~repaint])
    meta = read_metadata("m.png")
    assert (meta["task"], meta["model_family"], meta["cfg"]) == ("inpaint", "flux2-klein", 3.0)


def test_a_batch_line_edits_with_klein(cli, tiny_flux2_klein, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    line = {"command": "edit", "input": str(photo), "prompt": "make it blue", "model": str(tiny_flux2_klein),
            "steps": 2, "seed": 3}
    Path("jobs.jsonl").write_text(json.dumps(line) + "\n")
    result = cli("batch", "jobs.jsonl", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["task"], record["model_family"], record["cfg"], record["guidance"]) == ("edit", "flux2-klein", 1.0, "none")
    expected = flux2_image("Flux2KleinPipeline", tiny_flux2_klein, "make it blue", seed=3, image=Image.open(photo),
                           width=SIZE[0], height=SIZE[1], guidance_scale=1.0)
    assert np.abs(pixels(record["path"]) - expected).max() <= TOLERANCE


def test_replay_makes_a_flux2_image_again(cli, tiny_flux2):
    made = cli("txt2img", "a cat", "--model", tiny_flux2, "--width", "32", "--height", "32", "--cfg", "2", *FAST, "-o", "r.png")
    assert made.exit_code == 0, made.stderr
    result = cli("replay", "r.png", "--verify", "-o", "again.png")
    assert result.exit_code == 0 and "verify: identical to r.png" in result.stderr, result.stderr


def test_klein_kv_generates_and_takes_references_as_diffusers(cli, tiny_flux2_klein_kv, tmp_path):
    """FLUX.2 klein KV (its own family: a pipeline without guidance_scale): txt2img and edit equal its plain pipeline,
    4 steps by default, a --cfg or --negative it cannot use said once each, inpaint refused before loading."""
    from diffcli.models import resolve_model

    spec = resolve_model(str(tiny_flux2_klein_kv))
    assert (spec.family, spec.guidance, spec.defaults) == ("flux2-klein-kv", "none", {"steps": 4, "cfg": 0.0})
    size = ("--width", str(SIZE[0]), "--height", str(SIZE[1]))
    result = cli("txt2img", "a red cat", "--model", tiny_flux2_klein_kv, *size, *FAST, "-o", "t.png", "--json")
    assert result.exit_code == 0, result.stderr
    expected = flux2_image("Flux2KleinKVPipeline", tiny_flux2_klein_kv, "a red cat", width=SIZE[0], height=SIZE[1])
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    assert (read_metadata("t.png")["model_family"], result.json_lines()[0]["warnings"]) == ("flux2-klein-kv", [])
    photo, reference = write_photo(tmp_path, SIZE), write_photo(tmp_path, (64, 96), name="ref.png")
    edited = cli("edit", photo, "put the hat of image 2 on it", "--image", reference, "--model", tiny_flux2_klein_kv,
                 *FAST, "-o", "e.png")
    assert edited.exit_code == 0, edited.stderr
    expected = flux2_image("Flux2KleinKVPipeline", tiny_flux2_klein_kv, "put the hat of image 2 on it",
                           image=[Image.open(photo), Image.open(reference)], width=SIZE[0], height=SIZE[1])
    assert np.abs(pixels("e.png") - expected).max() <= TOLERANCE
    said = cli("txt2img", "a cat", "--model", tiny_flux2_klein_kv, "--width", "32", "--height", "32", "--cfg", "3",
               "-n", "blurry", *FAST, "--json")
    assert said.exit_code == 0, said.stderr
    assert said.json_lines()[0]["warnings"] == [
        "--negative has no effect on flux2-klein-kv models: its pipeline takes no negative prompt",
        f"--cfg 3 has no effect on {tiny_flux2_klein_kv}: it takes no guidance (as FLUX.1 schnell)"]
    refused = cli("inpaint", photo, "a cat", "--mask", write_mask(tmp_path, SIZE), "--model", tiny_flux2_klein_kv)
    assert refused.exit_code == 2 and "inpaint does not work with" in refused.stderr, refused.stderr


def test_what_they_read_otherwise_is_said(cli, tiny_flux2_klein, tiny_flux2_klein_base):
    base = ("a cat", "--width", "32", "--height", "32", *FAST, "--json")
    result = cli("txt2img", *base, "-n", "blurry", "--model", tiny_flux2_klein_base)
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["warnings"] == [
        "--negative has no effect on flux2-klein models: their pipeline's CFG reads an empty negative prompt"]
    result = cli("txt2img", *base, "--cfg", "3", "--model", tiny_flux2_klein)
    assert result.exit_code == 0 and result.json_lines()[0]["warnings"][0].startswith("--cfg 3 has no effect on")


@pytest.mark.parametrize("model, command, args, message", [
    ("tiny_flux2", "inpaint", ["--mask", "{mask}"],
     "inpaint does not work with '{model}' (flux2 model) (a FLUX.2 dev model generates (txt2img)"),
    ("tiny_flux2_klein", "img2img", ["--strength", "0.5"],
     "--strength: '{model}' (flux2-klein) takes INPUT as a reference image, which it does not noise, so no strength, got 0.5"),
    ("tiny_flux2_klein", "edit", ["--image", "{small}"],
     "--image: flux2-klein pipelines take reference images of at least 64 px a side and at most 8:1, got 48x48"),
    ("tiny_flux2", "img2img", ["--width", "32", "--height", "32", "--resize", "stretch"],
     "INPUT: flux2 pipelines take reference images of at least 64 px a side"),
    ("tiny_flux2", "txt2img", ["--true-cfg", "2", "-n", "x"], "--true-cfg: '{model}' (flux2) takes none: its pipeline has no true CFG"),
    ("tiny_flux2_klein", "txt2img", ["--scheduler", "dpm++2m"], "is a flow-matching model (flux2-klein) and takes flow-euler"),
    ("tiny_flux2", "txt2img", ["--hires", "2"], "--hires: works with U-Net models (SD 1.x, 2.x, XL) only"),
    ("tiny_flux2", "txt2img", ["--clip-skip", "2"], "takes no CLIP skip, got 2"),
], indirect=["model"], ids=["dev-inpaint", "strength", "small-reference", "small-input", "true-cfg", "scheduler", "hires",
                            "clip-skip"])
def test_what_they_cannot_do_is_refused_before_loading(cli, no_loading, tmp_path, model, command, args, message):
    photo, mask = write_photo(tmp_path, SIZE), write_mask(tmp_path, SIZE)
    small = write_photo(tmp_path, (48, 48), name="small.png")
    inputs = [] if command == "txt2img" else [photo]
    args = [a.format(mask=mask, small=small) for a in args]
    result = cli(command, *inputs, "a cat", "--model", model, *args)
    assert result.exit_code == 2 and message.format(model=model) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dev_without_torchvision_is_refused_before_loading(cli, tiny_flux2, no_loading, monkeypatch):
    import diffcli.extras

    monkeypatch.setattr(diffcli.extras, "available", lambda module: module != "torchvision")
    result = cli("txt2img", "a cat", "--model", tiny_flux2)
    assert result.exit_code == 2 and "(flux2) needs the package torchvision, which is not installed" in result.stderr


@pytest.fixture(scope="session")
def tiny_flux2_klein_lora(tiny_flux2_klein, tmp_path_factory) -> Path:
    """A peft LoRA for the tiny FLUX.2 klein transformer (attention and output: enough to show), saved as diffusers does."""
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_flux2_klein, subfolder="transformer")
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("flux2-loras")
    Flux2KleinPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                         weight_name="shiny.safetensors")
    return folder / "shiny.safetensors"


def test_lora_loads_into_the_transformer_as_diffusers_loads_it(cli, tiny_flux2_klein, tiny_flux2_klein_lora):
    import torch
    from diffusers import Flux2KleinPipeline

    base = ("a cat", "--model", tiny_flux2_klein, "--width", "32", "--height", "32", *FAST)
    assert cli("txt2img", *base, "--lora", f"{tiny_flux2_klein_lora}:0.8", "-o", "lora.png").exit_code == 0
    assert cli("txt2img", *base, "-o", "plain.png").exit_code == 0  # the next job of the process: the LoRA off again
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_klein)
    pipe.load_lora_weights(tiny_flux2_klein_lora, adapter_name="shiny")
    pipe.set_adapters(["shiny"], [0.8])
    expected = pipe(prompt="a cat", width=32, height=32, num_inference_steps=2, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.abs(pixels("lora.png") - np.round(expected * 255)).max() <= TOLERANCE
    assert np.abs(pixels("lora.png") - pixels("plain.png")).max() > 5 * TOLERANCE
    assert read_metadata("lora.png")["lora"] == "shiny:0.8"
