"""`--backend openvino` (diffcli/backend.py, diffcli/openvino_unet.py): the U-Net, text encoders and VAE decoder run by
OpenVINO give torch's image within a stated tolerance, through the CLI, for SD 1.x and SDXL, txt2img, img2img and
inpaint, at sizes whose latents do not halve evenly; the IR is exported once and reused; what it cannot run is exit 2
before loading; `auto` picks it for large denoisers: bf16 on native bf16, else f32 where memory allows. Timings:
`diffcli bench` (docs/performance.md), never here."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from task_inputs import write_mask, write_photo

from diffcli import backend, cpu, extras, jobs, models, openvino_unet, pipeline

pytest.importorskip("openvino")
FAST = ("--steps", "3", "--seed", "4", "--device", "cpu", "--overwrite")
# fp32 on both engines: the same arithmetic in another order (OpenVINO fuses and reorders), so not bit-exact.
MAX_DIFF_FP32 = 3  # /255, any pixel


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Each test loads its models afresh, with its own OpenVINO cache."""
    monkeypatch.setattr(pipeline, "_CACHE", {})
    monkeypatch.setenv("DIFFCLI_HOME", str(tmp_path / "home"))
    backend.openvino_pays.cache_clear()  # each test's CPU flags and memory decide afresh
    yield
    backend.openvino_pays.cache_clear()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def both(cli, tmp_path, *args) -> tuple[np.ndarray, np.ndarray, dict]:
    """The image of `args` on torch and on OpenVINO, and OpenVINO's JSON record."""
    made = {}
    for engine in ("torch", "openvino"):
        out = tmp_path / f"{engine}.png"
        result = cli(*args, *FAST, "--backend", engine, "-o", out, "--json")
        assert result.exit_code == 0, result.stderr
        made[engine] = (pixels(out), result.json_lines()[0])
    return made["torch"][0], made["openvino"][0], made["openvino"][1]


@pytest.mark.parametrize("size", [("--width", "64", "--height", "64"), ("--width", "72", "--height", "88")])
def test_txt2img_on_openvino_is_torchs_image(cli, tiny_model, tmp_path, size):
    """72x88: latents of 9x11, which the U-Net's up blocks cannot double back to: the traced graph takes its sizes from
    the skip connections, as diffusers does."""
    torch_image, ov_image, record = both(cli, tmp_path, "txt2img", "a red star", "-m", tiny_model, *size)
    assert np.abs(torch_image - ov_image).max() <= MAX_DIFF_FP32
    assert record["backend"] == "openvino" and record["versions"]["openvino"]
    assert record["optimizations"][-1].startswith("openvino f32 U-Net, text encoder and VAE decoder")
    assert record["dtype"] == "float32"


@pytest.mark.slow  # exports and compiles the IR: about 10 s
def test_img2img_and_inpaint_share_the_openvino_unet(cli, tiny_model, tmp_path):
    photo, mask = write_photo(tmp_path, (64, 64)), write_mask(tmp_path, (64, 64))
    a, b, _ = both(cli, tmp_path, "img2img", photo, "a blue circle", "-m", tiny_model, "--strength", "0.7")
    assert np.abs(a - b).max() <= MAX_DIFF_FP32
    a, b, record = both(cli, tmp_path, "inpaint", photo, "--mask", mask, "a blue circle", "-m", tiny_model)
    assert np.abs(a - b).max() <= MAX_DIFF_FP32 and record["backend"] == "openvino"


@pytest.mark.slow
def test_sdxl_and_a_dedicated_inpainting_unet(cli, tiny_sdxl, tiny_inpaint_model, tmp_path):
    """SDXL's added text and time conditioning are inputs of the exported U-Net, and a second run, whose U-Net does not
    load, still gives the pipeline the width it checks them against; a 9-channel U-Net exports as it is."""
    a, b, _ = both(cli, tmp_path, "txt2img", "a red star", "-m", tiny_sdxl, "--width", "64", "--height", "64")
    assert np.abs(a - b).max() <= MAX_DIFF_FP32
    pipeline._CACHE.clear()
    again = tmp_path / "again.png"
    assert cli("txt2img", "a red star", "-m", tiny_sdxl, "--width", "64", "--height", "64", *FAST, "--backend", "openvino",
               "-o", again).exit_code == 0
    assert np.array_equal(pixels(again), b)
    photo, mask = write_photo(tmp_path, (64, 64)), write_mask(tmp_path, (64, 64))
    a, b, _ = both(cli, tmp_path, "inpaint", photo, "--mask", mask, "a star", "-m", tiny_inpaint_model)
    assert np.abs(a - b).max() <= MAX_DIFF_FP32


