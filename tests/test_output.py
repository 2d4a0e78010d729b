"""Output naming, no-overwrite, atomic writes and metadata."""

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from PIL import Image

from diffcli import output
from diffcli.errors import RuntimeFailure, UsageError

FIELDS = {"slug": "a-red-car", "prompt": "a red car", "model": "m", "steps": 20, "cfg": "7.5", "scheduler": "euler",
          "width": 64, "height": 64}
META = {"prompt": "a red car", "negative": "blurry", "steps": 20, "sampler": "Euler a", "cfg": 7.5, "seed": 42,
        "width": 64, "height": 48, "model": "tiny", "model_hash": "abc1234567", "versions": {"diffcli": "0.1.0"}}


def test_default_folder_and_running_index(tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "00007-1-old.png").write_bytes(b"x")
    paths = output.plan_paths(None, [5, 6], FIELDS, overwrite=False)
    assert paths == [Path("outputs/00008-5-a-red-car.png"), Path("outputs/00009-6-a-red-car.png")]


def test_file_template_and_numbered_files():
    assert output.plan_paths("car.png", [1], FIELDS, False) == [Path("car.png")]
    assert output.plan_paths("car.jpg", [1, 2], FIELDS, False) == [Path("car-1.jpg"), Path("car-2.jpg")]
    assert output.plan_paths("out/{seed}-{cfg}.webp", [3], FIELDS, False) == [Path("out/3-7.5.webp")]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("x/{nope}.png", "unknown field {nope}"),
        ("x.gif", "unsupported image type '.gif'"),
        ("same.png-{model}.png", "same name"),
    ],
)
def test_bad_templates(out, message):
    with pytest.raises(UsageError, match=message):
        output.plan_paths(out, [1, 2], FIELDS, False)


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    Path("taken.png").write_bytes(b"old")
    with pytest.raises(UsageError, match="taken.png already exists"):
        output.plan_paths("taken.png", [1], FIELDS, False)
    assert output.plan_paths("taken.png", [1], FIELDS, True) == [Path("taken.png")]


def test_parent_that_is_a_file_is_refused():
    Path("afile").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        output.plan_paths("afile/sub/x.png", [1], FIELDS, False)


def test_write_atomic_no_overwrite_race_and_cleanup(tmp_path):
    target = tmp_path / "a.png"
    output.write_atomic(target, b"one", overwrite=False)
    with pytest.raises(UsageError):
        output.write_atomic(target, b"two", overwrite=False)
    assert target.read_bytes() == b"one"
    output.write_atomic(target, b"three", overwrite=True)
    assert target.read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_failing_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(RuntimeFailure, match="No space left on device"):
        output.write_atomic(tmp_path / "b.png", b"data", overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_right_after_the_temp_file_is_made_waits_for_the_write(tmp_path, monkeypatch):
    real_temp_file = output._temp_file

    def temp_file_then_ctrl_c(path):
        made = real_temp_file(path)
        os.kill(os.getpid(), signal.SIGINT)  # without held signals this lands before the cleanup can see the file
        return made

    monkeypatch.setattr(output, "_temp_file", temp_file_then_ctrl_c)
    idle = threading.Event()
    worker = threading.Thread(target=idle.wait)  # like torch's workers: a thread the kernel may hand the signal to
    worker.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            output.write_atomic(tmp_path / "c.png", b"whole", overwrite=False)
    finally:
        idle.set()
        worker.join()
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]
    assert (tmp_path / "c.png").read_bytes() == b"whole"


def test_png_metadata_round_trip(tmp_path):
    path = tmp_path / "m.png"
    output.write_atomic(path, output.encode_image(Image.new("RGB", (8, 8)), path, META), False)
    assert output.read_metadata(path) == META
    parameters = Image.open(path).info["parameters"]
    assert parameters == (
        "a red car\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x48, "
        "Model hash: abc1234567, Model: tiny, Version: diffcli 0.1.0"
    )


def test_jpeg_carries_parameters_in_exif(tmp_path):
    path = tmp_path / "m.jpg"
    output.write_atomic(path, output.encode_image(Image.new("RGB", (8, 8)), path, META), False)
    comment = Image.open(path).getexif().get_ifd(output.EXIF_IFD)[output.EXIF_USER_COMMENT]
    assert comment[8:].decode("utf-16-be").startswith("a red car\nNegative prompt: blurry")
    assert json.dumps(META)  # metadata stays JSON-serialisable


def test_slugify():
    assert output.slugify("A (red:1.2) car, at NIGHT!") == "a-red-1-2-car-at-night"
    assert output.slugify("!!!") == "image"
