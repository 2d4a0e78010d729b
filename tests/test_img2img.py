"""img2img through the CLI on the tiny model: size handling, strength checks, metadata, input modes."""

import numpy as np
import pytest
from PIL import Image
from task_inputs import FAST, write_photo

from diffcli.output import read_metadata


def test_img2img_keeps_the_input_size_and_records_its_settings(cli, tiny_model, tmp_path):
    photo = write_photo(tmp_path)
    result = cli("img2img", photo, "a cat", "--model", tiny_model, "--strength", "0.5", "--steps", "4", "--seed", "1", "-o", "i.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert Image.open("i.png").size == (60, 50) and "input resized" not in result.stderr
    record = result.json_lines()[0]
    assert (record["task"], record["strength"], record["input"], record["seed"]) == ("img2img", 0.5, str(photo), 1)
    assert read_metadata("i.png")["strength"] == 0.5


def test_img2img_rounds_to_the_model_multiple_and_says_so(cli, tiny_model, tmp_path):
    photo = write_photo(tmp_path, (61, 51))  # the tiny model's VAE has a multiple of 2
    result = cli("img2img", photo, "a cat", "--model", tiny_model, "--steps", "2", "--seed", "1", "-o", "r.png")
    assert result.exit_code == 0, result.stderr
    assert "input resized from 61x51 to 60x50" in result.stderr and Image.open("r.png").size == (60, 50)


@pytest.mark.parametrize("mode", ["fit", "crop", "stretch"])
def test_img2img_width_height_with_each_resize_mode(cli, tiny_model, tmp_path, mode):
    photo = write_photo(tmp_path)
    result = cli("img2img", photo, "a cat", "--model", tiny_model, "--width", "32", "--height", "24", "--resize", mode, "-o", "c.png",
                 "--steps", "2", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    assert Image.open("c.png").size == (32, 24) and "input resized from 60x50 to 32x24" in result.stderr


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "P"])
def test_img2img_accepts_other_modes(cli, tiny_model, tmp_path, mode):
    if mode == "I;16":
        Image.fromarray(np.full((24, 32), 30000, np.uint16)).save(tmp_path / "in.png")
    else:
        Image.new("RGB", (32, 24), (10, 200, 30)).convert(mode).save(tmp_path / "in.png")
    result = cli("img2img", tmp_path / "in.png", "a cat", "--model", tiny_model, "-o", "m.png", *FAST)
    assert result.exit_code == 0, result.stderr
    assert Image.open("m.png").mode == "RGB" and Image.open("m.png").size == (32, 24)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strength", "1.5"], "--strength must be between 0 and 1, got 1.5"),
        (["--strength", "0.1", "--steps", "5"], "--strength 0.1 x --steps 5 is less than one denoising step"),
        (["--strength", "0", "--steps", "5"], "--strength 0 would return the input unchanged"),
        (["--strength", "0.01"], "--strength 0.01 x --steps 50 is less than one denoising step"),  # the scheduler's default steps
        (["--resize", "zoom", "--width", "32"], "--resize must be one of fit, crop, stretch, got 'zoom'"),
        (["--width", "9000"], "--width must be between 8 and 8192, got 9000"),
    ],
)
def test_img2img_usage_errors(cli, tiny_model, tmp_path, args, message):
    result = cli("img2img", write_photo(tmp_path), "a cat", "--model", tiny_model, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not list(tmp_path.glob("outputs/*.png"))


def test_img2img_same_seed_same_image(cli, tiny_model, tmp_path):
    photo = write_photo(tmp_path, (32, 32))
    for name in ("a.png", "b.png"):
        assert cli("img2img", photo, "a cat", "--model", tiny_model, "-o", name, *FAST).exit_code == 0
    assert Image.open("a.png").tobytes() == Image.open("b.png").tobytes()


def test_replay_keeps_the_resize_mode(cli, tiny_model, tmp_path):
    """--resize crop with another size is recorded, so replay crops again (it padded: another image)."""
    photo = write_photo(tmp_path, (96, 64))
    made = cli("img2img", photo, "a cat", "--model", tiny_model, *FAST, "--width", "64", "--height", "64",
               "--resize", "crop", "-o", "c.png")
    assert made.exit_code == 0, made.stderr
    assert read_metadata("c.png")["resize"] == "crop"
    again = cli("replay", "c.png", "--verify", "-o", "again.png")
    assert again.exit_code == 0 and "verify: identical to c.png" in again.stderr, again.stderr
