"""The bundled tiny-shapes says what it was not trained for: unknown prompt words, sizes, outpaint, hires strength.

One stderr line each at plan time (none with --quiet), the same lines in the image's metadata `warnings`, and none
for a model whose diffcli.json has no `limits` (every model but tiny-shapes).
"""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from diffcli import limits
from diffcli.models import BUNDLED_DIR, resolve_model
from diffcli.jobs import build
from diffcli.output import read_metadata
from diffcli.plan import plan_job
from diffcli.shapes import vocabulary, world

SHAPES = resolve_model("tiny-shapes")
IGNORES = ("tiny-shapes ignores: sports, car; it knows 5 shapes, 8 colours, sizes, positions, relations; "
           "see docs/bundled-model.md")


def job(command: str = "txt2img", **values):
    """One Job of the builder every command uses."""
    return build(command, dict(values, seed=values.get("seed", 1)))[0]


def warnings_of(prompt: str = "a red circle", negative: str = "", **values) -> list[str]:
    """The plan-time warnings of a job on the bundled model (no weights load)."""
    return plan_job(job(prompt=prompt, negative=negative, out="out/", **values)).warnings


def test_known_words_are_the_grammar_words_the_tokenizer_keeps_whole(tmp_path):
    assert vocabulary.known_words(SHAPES.location) == frozenset(world.vocabulary())
    tokens = json.loads((BUNDLED_DIR / "tiny-shapes" / "tokenizer" / "vocab.json").read_text())
    del tokens["star</w>"]  # a tokenizer that splits "star" does not know it
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(tokens))
    assert vocabulary.known_words(str(tmp_path)) == frozenset(world.vocabulary()) - {"star"}
    assert vocabulary.summary() == f"{len(world.SHAPES)} shapes, {len(world.COLOURS)} colours, sizes, positions, relations"


@pytest.mark.parametrize(("prompt", "negative", "unknown"), [
    ("a red sports car", "", ["sports", "car"]),
    ("a big yellow star at the top on a purple background", "", []),
    ("(a red:1.3) [circle] BREAK on blue <lora:style:0.5>", "", []),  # weights, BREAK and LoRA tags are not words
    ("Two RED circles!", "blurry", ["two", "circles", "blurry"]),  # lowercased; the negative prompt counts too
])
def test_unknown_words(prompt, negative, unknown):
    found, knows = limits.unknown_words(SHAPES, job(prompt=prompt, negative=negative), "shapes")
    assert found == unknown and (knows or not unknown)


def test_many_unknown_words_are_counted_not_listed():
    [line] = warnings_of("alpha beta gamma delta epsilon zeta eta theta iota kappa circle")
    assert line.startswith("tiny-shapes ignores: alpha, beta, gamma, delta, epsilon, zeta, eta, theta and 2 more; it knows")


@pytest.mark.parametrize(("job", "expected"), [
    ({}, []),
    ({"width": 256, "height": 256}, ["tiny-shapes was trained at 128x128 only: at 256x256 it repeats objects to fill "
                                     "the canvas; see docs/bundled-model.md"]),
    ({"width": 64, "height": 64}, ["tiny-shapes was trained at 128x128 only: at 64x64 it comes out as noise rather "
                                   "than shapes; see docs/bundled-model.md"]),
])
def test_size_warnings(job, expected):
    assert warnings_of(**job) == expected


def test_outpaint_warns():
    outpaint = job("outpaint", input="in.png", prompt="a red circle")
    assert limits.check(SHAPES, outpaint, 128, 128) == [
        f"tiny-shapes was not trained to outpaint: {SHAPES.defaults['limits']['outpaint']}; see docs/bundled-model.md"]


