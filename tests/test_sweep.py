"""Sweeps through the CLI: comma lists -> one job per combination, names that never clash, the X/Y grid."""

import json
from pathlib import Path

import pytest
from PIL import Image

from diffcli.output import read_metadata
from diffcli.sweep import grid_layout, parse_cfg, parse_seed


def test_parsers_take_one_value_or_a_comma_list():
    assert parse_cfg("7.5") == (7.5,) and parse_cfg("5, 7.5,10") == (5.0, 7.5, 10.0)
    assert parse_seed("1,2") == (1, 2) and parse_seed("20.0") == (20,)


def test_grid_layout_puts_the_first_varying_axis_on_x():
    records = [{"cfg": c, "steps": s, "scheduler": "euler", "seed": 1, "path": "p"} for s in (2, 3) for c in (5.0, 7.0)]
    assert grid_layout(records) == ("cfg", ["steps"], [5.0, 7.0], [(2,), (3,)])


def test_cfg_and_steps_sweep_with_grid(cli, tiny_model):
    result = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "4", "--cfg", "3,7", "--steps", "1,2", "--grid", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    *images, sheet = result.json_lines()
    assert [(r["cfg"], r["steps"]) for r in images] == [(3.0, 1), (3.0, 2), (7.0, 1), (7.0, 2)]
    assert [Path(r["path"]).name for r in images] == [f"0000{i}-4-a-cat.png" for i in range(4)]
    assert read_metadata(images[3]["path"])["cfg"] == 7.0
    assert (sheet["x"], sheet["y"], sheet["columns"], sheet["rows"]) == ("cfg", ["steps"], ["cfg 3", "cfg 7"], ["steps 1", "steps 2"])
    grid = Image.open(sheet["grid"])
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # two cells each way plus the labels
    assert json.loads(grid.info["diffcli"])["images"] == [r["path"] for r in images]


def test_seed_and_scheduler_sweep_prints_paths_then_grid(cli, tiny_model):
    result = cli("txt2img", "a", "--model", tiny_model, "--steps", "1", "--seed", "1,2", "--scheduler", "euler,ddim",
                 "-o", "sw/{scheduler}-{seed}.png", "--grid", "--quiet")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.split()
    assert lines[:4] == ["sw/euler-1.png", "sw/euler-2.png", "sw/ddim-1.png", "sw/ddim-2.png"]
    assert lines[4] == "sw/grid-euler-1.png" and Path(lines[4]).is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cfg", "5,x"], "Invalid value for '--cfg': 'x' is not a number"),
        (["--cfg", "5,"], "Invalid value for '--cfg': '' is not a number"),
        (["--steps", "2,2.5"], "Invalid value for '--steps': '2.5' is not an integer"),
        (["--seed", "1,b"], "Invalid value for '--seed': 'b' is not an integer"),
        (["--steps", "2,0"], "--steps must be between 1 and 1000, got 0"),
        (["--cfg", "5,500"], "--cfg must be between 0 and 100, got 500"),
        (["--scheduler", "euler,nope"], "--scheduler 'nope' is unknown"),
        (["--cfg", "5,7", "-o", "one.png"], "gives several images the name one.png"),
    ],
)
def test_bad_sweeps_fail_before_any_image(cli, tiny_model, args, message):
    result = cli("txt2img", "a", "--model", tiny_model, "--steps", "1", *args) if "--steps" not in args else \
        cli("txt2img", "a", "--model", tiny_model, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not Path("outputs").exists() and not Path("one.png").exists()


def test_image_commands_sweep_and_grid(cli, tiny_model, tmp_path):
    from task_inputs import write_mask, write_photo

    photo, mask = write_photo(tmp_path, (64, 64)), write_mask(tmp_path, (64, 64))
    result = cli("img2img", photo, "a cat", "--model", tiny_model, "--steps", "2,4", "--seed", "5", "--strength", "0.5",
                 "-o", "i2i/{steps}.png", "--grid", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    *images, sheet = result.json_lines()
    assert [(r["task"], r["steps"], r["strength"]) for r in images] == [("img2img", 2, 0.5), ("img2img", 4, 0.5)]
    assert (sheet["x"], sheet["columns"]) == ("steps", ["steps 2", "steps 4"]) and Path(sheet["grid"]).is_file()
    result = cli("inpaint", photo, "a cat", "--mask", mask, "--model", tiny_model, "--steps", "2", "--cfg", "3,6",
                 "--seed", "1,2", "-o", "inp/{cfg}-{seed}.png", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == ["inp/3-1.png", "inp/3-2.png", "inp/6-1.png", "inp/6-2.png"]


def test_image_sweep_checks_strength_for_every_step_count_first(cli, tiny_model, tmp_path):
    from task_inputs import write_photo

    result = cli("img2img", write_photo(tmp_path), "a cat", "--model", tiny_model, "--steps", "10,2", "--strength", "0.3",
                 "-o", "s/{steps}.png")
    assert result.exit_code == 2 and "--strength 0.3 x --steps 2 is less than one denoising step" in result.stderr
    assert not Path("s").exists()


def test_sweep_without_seed_uses_one_random_seed_for_every_cell(cli, tiny_model):
    result = cli("txt2img", "a", "--model", tiny_model, "--steps", "1", "--cfg", "3,5,7", "-o", "r/{cfg}.png", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert len({record["seed"] for record in result.json_lines()}) == 1
