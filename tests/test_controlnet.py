"""--control: tiny ControlNets built from the tiny test U-Net (ControlNetModel.from_unet), through the CLI, against the
plain diffusers ControlNet pipelines for the same seed; weight 0, multi-ControlNet, start/end, metadata, bad units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SEED = ("--seed", "3", "--steps", "2", "--quiet", "--width", "64", "--height", "64")
TOLERANCE = 2  # /255: the same computation as diffusers', batched and threaded alike


def outline(path: Path) -> Path:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), outline="black", width=3)
    image.save(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def plain(tiny_model, nets, maps, prompt, **kwargs) -> np.ndarray:
    import torch
    from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline

    models = [ControlNetModel.from_pretrained(net) for net in nets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_model, controlnet=models[0] if len(models) == 1 else MultiControlNetModel(models), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, image=maps[0] if len(maps) == 1 else maps, num_inference_steps=2, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(3), output_type="np", **kwargs).images[0]
    return (image * 255).round().astype(np.int16)


def test_txt2img_with_one_controlnet_equals_diffusers(cli, isolated, tiny_model, tiny_controlnets):
    from diffcli.control import canny

    edges = outline(isolated / "outline.png")
    result = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "out.png", "--json",
                 "--control", f"canny:{edges};model={tiny_controlnets[0]};low=50;high=150")
    assert result.exit_code == 0, result.stderr
    expected = plain(tiny_model, tiny_controlnets[:1], [canny(Image.open(edges).convert("RGB"), 50, 150)], "a circle")
    assert np.abs(pixels("out.png") - expected).max() <= TOLERANCE
    record = result.json_lines()[0]
    assert record["control"][0]["type"] == "canny" and record["control"][0]["params"] == {"low": 50, "high": 150}
    text = Image.open("out.png").info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: tiny-cn-0, Weight: 1, Resize Mode: Crop and Resize, Threshold A: 50, ' \
           'Threshold B: 150, Guidance Start: 0, Guidance End: 1, Control Mode: Balanced"' in text


def test_weight_zero_is_the_uncontrolled_image(cli, isolated, tiny_model, tiny_controlnets):
    edges = outline(isolated / "outline.png")
    free = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "free.png")
    zero = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "zero.png",
               "--control", f"canny:{edges};model={tiny_controlnets[0]};weight=0")
    full = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "full.png",
               "--control", f"canny:{edges};model={tiny_controlnets[0]}")
    assert free.exit_code == zero.exit_code == full.exit_code == 0, zero.stderr
    assert np.abs(pixels("zero.png") - pixels("free.png")).max() <= 1
    assert np.abs(pixels("full.png") - pixels("free.png")).max() > 8  # the tiny ControlNet does change the image


def test_two_controlnets_and_start_end(cli, isolated, tiny_model, tiny_controlnets):
    from diffcli.control import canny

    edges = outline(isolated / "outline.png")
    units = [f"canny:{edges};model={tiny_controlnets[0]};weight=0.7", f"none:{edges};model={tiny_controlnets[1]}"]
    both = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "both.png",
               "--control", units[0], "--control", units[1])
    assert both.exit_code == 0, both.stderr
    maps = [canny(Image.open(edges).convert("RGB")), Image.open(edges).convert("RGB")]
    expected = plain(tiny_model, tiny_controlnets, maps, "a circle", controlnet_conditioning_scale=[0.7, 1.0])
    assert np.abs(pixels("both.png") - expected).max() <= TOLERANCE
    late = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "late.png",
               "--control", units[0] + ";start=0.5", "--control", units[1] + ";start=0.5")
    assert late.exit_code == 0 and np.abs(pixels("late.png") - pixels("both.png")).max() > 0


def test_img2img_and_inpaint_take_a_control(cli, isolated, tiny_model, tiny_controlnets):
    edges = outline(isolated / "outline.png")
    Image.new("RGB", (64, 64), (200, 40, 40)).save("in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save("mask.png")
    unit = f"scribble:{edges};model={tiny_controlnets[0]}"
    for args in (("img2img", "in.png", "a circle", "--strength", "0.8"), ("inpaint", "in.png", "a circle", "--mask", "mask.png")):
        result = cli(*args, "--model", tiny_model, "--seed", "3", "--steps", "4", "-q", "--control", unit, "--json",
                     "-o", f"{args[0]}.png")
        assert result.exit_code == 0, (args[0], result.stderr)
        assert result.json_lines()[0]["control"][0]["type"] == "scribble"


def test_a_batch_line_takes_control(cli, isolated, tiny_model, tiny_controlnets):
    edges = outline(isolated / "outline.png")
    Path("jobs.jsonl").write_text(json.dumps({"prompt": "a circle", "control": [f"canny:{edges};model={tiny_controlnets[0]}"],
                                              "width": 64, "height": 64, "steps": 2}) + "\n")
    result = cli("batch", "jobs.jsonl", "--model", tiny_model, "--seed", "1", "-o", "b/", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["control"][0]["model"] == str(tiny_controlnets[0])


@pytest.mark.parametrize("unit, message", [
    ("canny", "expected TYPE:IMAGE"),
    ("sobel:{edges};model={net}", "unknown type"),
    ("canny:{edges}", "no ControlNet model"),
    ("canny:{edges};model={net};weight=3", "weight must be in 0..2"),
    ("canny:{edges};model={net};start=0.8;end=0.2", "start must be below end"),
    ("canny:{edges};model={net};resize=zoom", "resize must be one of"),
    ("canny:{edges};model={net};low=abc", "low must be an integer"),
    ("canny:{edges};model={net};weight", "key=value"),
    ("canny:missing.png;model={net}", "missing.png: no such file"),
    ("canny:{edges};model={model}", "not a ControlNet"),
    ("canny:{edges};model=./nowhere", "no such folder"),
    ("canny:{edges};model={edges}", "not a weight file"),
])
def test_bad_units_exit_2_before_loading(cli, isolated, tiny_model, tiny_controlnets, unit, message):
    edges = outline(isolated / "outline.png")
    text = unit.format(edges=edges, net=tiny_controlnets[0], model=tiny_model)
    result = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "--control", text)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_control_refusals(cli, isolated, tiny_model, tiny_controlnets):
    edges = outline(isolated / "outline.png")
    unit = f"canny:{edges};model={tiny_controlnets[0]}"
    hires = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "--control", unit, "--hires", "2")
    assert hires.exit_code == 2 and "--hires" in hires.stderr
    guess = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "--guess-mode")
    assert guess.exit_code == 2 and "--guess-mode works with --control" in guess.stderr
    upscaler = cli("txt2img", "a circle", "--model", "tiny-shapes-x4", *SEED, "--control", unit)
    assert upscaler.exit_code == 2


def test_replay_makes_a_controlled_image_again(cli, isolated, tiny_model, tiny_controlnets):
    edges = outline(isolated / "outline.png")
    made = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "made.png", "--guess-mode",
               "--control", f"canny:{edges};model={tiny_controlnets[0]};weight=0.6;end=0.8;low=40")
    assert made.exit_code == 0, made.stderr
    again = cli("replay", "made.png", "-o", "again.png", "--json")
    assert again.exit_code == 0, again.stderr
    record = again.json_lines()[0]
    assert record["control"] == json.loads(Image.open("made.png").info["diffcli"])["control"] and record["guess_mode"]
    assert np.abs(pixels("again.png") - pixels("made.png")).max() <= 1