@pytest.mark.parametrize("clip_skip", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_prompts_are_encoded_by_the_openvino_text_encoder_and_new_tokens_by_torch(tiny_model, clip_skip):
    """The text encoder's OpenVINO twin gives torch's hidden states (fp32: within float noise), clip skip included; ids
    it was not exported with (a textual-inversion token added later) go to the torch encoder."""
    import torch

    from diffcli import prompts

    spec = models.resolve_model(str(tiny_model))
    pipe = pipeline.load_pipeline(spec, "txt2img", "cpu", torch.float32, backend="openvino")
    twin = pipe.text_encoder.diffcli_openvino
    calls = []
    pipe.text_encoder.diffcli_openvino = lambda ids: calls.append(ids) or twin(ids)
    on_openvino, _ = prompts.encode(pipe, ["a (red:1.2) star"], clip_skip=clip_skip)
    assert len(calls) == 1
    del pipe.text_encoder.diffcli_openvino
    on_torch, _ = prompts.encode(pipe, ["a (red:1.2) star"], clip_skip=clip_skip)
    assert torch.allclose(on_openvino, on_torch, atol=1e-4)
    unknown = torch.full((1, 77), pipe.text_encoder.config.vocab_size)
    assert twin(unknown) is None and twin(unknown - 1) is not None


@pytest.mark.slow  # exports and compiles the IR: about 9 s
def test_the_text_twin_keeps_recent_results_by_token_ids(tiny_model):
    """A prompt met again is not encoded again (the IR cannot change); other ids are; what a caller gets is its own
    to change; only the last KEPT results stay."""
    import torch

    spec = models.resolve_model(str(tiny_model))
    twin = pipeline.load_pipeline(spec, "txt2img", "cpu", torch.float32, backend="openvino").text_encoder.diffcli_openvino
    runs = []
    compiled = twin.compiled.all
    twin.compiled.all = lambda tensors: runs.append(1) or compiled(tensors)
    ids = torch.arange(77).reshape(1, 77)
    first = twin(ids)
    first.last_hidden_state.zero_()
    again = twin(ids)
    assert len(runs) == 1 and again.last_hidden_state.abs().sum() > 0
    assert not torch.equal(twin(ids + 1).last_hidden_state, again.last_hidden_state) and len(runs) == 2
    for shift in range(twin.KEPT):
        twin(ids + 2 + shift)
    twin(ids)
    assert len(runs) == 3 + twin.KEPT and len(twin.kept) == twin.KEPT


@pytest.mark.slow
def test_bf16_runs_and_stays_close(cli, tiny_model, tmp_path):
    out = tmp_path / "bf16.png"
    result = cli("txt2img", "a red star", "-m", tiny_model, *FAST, "--backend", "openvino", "--dtype", "bf16", "-o", out,
                 "--json")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert record["dtype"] == "bfloat16" and record["optimizations"][-1].startswith("openvino bf16")
    reference = tmp_path / "fp32.png"
    assert cli("txt2img", "a red star", "-m", tiny_model, *FAST, "--backend", "torch", "-o", reference).exit_code == 0
    assert np.abs(pixels(out) - pixels(reference)).mean() < 8  # bf16 keeps 8 bits of mantissa: close, not equal


@pytest.mark.slow
def test_the_ir_is_exported_once_and_a_damaged_one_again(cli, tiny_model, tmp_path, monkeypatch):
    args = ("txt2img", "a red star", "-m", tiny_model, *FAST, "--backend", "openvino", "-o", tmp_path / "a.png")
    first = cli(*args)
    assert first.exit_code == 0 and "converting its U-Net, text encoders and VAE decoder to OpenVINO, once" in first.stderr
    (folder,) = (tmp_path / "home" / "openvino").iterdir()
    assert openvino_unet.is_cached(folder)
    exports = []
    monkeypatch.setattr(openvino_unet, "export", lambda *a, real=openvino_unet.export: exports.append(1) or real(*a))
    monkeypatch.setattr(pipeline, "_CACHE", {})
    loaded = []
    real_load = pipeline._load_weights
    monkeypatch.setattr(pipeline, "_load_weights", lambda *a, **k: loaded.append(k) or real_load(*a, **k))
    second = cli(*args)
    assert second.exit_code == 0 and "converting" not in second.stderr and exports == []
    assert loaded[-1]["without_unet"]  # the torch U-Net's weights are not read again
    (folder / "unet.xml").write_text("<net><layers>")  # truncated
    monkeypatch.setattr(pipeline, "_CACHE", {})
    third = cli(*args)
    assert third.exit_code == 0, third.stderr
    assert exports == [1] and openvino_unet.is_cached(folder)
    (folder / "text_encoder.bin").write_bytes(b"\0" * 16)  # a damaged text encoder is exported again too
    monkeypatch.setattr(pipeline, "_CACHE", {})
    fourth = cli(*args)
    assert fourth.exit_code == 0, fourth.stderr
    assert exports == [1, 1] and openvino_unet.is_cached(folder)


CTRL_C_AFTER_MODELS_ARE_DROPPED = """
import faulthandler, os, signal, sys, time
faulthandler.enable()  # as pytest and `python -X faulthandler` do: the main thread gets an alternate signal stack
from typer.testing import CliRunner
from diffcli import pipeline
from diffcli.cli import app
model, out = sys.argv[1:]
for name, size, drop in (("a", "64", True), ("b", "64", False), ("c", "72", True)):
    args = ["txt2img", "a red star", "-m", model, "--steps", "2", "--device", "cpu", "--backend", "openvino",
            "--width", size, "-o", os.path.join(out, name + ".png")]
    assert CliRunner().invoke(app, args).exit_code == 0
    if drop:  # as a server's model cache drops models
        pipeline._CACHE.clear()
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)
except KeyboardInterrupt:
    print("interrupted cleanly")
"""


@pytest.mark.slow
def test_ctrl_c_after_openvino_models_are_dropped_is_a_keyboard_interrupt(tiny_model, tmp_path):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack and restores it when it is destroyed: plugins
    destroyed out of order left a freed stack behind, and the next signal crashed the process (SIGSEGV). One Core per
    process (openvino_unet.core) keeps the plugin alive. In a child: a crash would take the test run down."""
    child = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_MODELS_ARE_DROPPED, str(tiny_model), str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and "interrupted cleanly" in child.stdout, (child.returncode, child.stderr[-2000:])


def test_another_model_or_vae_gets_another_cache_key(tiny_model, tiny_sdxl):
    assert openvino_unet.cache_key(models.resolve_model(str(tiny_model))) != openvino_unet.cache_key(
        models.resolve_model(str(tiny_sdxl)))


@pytest.mark.parametrize(("args", "message"), [
    (("--backend", "tpu"), "--backend must be one of auto, torch, openvino"),
    (("--backend", "openvino", "--lora", "missing.safetensors"), None),  # the LoRA file is checked first
    (("--backend", "openvino", "--deep-cache", "3"), "--deep-cache changes the U-Net at run time"),
    (("--backend", "openvino", "--device", "cuda"), None),
    (("--backend", "openvino", "--dtype", "fp16"), None),
])
def test_what_openvino_cannot_run_is_exit_2_before_loading(cli, tiny_model, monkeypatch, args, message):
    monkeypatch.setattr(pipeline, "_load_weights", lambda *a, **k: pytest.fail("a model loaded"))
    result = cli("txt2img", "a red star", "-m", tiny_model, "--steps", "2", *args)
    assert result.exit_code == 2 and result.stderr.count("\n") <= 2, result.stderr
    if message:
        assert message in result.stderr


def test_lora_with_openvino_is_refused(cli, tiny_model, tiny_lora, monkeypatch):
    monkeypatch.setattr(pipeline, "_load_weights", lambda *a, **k: pytest.fail("a model loaded"))
    result = cli("txt2img", "a red star", "-m", tiny_model, "--backend", "openvino", "--lora", tiny_lora)
    assert result.exit_code == 2 and "--backend openvino cannot run this job: --lora changes the U-Net" in result.stderr


def test_openvino_not_installed_names_the_extra(cli, tiny_model, monkeypatch):
    monkeypatch.setattr(extras, "available", lambda module: module != "openvino")
    result = cli("txt2img", "a red star", "-m", tiny_model, "--backend", "openvino")
    assert result.exit_code == 2 and "pip install 'diffcli[openvino]'" in result.stderr


BF16, AVX2 = frozenset({"avx512f", "avx512_bf16"}), frozenset({"avx2", "fma"})
LARGE, GIB = 860_000_000, 2**30


@pytest.mark.parametrize(("flags", "parameters", "free", "dtype", "installed", "lora", "device", "expected"), [
    (BF16, LARGE, 1 * GIB, "auto", True, [], "cpu", "openvino"),  # native bf16 (its weights are halved there)
    (AVX2, LARGE, 8 * GIB, "auto", True, [], "cpu", "openvino"),  # f32: 8 GiB hold the 4 GiB of fp32 weights 1.5x
    (AVX2, LARGE, 5 * GIB, "auto", True, [], "cpu", "torch"),  # f32 does not fit: torch's fp32 path
    (AVX2, LARGE, None, "auto", True, [], "cpu", "openvino"),  # memory unknown
    (frozenset({"sse4_2"}), LARGE, 8 * GIB, "auto", True, [], "cpu", "torch"),  # no AVX2 (or not x86): not measured
    (BF16, 9_400_000, 8 * GIB, "auto", True, [], "cpu", "torch"),  # a small denoiser: overhead-bound
    (AVX2, 9_400_000, 8 * GIB, "auto", True, [], "cpu", "torch"),
    (BF16, LARGE, 8 * GIB, "auto", False, [], "cpu", "torch"),  # not installed
    (BF16, LARGE, 8 * GIB, "auto", True, ["x.safetensors"], "cpu", "torch"),  # a LoRA changes the U-Net
    (BF16, LARGE, 8 * GIB, "bf16", True, [], "cpu", "torch"),  # an explicit --dtype keeps torch unless --backend says so
    (BF16, LARGE, 8 * GIB, "auto", True, [], "cuda", "torch"),
])
def test_what_auto_picks(monkeypatch, tiny_model, flags, parameters, free, dtype, installed, lora, device, expected):
    from diffcli import memory

    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu, "denoiser_parameters", lambda spec: parameters)
    monkeypatch.setattr(memory, "weight_sizes", lambda spec, itemsize: memory.Weights(4 * GIB, 3 * GIB, GIB // 8))
    monkeypatch.setattr(memory, "host_available", lambda: free)
    monkeypatch.setattr(extras, "available", lambda module: installed)
    job = jobs.Job(command="txt2img")
    job.model.dtype, job.adapters.lora = dtype, lora
    assert backend.resolve(job, models.resolve_model(str(tiny_model)), device) == expected


def test_auto_keeps_its_choice_when_the_loaded_model_has_used_the_memory(monkeypatch, tiny_model):
    """A batch's second job sees less memory available (the first loaded the model): it keeps the first job's engine
    rather than loading the model again on the other one."""
    from diffcli import memory

    free = [8 * GIB]
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX2)
    monkeypatch.setattr(cpu, "denoiser_parameters", lambda spec: LARGE)
    monkeypatch.setattr(memory, "weight_sizes", lambda spec, itemsize: memory.Weights(4 * GIB, 3 * GIB, GIB // 8))
    monkeypatch.setattr(memory, "host_available", lambda: free[0])
    monkeypatch.setattr(extras, "available", lambda module: True)
    spec, job = models.resolve_model(str(tiny_model)), jobs.Job(command="txt2img")
    assert backend.resolve(job, spec, "cpu") == "openvino"
    free[0] = 2 * GIB
    assert backend.resolve(job, spec, "cpu") == "openvino"


@pytest.mark.parametrize(("flags", "hint", "why", "int8"), [
    ({"avx512_bf16", "amx_bf16", "amx_tile"}, "bf16", "this CPU has amx_bf16", False),  # a Xeon with AMX
    # an AMD EPYC (Zen 4): OpenVINO's U-Net step 2.8x torch fp32's there, 1.13x more with int8 weights (nncf's)
    ({"avx512f", "avx512_bf16"}, "bf16", "this CPU has avx512_bf16", True),
    (AVX2, "f32", "this CPU has no native bf16 instructions (AMX or AVX512-BF16)", False),  # a laptop: 1.56x torch fp32
])
def test_auto_runs_openvino_and_says_why(cli, tiny_model, tmp_path, monkeypatch, flags, hint, why, int8):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu, "MIN_PARAMETERS", 0)  # the tiny U-Net counts as large
    cpu.auto_dtype.cache_clear()
    try:
        result = cli("txt2img", "a red star", "-m", tiny_model, *FAST, "-o", tmp_path / "auto.png", "--json")
    finally:
        cpu.auto_dtype.cache_clear()
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    int8 = " with int8 weights and dynamic int8 activations" if int8 and openvino_unet._nncf_version() else ""
    line = f"openvino {hint} U-Net{int8}, text encoder and VAE decoder ({why})"
    assert record["backend"] == "openvino" and record["optimizations"][-1] == line
    assert record["dtype"] == {"bf16": "bfloat16", "f32": "float32"}[hint] and line in result.stderr


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_large_unet_is_exported_with_int8_weights(cli, tiny_model, tmp_path, monkeypatch, dtype):
    """optimum-intel's default for modules of 1 B parameters or more (SDXL's U-Net): int8 weights, computed in the
    inference precision; in bf16 their activations are quantised to int8 on the fly, in groups of DYNAMIC_INT8_GROUP
    channels (the U-Net only). The image stays near torch's and the optimizations line says so."""
    pytest.importorskip("nncf")
    monkeypatch.setattr(openvino_unet, "INT8_WEIGHTS_FROM", 0)  # the tiny U-Net counts as large
    compiled, init = [], openvino_unet._Compiled.__init__
    monkeypatch.setattr(openvino_unet._Compiled, "__init__", lambda self, path, config: (
        compiled.append((Path(path).stem, self)), init(self, path, config))[1])
    torch_image, ov_image, record = both(cli, tmp_path, "txt2img", "a red star", "-m", tiny_model, "--dtype", dtype)
    hint, activations = {"fp32": ("f32", ""), "bf16": ("bf16", " and dynamic int8 activations")}[dtype]
    assert record["optimizations"][-1].startswith(
        f"openvino {hint} U-Net with int8 weights{activations}, text encoder and VAE decoder")
    assert np.abs(torch_image - ov_image).mean() < 3
    groups = {name: {request.get_compiled_model().get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")
                     for request in each.requests.values()} for name, each in compiled}
    assert (groups["unet"] == {openvino_unet.DYNAMIC_INT8_GROUP}) == (dtype == "bf16")
    assert openvino_unet.DYNAMIC_INT8_GROUP not in groups["vae_decoder"]
    ir = next((tmp_path / "home").rglob("unet.xml")).read_text()
    assert 'element_type="u8"' in ir and not list((tmp_path / "home").rglob("compressed-*"))
    assert 'element_type="u8"' not in next((tmp_path / "home").rglob("vae_decoder.xml")).read_text()


