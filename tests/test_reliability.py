"""Failures a user can cause or meet: one line, a documented exit code, nothing lost."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow_models import tiny_flux  # noqa: F401 (fixture)

from diffcli.output import read_metadata

FAST = ("--steps", "2", "--quiet")


class WritesMarker:
    """Unpickling this creates a folder: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def pickled_model(tiny_model, tmp_path) -> tuple[Path, Path]:
    """The tiny model with its UNet weights replaced by a malicious pickle."""
    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_model, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "PWNED"
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(WritesMarker(str(marker))))
    return folder, marker


@pytest.mark.parametrize("allow", [False, True])
def test_malicious_pickle_never_runs(cli, pickled_model, allow):
    folder, marker = pickled_model
    result = cli("txt2img", "a", "--model", folder, *(["--allow-pickle"] if allow else []), *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert ("pickle file" in result.stderr) if not allow else ("cannot load model" in result.stderr)
    assert not marker.exists()


def test_out_of_memory_ladder_recovers_and_records_it(cli, tiny_model, oom_twice):
    result = cli("txt2img", "a", "--model", tiny_model, "--seed", "1", "-N", "2", "--batch-size", "2", "-o", "o.png", "--steps", "2")
    assert result.exit_code == 0, result.stderr
    assert "retrying with attention slicing" in result.stderr and "retrying with VAE tiling" in result.stderr
    assert "out of memory: retried with VAE tiling" in read_metadata("o-1.png")["warnings"]


def test_out_of_memory_everywhere_is_a_clear_failure(cli, tiny_model, monkeypatch):
    import torch

    from diffcli import pipeline, run as generate

    monkeypatch.setattr(pipeline, "_CACHE", {})

    def always_oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(generate, "_generate_batch", always_oom)
    monkeypatch.setattr("diffusers.DiffusionPipeline.enable_model_cpu_offload", lambda self: None)
    result = cli("txt2img", "a", "--model", tiny_model, *FAST)
    assert result.exit_code == 1 and "out of GPU memory even with" in result.stderr
    assert not Path("outputs").exists() or not any(Path("outputs").iterdir())


@pytest.mark.slow  # starts a process
def test_non_utf8_prompt_is_a_usage_error(tiny_model, tmp_path):
    argv = [sys.executable.encode(), b"-m", b"diffcli", b"txt2img", b"caf\xe9", b"--model", str(tiny_model).encode()]
    result = subprocess.run(argv, capture_output=True, cwd=tmp_path)
    assert result.returncode == 2 and b"PROMPT is not valid UTF-8" in result.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow  # starts a process
def test_signal_keeps_finished_images_and_leaves_no_partial_file(tiny_model, tmp_path, signum, code):
    args = [sys.executable, "-m", "diffcli", "txt2img", "a", "--model", str(tiny_model), "-N", "200", "--seed", "1",
            "--steps", "4", "-o", "sig-{seed}.png", "--quiet"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline().strip()
    assert first == "sig-1.png"
    time.sleep(0.3)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != ".diffcli-home")
    assert not [n for n in written if n.endswith(".part") or n.startswith(".sig")]
    assert set(written) == {first, *out.split()} and 1 <= len(written) < 200
    assert all(read_metadata(tmp_path / name)["prompt"] == "a" for name in written)
    assert "Traceback" not in err


FLAGS = ["--cfg", "--steps", "--seed", "--width", "--height", "-N", "--batch-size", "--scheduler", "--device", "--dtype",
         "-o", "--model", "--negative", "--overwrite", "--json", "--bogus"]
VALUES = ["", "-1", "0", "1", "2", "3.5", "nan", "inf", "abc", "64", "99999999999999999999", "cuda:7", "fp16", "euler",
          "x.gif", "{nope}.png", "DPM++ 2M", "\x00", "é", "a/b", "./no.safetensors"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(FLAGS + VALUES), max_size=8))
