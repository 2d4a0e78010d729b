"""The bundled ControlNet (diffcli/bundled/tiny-shapes-control): the default of --control on tiny-shapes, through the
CLI; weight 0 is the uncontrolled image; a small quality check on held-out scenes (lab/control_check.py is the full
one, docs/bundled-model.md its figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CONTROL = Path(__file__).resolve().parents[1] / "diffcli" / "bundled" / "tiny-shapes-control"
pytestmark = pytest.mark.skipif(not (CONTROL / "config.json").is_file(), reason="bundled ControlNet absent")
RUN = ("--seed", "4", "--quiet", "--threads", "1")


def outline(path: Path, shape: str = "star", x: float = 96.0, y: float = 40.0) -> Path:
    """A drawn outline (dark line on white) of one large shape: what a user sketches, not a rendered scene."""
    import torch

    from diffcli.shapes import world

    grid = torch.arange(world.SIZE, dtype=torch.float32) + 0.5
    yy, xx = grid[:, None].expand(-1, world.SIZE), grid[None, :].expand(world.SIZE, -1)
    d = world.shape_sdf(torch.full(xx.shape, world.SHAPES.index(shape)), xx - x, yy - y,
                        torch.full(xx.shape, world.RADIUS[1]))
    line = (2.0 - d.abs()).clamp(0, 1).numpy()
    Image.fromarray(np.round(255 * (1 - line)).astype(np.uint8)).convert("RGB").save(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_control_without_model_uses_the_bundled_controlnet(cli, isolated):
    outline(isolated / "outline.png")
    made = cli("txt2img", "a red star", "--control", "canny:outline.png", *RUN, "-o", "star.png", "--json")
    assert made.exit_code == 0, made.stderr
    unit = made.json_lines()[0]["control"][0]
    assert unit["model"] == "tiny-shapes-control" and unit["type"] == "canny"
    assert 'Model: tiny-shapes-control' in Image.open("star.png").info["parameters"]
    again = cli("replay", "star.png", "-o", "again.png")
    assert again.exit_code == 0, again.stderr
    assert np.abs(pixels("again.png") - pixels("star.png")).max() <= 1


def test_weight_zero_is_exactly_the_uncontrolled_image(cli, isolated):
    outline(isolated / "outline.png")
    free = cli("txt2img", "a red star", *RUN, "-o", "free.png")
    zero = cli("txt2img", "a red star", "--control", "canny:outline.png;weight=0", *RUN, "-o", "zero.png")
    full = cli("txt2img", "a red star", "--control", "canny:outline.png", *RUN, "-o", "full.png")
    assert free.exit_code == zero.exit_code == full.exit_code == 0, zero.stderr
    assert np.array_equal(pixels("zero.png"), pixels("free.png"))
    assert np.abs(pixels("full.png") - pixels("free.png")).max() > 8


def test_other_models_still_need_a_model(cli, isolated, tiny_model):
    outline(isolated / "outline.png")
    result = cli("txt2img", "a circle", "--model", tiny_model, "--steps", "2", "--control", "canny:outline.png")
    assert result.exit_code == 2 and "no ControlNet model" in result.stderr, result.stderr


@pytest.mark.slow
def test_the_map_decides_shape_and_position(cli, isolated):
    """6 held-out scenes, prompts naming colour and background only: the judge finds the scene's position and colour
    (lab/control_check.py over 200 scenes: 1.0 and 1.0; here at most one miss each) and its shape more often than
    chance (1 in 5; over 200 scenes 0.865 and 0.905 on seeds 0 and 1, short of the 0.90 target on seed 0: small
    squares come out round)."""
    from diffcli.shapes import evaluate, judge, world

    scenes = [s for _, s in evaluate.prompts(6, 7, two_object=False)]
    rendered = world.render(world.to_tensors(scenes)).permute(0, 2, 3, 1).numpy()
    shape = position = colour = 0
    for i, (scene, image) in enumerate(zip(scenes, rendered)):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(f"scene{i}.png")
        o = scene.objects[0]
        prompt = f"a {world.COLOUR_NAMES[o.colour]} shape on a {world.COLOUR_NAMES[scene.background]} background"
        made = cli("txt2img", prompt, "--control", f"canny:scene{i}.png", "--seed", str(i), "--quiet", "-o", f"{i}.png")
        assert made.exit_code == 0, made.stderr
        found = (judge.analyze(pixels(f"{i}.png").astype(np.float32))["objects"] or [{}])[0]
        shape += found.get("shape") == world.SHAPES[o.shape]
        position += found.get("position") == world.POSITION_NAMES[scene.position]
        colour += found.get("colour") == world.COLOUR_NAMES[o.colour]
    assert position >= 5 and colour >= 5 and shape >= 2, (shape, position, colour)


@pytest.mark.slow
def test_a_named_shape_goes_where_the_outline_puts_it(cli, isolated):
    """The issue's use, `diffcli txt2img "a red star" --control canny:outline.png`: six drawn outlines of every shape
    at five places; the prompt names colour, shape and background, the map alone says where. The judge finds the
    outline's position and the named shape and colour (lab/control_check.py --prompt shape --source outline over 200
    held-out scenes: shape 0.96, position and colour 1.0; without the map the position is right 1 time in 5)."""
    from diffcli.shapes import judge, world

    cases = [("star", "left", "red", "blue"), ("circle", "right", "yellow", "black"), ("square", "top", "green", "white"),
             ("triangle", "bottom", "purple", "orange"), ("cross", "center", "white", "green"),
             ("star", "bottom", "orange", "purple")]
    right = {"shape": 0, "position": 0, "colour": 0}
    for i, (shape, place, colour, background) in enumerate(cases):
        outline(isolated / f"outline{i}.png", shape, *world.POSITIONS[place])
        made = cli("txt2img", f"a {colour} {shape} on {background}", "--control", f"canny:outline{i}.png", "--seed",
                   str(i), "--quiet", "-o", f"{i}.png")
        assert made.exit_code == 0, made.stderr
        found = (judge.analyze(pixels(f"{i}.png").astype(np.float32))["objects"] or [{}])[0]
        right["shape"] += found.get("shape") == shape
        right["position"] += found.get("position") == place
        right["colour"] += found.get("colour") == colour
    assert min(right.values()) >= 5, right
