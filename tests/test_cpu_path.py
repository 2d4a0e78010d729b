"""The CPU fast path (diffcli/cpu.py): which dtype `--dtype auto` picks from the CPU's flags and the denoiser's size,
that the bf16 path runs end to end through the CLI with channels_last, and that --dtype overrides it. Timings are
measured by `diffcli bench --compare plain,openvino` (docs/performance.md), never asserted here."""

import struct

import numpy as np
import pytest
from PIL import Image

from diffcli import cpu, models, pipeline

FAST = ("--steps", "2", "--seed", "5", "--device", "cpu")
AMX = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


@pytest.mark.parametrize(("flags", "parameters", "expected"), [
    (frozenset(), 860_000_000, "fp32"),  # no flags known (not Linux, or an old CPU)
    (frozenset({"avx2", "fma"}), 860_000_000, "fp32"),
    (frozenset({"avx512f", "avx512_bf16"}), 860_000_000, "bf16"),  # AMD Zen 4: bf16 instructions, no AMX tiles
    (frozenset({"avx512f", "avx512_bf16"}), 9_400_000, "fp32"),
    (frozenset({"avx512f", "avx512_fp16", "avx512vl"}), 860_000_000, "fp32"),  # fp16 instructions are not bf16 ones
    (AMX, 860_000_000, "bf16"),  # SD 1.5's U-Net on a Xeon with AMX
    (AMX, None, "bf16"),  # unknown size (a Hub model not downloaded yet): taken as large
    (AMX, 9_400_000, "fp32"),  # tiny-shapes: overhead-bound
    (AMX, cpu.MIN_PARAMETERS, "bf16"),
])
def test_the_dtype_follows_the_cpu_and_the_denoiser_size(flags, parameters, expected):
    dtype, why = cpu.choose(flags, parameters)
    assert dtype == expected and why


def test_the_denoiser_size_is_read_from_headers_without_loading(tiny_model):
    from diffusers import UNet2DConditionModel

    spec = models.resolve_model(str(tiny_model))
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    assert cpu.denoiser_parameters(spec) == sum(p.numel() for p in unet.parameters())
    assert cpu.denoiser_parameters(models.resolve_model(None)) == pytest.approx(9.35e6, rel=0.02)  # the bundled U-Net


def test_an_unreadable_denoiser_counts_as_unknown(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    spec = models.resolve_model(str(folder))
    for path in (folder / "unet").glob("*.safetensors"):
        path.write_bytes(struct.pack("<Q", 10**12) + b"{")  # a header longer than the file: truncated
    assert cpu.denoiser_parameters(spec) is None


def run_json(cli, *args) -> dict:
    result = cli("txt2img", "a red car", *args, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    return result.json_lines()[0], result.stderr


@pytest.fixture(autouse=True)
def fresh_pipelines(monkeypatch):
    """Each test loads its models afresh (the path is chosen, and said, when a model loads) and chooses its engine
    afresh (backend.openvino_pays is decided once per process)."""
    from diffcli import backend

    monkeypatch.setattr(pipeline, "_CACHE", {})
    backend.openvino_pays.cache_clear()
    yield
    backend.openvino_pays.cache_clear()


@pytest.fixture
def amx(monkeypatch):
    """This CPU as one with AMX, and every denoiser large enough for the fast path."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AMX)
    monkeypatch.setattr(cpu, "MIN_PARAMETERS", 0)
    cpu.auto_dtype.cache_clear()
    yield
    cpu.auto_dtype.cache_clear()


def test_auto_runs_bf16_in_channels_last_where_it_pays_and_says_so(cli, tiny_model, amx, monkeypatch):
    import torch

    from diffcli import extras

    monkeypatch.setattr(extras, "available", lambda module: module != "openvino")  # torch's path (test_openvino: auto's)
    placed = []
    original = cpu.place
    monkeypatch.setattr(cpu, "place", lambda pipe: placed.append(pipe) or original(pipe))
    record, stderr = run_json(cli, "--model", tiny_model, "-o", "auto.png")
    assert record["dtype"] == "bfloat16"
    assert record["optimizations"][-1] == "cpu bf16 + channels_last (this CPU has amx_bf16)"
    assert "cpu bf16 + channels_last (this CPU has amx_bf16)" in stderr
    unet = placed[0].unet
    weight = next(p for p in unet.parameters() if p.dim() == 4)
    assert unet.dtype == torch.bfloat16 and weight.is_contiguous(memory_format=torch.channels_last)
    full, _ = run_json(cli, "--model", tiny_model, "--dtype", "fp32", "-o", "fp32.png")
    assert full["dtype"] == "float32" and full["optimizations"][-1] == "cpu fp32 (--dtype fp32)"
    first = np.asarray(Image.open("auto.png"), dtype=np.float64)
    second = np.asarray(Image.open("fp32.png"), dtype=np.float64)
    assert np.abs(first - second).mean() < 12  # bf16 rounds: near the fp32 image, not equal to it


def test_without_native_bf16_auto_is_fp32_and_says_why(cli, tiny_model, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    cpu.auto_dtype.cache_clear()
    try:
        record, stderr = run_json(cli, "--model", tiny_model, "-o", "a.png")
    finally:
        cpu.auto_dtype.cache_clear()
    assert record["dtype"] == "float32"
    assert record["optimizations"][-1] == "cpu fp32 (this CPU has no native bf16 instructions (AMX or AVX512-BF16))"
    assert "no native bf16 instructions" in stderr


def test_the_bundled_model_stays_fp32_on_any_cpu(cli, amx, monkeypatch):
    monkeypatch.setattr(cpu, "MIN_PARAMETERS", 100_000_000)
    record, _ = run_json(cli, "-o", "b.png")
    assert record["dtype"] == "float32" and "too few for bf16 to pay" in record["optimizations"][-1]


def test_a_replay_keeps_the_recorded_dtype(cli, tiny_model, amx):
    run_json(cli, "--model", tiny_model, "-o", "r.png")
    result = cli("replay", "r.png", "--verify", "-o", "again.png")
    assert result.exit_code == 0 and "dtype bfloat16" in result.stderr, result.stderr
    assert "verify: identical to r.png" in result.stderr, result.stderr


def test_a_small_model_runs_on_one_thread_by_default(cli, tiny_model, monkeypatch):
    import torch

    from diffcli import speed

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(speed, "_DEFAULT", [])
    monkeypatch.setattr(speed, "default_threads", lambda: 2)
    try:
        small, _ = run_json(cli, "--model", tiny_model, "-o", "small.png")
        assert small["optimizations"][0] == "cpu threads 1"  # overhead-bound: one thread is faster
        monkeypatch.setattr(cpu, "MIN_PARAMETERS", 0)  # the same model taken as large: every free core
        monkeypatch.setattr(pipeline, "_CACHE", {})
        large, _ = run_json(cli, "--model", tiny_model, "-o", "large.png")
        assert large["optimizations"][0] == "cpu threads 2"
        given, _ = run_json(cli, "--model", tiny_model, "--threads", "1", "-o", "given.png")
        assert given["optimizations"][0] == "cpu threads 1"  # --threads wins
    finally:
        torch.set_num_threads(before)