@pytest.mark.parametrize("flags, hint, parameters, int8", [
    ({"avx512_bf16"}, "bf16", 860_000_000, True),  # AMD Zen 4: SD 1.5's U-Net
    ({"avx512_bf16"}, "f32", 860_000_000, False),  # --dtype fp32
    ({"avx512_bf16"}, "bf16", 50_000_000, False),  # small: not on OpenVINO by default, nor int8
    ({"amx_bf16", "avx512_bf16"}, "bf16", 860_000_000, False),  # AMX: bf16 weights were faster
    ({"amx_bf16", "avx512_bf16"}, "bf16", 2_600_000_000, True),  # SDXL: optimum-intel's rule
    ({"avx2"}, "f32", 2_600_000_000, True),
    ({"avx2"}, "f32", 860_000_000, False),
])
def test_which_unets_get_int8_weights(monkeypatch, flags, hint, parameters, int8):
    monkeypatch.setattr(openvino_unet, "_nncf_version", lambda: "3.4.0")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert openvino_unet.int8_weights(parameters, hint) is int8
    monkeypatch.setattr(openvino_unet, "_nncf_version", lambda: None)  # nncf not installed: never
    assert not openvino_unet.int8_weights(parameters, hint)


def test_the_cache_keeps_int8_and_bf16_weights_apart(monkeypatch, tiny_model):
    """On a CPU where a mid-size U-Net gets int8 weights in bf16 only, bf16 and f32 read different IR folders."""
    spec = models.resolve_model(str(tiny_model))
    monkeypatch.setattr(openvino_unet, "_nncf_version", lambda: "3.4.0")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert openvino_unet.folder(spec, hint="bf16") != openvino_unet.folder(spec, hint="f32")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    assert openvino_unet.folder(spec, hint="bf16") == openvino_unet.folder(spec, hint="f32")


@pytest.mark.slow
def test_a_replay_of_an_openvino_image_runs_on_openvino(cli, tiny_model, tmp_path):
    made = tmp_path / "made.png"
    assert cli("txt2img", "a red star", "-m", tiny_model, *FAST, "--backend", "openvino", "-o", made).exit_code == 0
    result = cli("replay", made, "--verify", "-o", tmp_path / "again.png", "--json")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert record["backend"] == "openvino" and record["verify"]["identical"]


@pytest.mark.slow
def test_bench_measures_the_openvino_path(cli, tiny_model):
    result = cli("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1", "--repeats", "1",
                 "--compare", "plain", "--backend", "openvino", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["openvino_export_s"] > 0 and report["optimizations"][-1].startswith("openvino f32")
    assert report["diffcli"]["psnr_vs_plain_db"] > 35
    refused = cli("bench", "--model", tiny_model, "--device", "cuda", "--backend", "openvino")
    assert refused.exit_code == 2 and "runs on the CPU" in refused.stderr
