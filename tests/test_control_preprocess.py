"""Control maps (diffcli/control.py) and `diffcli preprocess`: the built-in preprocessors on known inputs, the type
parser's errors, the command's files and refusals. No model: numpy and Pillow only (cv2 is compared only if present)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcli import control
from diffcli.control import ANNOTATORS, PREPROCESSORS, SOBEL_MAX, canny, parse_type
from diffcli.errors import UsageError


def rgb(array) -> Image.Image:
    array = np.asarray(array, dtype=np.uint8)
    return Image.fromarray(np.stack([array] * 3, -1) if array.ndim == 2 else array, "RGB")


def white(image) -> np.ndarray:
    """The map's white pixels (every map is grey: R = G = B)."""
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels == pixels[..., :1]).all()
    return pixels[..., 0] > 127


def square(size: int = 64, low: int = 16, high: int = 48) -> Image.Image:
    array = np.zeros((size, size), np.uint8)
    array[low:high, low:high] = 255
    return rgb(array)


def line_drawing() -> Image.Image:
    """A 2 px black horizontal line (rows 31-32) on white."""
    array = np.full((64, 64), 255, np.uint8)
    array[31:33, 8:56] = 0
    return rgb(array)


# --- canny


def test_canny_edges_of_a_filled_square_lie_on_its_border():
    edges = white(canny(square()))
    rows, cols = np.nonzero(edges)
    near = lambda v: (np.abs(v - 15.5) <= 1) | (np.abs(v - 47.5) <= 1)  # noqa: E731  within 1 px of the border lines
    inside = lambda v: (v >= 15) & (v <= 48)  # noqa: E731
    assert (inside(rows) & inside(cols) & (near(rows) | near(cols))).all(), "an edge off the square's border"
    for side in (edges[14:18, 17:47], edges[46:50, 17:47], edges[17:47, 14:18].T, edges[17:47, 46:50].T):
        assert side.any(axis=0).all(), "every side is edged along its whole length"


def test_canny_thresholds_above_the_gradient_give_an_empty_map():
    assert not white(canny(square(), SOBEL_MAX, SOBEL_MAX)).any()
    assert not white(canny(rgb(np.full((32, 48), 90)))).any()


def test_canny_hysteresis_keeps_weak_edges_only_when_joined_to_strong_ones():
    """A vertical step of 255 (strong) continued by one of 40 (gradient 160: weak for 100/200)."""
    joined = np.zeros((64, 64), np.uint8)
    joined[:, 32:] = 255
    joined[32:, :32] = 215
    assert white(canny(rgb(joined)))[32:, 31].all()
    alone = joined.copy()
    alone[:32, :32] = 215
    assert not white(canny(rgb(alone))).any()
    assert white(canny(rgb(alone), 100, 150))[:, 31].all()