def test_fuzzed_arguments_never_traceback(cli, tiny_model, args):
    result = cli("txt2img", "a cat", "--model", str(tiny_model), "--steps", "1", "--width", "16", "--height", "16",
                 "-o", "fuzz-{seed}.png", "--overwrite", *args)
    assert result.exit_code in (0, 1, 2), result
    assert "Traceback" not in result.stderr and "error: unexpected " not in result.stderr, result.stderr
    assert not list(Path().glob("*.part")) and not list(Path().glob(".*.part"))


def _png_header_then(data: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300).map(lambda b: b if len(b) % 2 else _png_header_then(b)), st.sampled_from(["image", "mask", "jobs"]))
def test_fuzzed_files_never_traceback(cli, tiny_model, data, role):
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save("good.png")
    Path("fuzz.bin").write_bytes(data)
    if role == "image":
        result = cli("img2img", "fuzz.bin", "a cat", "--model", tiny_model, "--steps", "2", "-o", "f.png", "--overwrite")
    elif role == "mask":
        result = cli("inpaint", "good.png", "a cat", "--mask", "fuzz.bin", "--model", tiny_model, "--steps", "2", "-o", "f.png", "--overwrite")
    else:
        result = cli("batch", "fuzz.bin", "--model", tiny_model, "--steps", "1", "--width", "16", "--height", "16", "-o", "fb/", "--dry-run")
    assert result.exit_code in (0, 1, 2), result
    assert "Traceback" not in result.stderr and "error: unexpected " not in result.stderr, result.stderr
    assert not [p for p in Path().rglob("*") if p.name.endswith(".part")]


def test_folder_with_missing_component_or_wrong_architecture(cli, tiny_model, tmp_path):
    broken = tmp_path / "no-unet"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    missing = cli("txt2img", "a", "--model", broken, *FAST)
    assert missing.exit_code == 2 and "unet/config.json is missing" in missing.stderr
    wrong = tmp_path / "wrong-arch"
    shutil.copytree(tiny_model, wrong)
    config = json.loads((wrong / "unet" / "config.json").read_text())
    (wrong / "unet" / "config.json").write_text(json.dumps(dict(config, block_out_channels=[16, 32])))
    result = cli("txt2img", "a", "--model", wrong, *FAST)
    assert result.exit_code == 2 and "cannot load model" in result.stderr and "Traceback" not in result.stderr


def test_non_finite_pixels_of_a_transformer_family_are_one_clear_error(cli, tiny_flux, monkeypatch):
    """FLUX.1's latents are packed: the SD retry (decode latents / scaling factor) cannot apply; it says so instead."""
    from diffusers import AutoencoderKL

    real_decode = AutoencoderKL.decode

    def nan(self, *args, **kwargs):
        out = real_decode(self, *args, **kwargs)
        (out[0] if isinstance(out, tuple) else out.sample).fill_(float("nan"))
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", nan)
    result = cli("txt2img", "a", "--model", tiny_flux, "-o", "nan.png", "--seed", "1", "--steps", "2", "--width", "32",
                 "--height", "32")
    assert result.exit_code == 1, result.stderr
    assert "diffcli: error: the VAE produced NaN/Inf pixels; no image was saved (try --dtype bf16 or fp32)" in result.stderr
    assert not Path("nan.png").exists()


def test_non_finite_pixels_retry_the_vae_in_fp32_and_record_it(cli, tiny_model, monkeypatch):
    from diffusers import AutoencoderKL

    real_decode, calls = AutoencoderKL.decode, []

    def nan_once(self, *args, **kwargs):
        calls.append(1)
        out = real_decode(self, *args, **kwargs)
        if len(calls) == 1:
            (out[0] if isinstance(out, tuple) else out.sample).fill_(float("nan"))
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", nan_once)
    result = cli("txt2img", "a", "--model", tiny_model, "-o", "retry.png", "--seed", "1", "--steps", "2")
    assert result.exit_code == 0, result.stderr
    assert read_metadata("retry.png")["warnings"] == ["vae decode retried in fp32 after non-finite pixels"]
    assert len(calls) == 2