def test_hires_falls_back_to_the_models_strength_and_steps_and_always_warns():
    """Measured (lab/hires_defaults.py): no --hires-strength keeps tiny-shapes' objects at 256 px."""
    defaults = SHAPES.defaults
    plan = plan_job(job(prompt="a red circle", out="out/", hires=2.0))
    second = plan.job.second
    assert (second.hires_strength, second.hires_steps) == (defaults["hires_strength"], defaults["hires_steps"])
    assert plan.warnings == [f"tiny-shapes with --hires: {defaults['limits']['hires']}; see docs/bundled-model.md"]
    given = plan_job(job(prompt="a red circle", out="out/", hires=2.0, hires_steps=4, hires_strength=0.5)).job.second
    assert (given.hires_strength, given.hires_steps) == (0.5, 4)  # what the user gave stays


def test_a_hires_strength_limit_warns_only_above_it():
    spec = replace(SHAPES, defaults={"hires_strength": 0.3, "limits": {"hires_strength_max": 0.4}})
    hires = lambda strength: job(prompt="a", hires=2.0, hires_strength=strength)  # noqa: E731
    assert limits.check(spec, hires(0.4), 128, 128) == []
    assert limits.check(spec, hires(0.7), 128, 128) == [
        "--hires-strength 0.7 re-draws tiny-shapes's objects at the larger size (extra or missing shapes above 0.4); "
        "its default is 0.3"]


def test_other_models_have_no_limits_and_keep_the_old_hires_default(tiny_model):
    plan = plan_job(job(prompt="a red sports car", model=str(tiny_model), width=256, height=256, out="out/", hires=2.0))
    assert plan.warnings == [] and plan.job.second.hires_strength == 0.7
    for helper in ("tiny-shapes-refiner", "tiny-shapes-x4"):
        assert "limits" not in resolve_model(helper).defaults


def test_cli_prints_one_line_per_limit_and_records_them(cli):
    result = cli("txt2img", "a red sports car", "--seed", "1", "--steps", "2", "--width", "64", "--height", "64",
                 "-o", "car.png")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines.count(IGNORES) == 1 and sum(line.startswith("tiny-shapes was trained at 128x128") for line in lines) == 1
    assert read_metadata("car.png")["warnings"][:2] == [IGNORES, lines[lines.index(IGNORES) + 1]]
    quiet = cli("txt2img", "a red sports car", "--seed", "1", "--steps", "2", "-o", "quiet.png", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert read_metadata("quiet.png")["warnings"] == [IGNORES]  # --quiet silences stderr, not the record


def test_cli_sweep_prints_a_line_once(cli):
    result = cli("txt2img", "a red sports car", "--seed", "1,2", "--steps", "2", "-o", "{seed}.png")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines().count(IGNORES) == 1


def test_cli_non_shapes_model_prints_nothing_of_the_kind(cli, tiny_model):
    result = cli("txt2img", "a red sports car", "--model", tiny_model, "--seed", "1", "--steps", "2", "-o", "m.png")
    assert result.exit_code == 0, result.stderr
    assert "ignores" not in result.stderr and "trained at" not in result.stderr
    assert read_metadata("m.png")["warnings"] == []


def test_cli_outpaint_and_hires_warnings(cli, tmp_path):
    Image.fromarray(np.full((64, 64, 3), (30, 70, 225), np.uint8)).save(tmp_path / "blue.png")
    result = cli("outpaint", tmp_path / "blue.png", "a red circle", "--extend", "all=32", "--seed", "1", "--steps", "2",
                 "-o", "o.png")
    assert result.exit_code == 0, result.stderr
    assert "tiny-shapes was not trained to outpaint: the new area repeats the scene's objects (" in result.stderr
    assert any("not trained to outpaint" in w for w in read_metadata("o.png")["warnings"])
    hires = cli("txt2img", "a red circle", "--hires", "2", "--seed", "1", "--steps", "2", "-o", "h.png")
    assert hires.exit_code == 0, hires.stderr
    assert [line for line in hires.stderr.splitlines() if line.startswith("tiny-shapes with --hires: ")] == \
        read_metadata("h.png")["warnings"]
    assert (read_metadata("h.png")["hires_strength"], read_metadata("h.png")["hires_steps"]) == (0.02, 50)