def test_canny_matches_opencv_when_it_is_installed():
    cv2 = pytest.importorskip("cv2")
    noise = np.random.default_rng(0).integers(0, 256, (33, 41, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((320, 256), Image.BICUBIC)  # smooth colour blobs: every direction occurs
    ours, theirs = white(canny(image, 50, 150)), cv2.Canny(np.ascontiguousarray(np.asarray(image)), 50, 150) > 0
    # the same algorithm, bin for bin: identical with opencv-python-headless 5.1; 0.99 leaves room for other versions
    assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.99


def test_canny_on_1024_square_finishes():
    noise = np.random.default_rng(1).integers(0, 256, (129, 129, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((1024, 1024), Image.BICUBIC)
    edges = canny(image)
    assert edges.size == (1024, 1024) and 0 < white(edges).sum() < 1024 * 1024


# --- the other built-ins


@pytest.mark.parametrize("name", sorted(PREPROCESSORS))
def test_every_builtin_returns_an_rgb_map_of_the_input_size(name):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (23, 37, 3), dtype=np.uint8))
    result = PREPROCESSORS[name].function(image)
    assert result.mode == "RGB" and result.size == (37, 23)


def test_threshold_whitens_pixels_at_or_below_the_level():
    ramp = rgb(np.tile(np.arange(256, dtype=np.uint8), (4, 1)))
    assert (white(control.threshold(ramp, 100))[0] == (np.arange(256) <= 100)).all()
    two = np.full((8, 8), 200, np.uint8)
    two[:, :3] = 40  # level 0: Otsu splits the two greys
    assert (white(control.threshold(rgb(two), 0)) == (two == 40)).all()


def test_scribble_marks_dark_strokes_and_thicken_widens_them():
    thin, wide = white(control.scribble(line_drawing(), thicken=0)), white(control.scribble(line_drawing(), thicken=2))
    assert thin[31:33, 12:52].all() and not thin[:20].any() and not thin[45:].any()
    assert wide.sum() > thin.sum() and (wide | thin == wide).all()
    assert not white(control.scribble(rgb(np.full((32, 32), 255)))).any()


def test_lineart_turns_dark_lines_white_on_black():
    """The typical line is scaled to 127 (controlnet_aux's normalisation by the median)."""
    lines = np.asarray(control.lineart(line_drawing()))[..., 0]
    assert lines[31:33, 12:52].min() >= 100 and lines[:20].max() == 0 and lines[45:].max() == 0


def test_tile_keeps_coarse_content_and_drops_fine_detail():
    checker = rgb((np.indices((64, 64)).sum(0) % 2) * 255)
    assert np.array_equal(np.asarray(control.tile(checker, 1.0)), np.asarray(checker))
    blurred = np.asarray(control.tile(checker, 4.0), dtype=float)
    assert np.abs(blurred - 127.5).max() < 20  # the 1 px checker averages to grey
    flat = rgb(np.full((40, 24), 77))
    assert np.array_equal(np.asarray(control.tile(flat, 3.0)), np.asarray(flat))


def test_none_is_the_image_itself():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(control.none(image)), np.asarray(image))


# --- the type parser


@pytest.mark.parametrize("text, expected", [
    ("canny", ("canny", {"low": 100, "high": 200})),
    ("canny:low=50,high=150", ("canny", {"low": 50, "high": 150})),
    (" Canny : high = 250 ", ("canny", {"low": 100, "high": 250})),
    ("threshold:level=128", ("threshold", {"level": 128})),
    ("tile:factor=4", ("tile", {"factor": 4.0})),
    ("scribble:thicken=0", ("scribble", {"level": 32, "thicken": 0})),
    ("none", ("none", {})),
    ("depth", ("depth", {})),
])
def test_parse_type(text, expected):
    assert parse_type(text) == expected


@pytest.mark.parametrize("text, words", [
    ("sobel", ["--type: unknown type, got 'sobel'", "canny, scribble", "depth"]),
    ("canny:lo=3", ["--type canny: unknown parameter, got 'lo'", "low, high"]),
    ("canny:low=abc", ["low must be an integer, got 'abc'"]),
    ("canny:low=1.5", ["low must be an integer, got '1.5'"]),
    ("canny:low=nan", ["low must be an integer, got 'nan'"]),
    ("tile:factor=inf", ["factor must be a number, got 'inf'"]),
    ("canny:high=5000", ["high must be in 0..2040, got '5000'"]),
    ("tile:factor=0.5", ["factor must be in 1..8, got '0.5'"]),
    ("canny:low=50,low=60", ["low given twice"]),
    ("canny:low", ["parameters are KEY=VALUE, got 'low'", "canny:low=100,high=200"]),
    ("canny:", ["parameters are KEY=VALUE, got ''"]),
    ("canny:low=250", ["low must not exceed high, got low=250 high=200"]),
    ("none:x=1", ["--type none: takes no parameters, got 'x=1'"]),
    ("depth:x=1", ["--type depth: takes no parameters"]),
])
def test_parse_type_errors_name_what_is_wrong(text, words):
    with pytest.raises(UsageError) as caught:
        parse_type(text)
    for word in words:
        assert word in str(caught.value)


def test_the_type_help_names_every_type():
    from diffcli.flags import PREPROCESS

    for name in [*PREPROCESSORS, *ANNOTATORS]:
        assert name in PREPROCESS["type"].help


# --- diffcli preprocess


@pytest.fixture
def picture(isolated) -> Path:
    square().save(isolated / "sq.png")
    return isolated / "sq.png"


def one_error_line(result) -> str:
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    return line


def test_preprocess_writes_the_map_and_prints_its_path(cli, picture):
    result = cli("preprocess", picture)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "outputs/sq-canny.png\n"
    written = Image.open("outputs/sq-canny.png")
    assert np.array_equal(white(written.convert("RGB")), white(canny(square())))
    assert json.loads(written.info[control.METADATA_KEY])["params"] == {"low": 100, "high": 200}


def test_preprocess_json_record_and_folder_output(cli, picture):
    result = cli("preprocess", picture, "--type", "threshold:level=10", "-o", "maps/", "--json")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    assert record == {"path": "maps/sq-threshold.png", "input": str(picture), "type": "threshold",
                      "params": {"level": 10}, "width": 64, "height": 64}
    assert Path("maps/sq-threshold.png").is_file()
    assert cli("preprocess", picture, "-o", ".").stdout == "sq-canny.png\n"  # an existing folder


def test_preprocess_refuses_to_overwrite_unless_asked(cli, picture):
    assert cli("preprocess", picture, "-o", "map.png").exit_code == 0
    before = Path("map.png").read_bytes()
    refused = cli("preprocess", picture, "-o", "map.png", "--type", "none")
    assert "map.png already exists" in one_error_line(refused) and Path("map.png").read_bytes() == before
    replaced = cli("preprocess", picture, "-o", "map.png", "--type", "none", "--overwrite")
    assert replaced.exit_code == 0 and np.array_equal(np.asarray(Image.open("map.png")), np.asarray(square()))


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "IMAGE"),  # a PNG signature, then nothing
    (lambda p: p.write_text("not an image"), "not an image file"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_preprocess_hostile_inputs_are_one_line_exit_2(cli, isolated, make, words):
    path = isolated / "bad.png"
    make(path)
    assert words in one_error_line(cli("preprocess", path))
    assert not Path("outputs").exists()


def test_preprocess_truncated_png_is_one_line_exit_2(cli, picture, isolated):
    data = picture.read_bytes()
    (isolated / "cut.png").write_bytes(data[:len(data) // 2])
    assert "cut.png" in one_error_line(cli("preprocess", isolated / "cut.png"))


@pytest.mark.parametrize("args, words", [
    (["--type", "sobel"], "unknown type, got 'sobel' (one of: canny"),
    (["--type", "canny:low=-1"], "low must be in 0..2040, got '-1'"),
    (["-o", "map.txt"], "--out: a control map is written as PNG, got '.txt'"),
    (["-o", "map.jpg"], "--out: a control map is written as PNG, got '.jpg'"),
])
def test_preprocess_bad_flags_are_one_line_exit_2(cli, picture, args, words):
    assert words in one_error_line(cli("preprocess", picture, *args))


def test_a_missing_controlnet_aux_is_one_line_naming_the_install(cli, picture, monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    line = one_error_line(cli("preprocess", picture, "--type", "depth"))
    assert "pip install controlnet_aux" in line and "$DIFFCLI_ANNOTATORS" in line


def test_annotators_load_only_from_the_local_folder_and_only_with_allow_pickle(cli, picture, monkeypatch, isolated):
    """A stand-in controlnet_aux: the detector is built from $DIFFCLI_ANNOTATORS and its map resized to the input."""
    loaded = []

    class Detector:
        @classmethod
        def from_pretrained(cls, folder):
            loaded.append(folder)
            return cls()

        def __call__(self, image):
            return Image.new("L", (32, 32), 200)

    monkeypatch.setitem(sys.modules, "controlnet_aux", types.SimpleNamespace(MidasDetector=Detector))
    assert "no dpt_hybrid-midas-501f0c75.pt in $DIFFCLI_ANNOTATORS, got (unset)" in one_error_line(
        cli("preprocess", picture, "--type", "depth", "--allow-pickle"))
    folder = isolated / "annotators"
    folder.mkdir()
    (folder / ANNOTATORS["depth"][1]).write_bytes(b"weights")
    monkeypatch.setenv("DIFFCLI_ANNOTATORS", str(folder))
    assert "--allow-pickle" in one_error_line(cli("preprocess", picture, "--type", "depth"))
    assert loaded == []
    result = cli("preprocess", picture, "--type", "depth", "--allow-pickle", "-o", "depth.png")
    assert result.exit_code == 0, result.stderr
    assert loaded == [str(folder)]
    made = Image.open("depth.png")
    assert made.size == (64, 64) and made.mode == "RGB" and np.asarray(made).min() == 200
