"""The memory plan (diffcli/memory.py): the decision for every branch from numbers, the header estimate against the
loaded weights, the CPU "does not fit" exit before any weights load, and the CUDA placements with torch.cuda mocked."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from flow_models import tiny_flux  # noqa: F401 (fixture)
from task_inputs import write_photo

from diffcli import memory
from diffcli.errors import UsageError
from diffcli.memory import GIB, Plan, Weights

MPX = 1024 * 1024  # pixels of a 1024x1024 image: 1 GiB of denoiser activations in fp16 (memory.DENOISE_PER_PIXEL)
# 10 GiB of weights, the largest component 6 GiB, the largest tensor 0.5 GiB (an SDXL-sized model, rounded)
SDXL_LIKE = Weights(10 * GIB, 6 * GIB, GIB // 2)


def choose(free_gib: float, weights: Weights = SDXL_LIKE, host_gib: float | None = 64, pixels: int = MPX, **kwargs):
    host = None if host_gib is None else int(host_gib * GIB)
    return memory.choose(weights, int(free_gib * GIB), host, pixels, 2, kwargs.pop("cuda", True), **kwargs)


@pytest.mark.parametrize("free_gib, group, offload, tiling", [
    (40, True, "none", False),  # 10 + 1 <= 40 * 0.9 - 1
    (10, True, "model", False),  # usable 8: the 6 GiB component and 1 GiB of activations; a 3 GiB decode fits
    (4, True, "group", True),  # usable 2.6: two 0.5 GiB tensors (prefetch) and 1 GiB; a 3 GiB decode does not
    (4, False, "sequential", True),  # the same without group offload support
    (3, True, "sequential", True),  # usable 1.7: one 0.5 GiB tensor and 1 GiB
])
def test_the_cheapest_plan_that_fits(free_gib, group, offload, tiling):
    plan = choose(free_gib, group_supported=group)
    assert plan.offload == offload and plan.vae_tiling == tiling
    assert "10.0 GiB of weights" in plan.why and f"{free_gib:.1f} GiB GPU memory free" in plan.why


def test_a_gguf_transformer_is_never_offloaded_sequentially():
    """accelerate rebuilds a GGUF parameter without its quant type (diffusers#14691): `KeyError: None` at load. Where
    only sequential offload would fit, a GGUF model gets the one-line refusal instead, without suggesting GGUF."""
    assert choose(10, group_supported=False, quantised=True).offload == "model"
    with pytest.raises(UsageError) as refused:
        choose(4, group_supported=False, quantised=True)
    assert "even with model CPU offload" in str(refused.value) and "GGUF" not in refused.value.hint


def test_vae_tiling_when_the_decode_is_large_for_what_is_left():
    small = Weights(2 * GIB, GIB, GIB // 4)
    side = 2048 * 2048  # 4 GiB of activations, 12 GiB for a whole decode in fp16
    assert not choose(20, small, pixels=side).vae_tiling  # usable 17, 15 left after the weights
    tiled = choose(12, small, pixels=side)  # usable 9.8, 7.8 left
    assert tiled.offload == "none" and tiled.vae_tiling
    assert "+ VAE tiling" in tiled.label("cuda:0") and tiled.label("cuda:0").startswith("all on the GPU")
    assert not memory.needs_vae_tiling(512 * 512, 2, 0)  # no smaller than one tile: nothing to gain


@pytest.mark.parametrize("free_gib, host_gib, says, more", [
    (1.5, 64, "GPU memory, even with sequential CPU offload", "a machine with more GPU memory"),  # usable 0.35 GiB
    (10, 8, "host RAM for offloading (8.0 GiB available)", "a machine with more memory"),  # offload needs the RAM
])
def test_nothing_fits_on_cuda_names_the_ways(free_gib, host_gib, says, more):
    with pytest.raises(UsageError) as caught:
        choose(free_gib, host_gib=host_gib, what="model 'big'")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model 'big' needs about 11.0 GiB") and says in message
    assert "GGUF" in message and "a smaller variant" in message and more in message
    assert ("--device cpu" in message) == (host_gib > 11)  # the CPU would need the RAM the offload lacks
    assert "--dtype bf16" not in message  # not asked for: fp16 weights already


def test_on_the_cpu_the_weights_fit_in_ram_or_the_message_names_the_ways():
    assert choose(16, cuda=False, host_gib=None).offload == "none"  # 11 GiB in 14.4: no offload on the CPU
    with pytest.raises(UsageError) as caught:
        choose(8, cuda=False, host_gib=None, hint_dtype=True)
    message = str(caught.value)
    assert "does not fit in RAM: 8.0 GiB RAM available" in message
    for way in ("a GGUF or other quantised file", "a smaller variant", "--dtype bf16", "a machine with more memory"):
        assert way in message
    assert "--device cpu" not in message


# --- the header estimate against the loaded weights


def loaded_bytes(folder: Path, dtype) -> int:
    """Bytes of every component's state (parameters and saved buffers; a tied tensor once) after from_pretrained."""
    import diffusers
    import torch

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum({t.data_ptr(): t.numel() * t.element_size() for t in component.state_dict().values()}.values())
    return total


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl", pytest.param("tiny_flux", marks=pytest.mark.slow)])
def test_the_header_estimate_equals_the_loaded_weights(request, fixture):
    import torch

    from diffcli.models import resolve_model

    folder = request.getfixturevalue(fixture)
    spec = resolve_model(str(folder))
    for dtype in (torch.float32, torch.bfloat16):
        estimate = memory.weight_sizes(spec, torch.tensor([], dtype=dtype).element_size())
        assert estimate.total == loaded_bytes(folder, dtype)
        assert 0 < estimate.largest_tensor <= estimate.largest_component < estimate.total


def test_a_gguf_transformer_counts_as_stored_beside_its_base(tiny_flux, tmp_path):
    import torch
    from flow_models import write_gguf
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from diffcli.models import resolve_model

    state = load_file(next((tiny_flux / "transformer").glob("*.safetensors")))
    path = write_gguf(tmp_path / "flux1-tiny-Q8_0.gguf", state, "flux")
    spec = resolve_model(str(path), base=str(tiny_flux))
    estimate = memory.weight_sizes(spec, 2)
    base = memory.weight_sizes(resolve_model(str(tiny_flux)), 2)
    stored = sum(int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors)
    transformer = sum(t.numel() * 2 for t in state.values())
    assert estimate.total == base.total - transformer + stored  # quantised: fewer bytes than in bf16
    assert stored < transformer and not memory.group_supported(spec)
    assert memory.weight_sizes(SimpleNamespace(base=None, source="folder", location=str(tmp_path), revision=None),
                               2) is None  # no model_index.json: unknown, loading says why
    del torch


def test_a_base_whose_weights_are_not_there_yet_makes_the_size_unknown(tiny_flux, tmp_path):
    """A Hub base with only its configs cached (the first run): its text encoders' size is unknown, not zero, so the
    plan falls back to the family's default instead of counting the transformer alone."""
    import shutil

    from safetensors.torch import load_file

    from diffcli.models import resolve_model

    base = shutil.copytree(tiny_flux, tmp_path / "base")
    for weights in (base / "text_encoder_2").glob("*.safetensors"):
        weights.unlink()
    path = tmp_path / "flux1-tiny.safetensors"
    shutil.copy(next((tiny_flux / "transformer").glob("*.safetensors")), path)
    assert load_file(path)
    assert memory.weight_sizes(resolve_model(str(path), base=str(tiny_flux)), 2) is not None
    assert memory.weight_sizes(resolve_model(str(path), base=str(base)), 2) is None


# --- through the CLI on the CPU


def test_a_model_too_large_for_the_ram_stops_before_loading(cli, tiny_model, monkeypatch):
    from diffcli import pipeline

    monkeypatch.setattr(memory, "host_available", lambda: 2 * 2**20)  # 2 MiB of RAM left
    monkeypatch.setattr(pipeline, "_CACHE", {})  # not in memory from an earlier test: it would have to load
    monkeypatch.setattr(pipeline, "_load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    result = cli("txt2img", "a cat", "--model", tiny_model, "--device", "cpu", "--dtype", "fp32", "--steps", "1",
                 "--quiet")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit in RAM" in lines[0] and "--dtype bf16" in lines[0], result.stderr
    assert "a GGUF or other quantised file" in lines[0] and "a machine with more memory" in lines[0]


def test_no_low_vram_skips_the_check_and_json_timings_keep_peak_memory(cli, tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "host_available", lambda: 2 * 2**20)
    made = cli("img2img", write_photo(Path.cwd(), (64, 64)), "a cat", "--model", tiny_model, "--device", "cpu",
               "--no-low-vram", "--steps", "2", "--seed", "1", "--json", "--quiet")
    assert made.exit_code == 0, made.stderr
    record = made.json_lines()[0]
    assert record["timings"]["peak_memory_gib"] > 0  # the process's resident peak on the CPU
    assert not any("auto:" in entry for entry in record["optimizations"])  # --no-low-vram: no plan


# --- CUDA, mocked: the choice and the enable_* calls on a CPU pipeline


@pytest.fixture
def cpu_pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)


def test_cuda_plans_call_diffusers_offloading(cpu_pipe, tiny_model, monkeypatch):
    import torch

    from diffcli import pipeline, speed
    from diffcli.models import resolve_model

    spec = resolve_model(str(tiny_model))
    monkeypatch.setattr(memory, "weight_sizes", lambda spec, itemsize: SDXL_LIKE)
    monkeypatch.setattr(memory, "host_available", lambda: 64 * GIB)
    monkeypatch.setattr(memory, "native_pixels", lambda spec: MPX)
    monkeypatch.setattr(speed, "optimize_cuda", lambda pipe: ["torch.compile (mocked)"])
    calls = []
    for name in ("enable_model_cpu_offload", "enable_group_offload", "enable_sequential_cpu_offload", "to"):
        monkeypatch.setattr(cpu_pipe, name, lambda *a, _name=name, **k: calls.append((_name, a, k)))
    for free_gib, offload, called in [(40, "none", "to"), (10, "model", "enable_model_cpu_offload"),
                                      (4, "group", "enable_group_offload"), (3, "sequential", "enable_sequential_cpu_offload")]:
        monkeypatch.setattr(memory, "device_free", lambda device, _free=free_gib: int(_free * GIB))
        plan = pipeline.memory_plan(spec, "cuda", torch.float16, None)
        assert isinstance(plan, Plan) and plan.offload == offload
        calls.clear()
        entries = pipeline._place(cpu_pipe, "cuda", True, plan)
        assert [name for name, _, _ in calls] == [called] and entries[-1] == plan.label("cuda")
        assert memory.note(cpu_pipe, "cuda") == plan.label("cuda") and memory.note(cpu_pipe, "cpu") is None
    assert calls[0][2] == {"device": "cuda"}
    assert pipeline.memory_plan(spec, "cuda", torch.float16, True) is True  # --low-vram: today's savers
    assert pipeline.memory_plan(spec, "cuda", torch.float16, False) is False  # --no-low-vram: none
    monkeypatch.setattr(memory, "device_free", lambda device: GIB)
    with pytest.raises(UsageError, match="even with sequential CPU offload"):
        pipeline.memory_plan(spec, "cuda", torch.float16, None)


def test_group_offload_is_leaf_level_with_a_stream(cpu_pipe, monkeypatch):
    import torch

    seen = {}
    monkeypatch.setattr(cpu_pipe, "enable_group_offload", lambda **kwargs: seen.update(kwargs))
    assert memory.apply(cpu_pipe, Plan("group", False, "mocked"), "cuda:1") == ["group offload (leaf level, CUDA "
                                                                               "stream) (auto: mocked)"]
    assert seen == {"onload_device": torch.device("cuda:1"), "offload_device": torch.device("cpu"),
                    "offload_type": "leaf_level", "use_stream": True}


def test_unknown_sizes_fall_back_to_the_family_threshold(tiny_model, monkeypatch):
    import torch

    from diffcli import pipeline
    from diffcli.models import resolve_model

    spec = resolve_model(str(tiny_model))
    monkeypatch.setattr(memory, "weight_sizes", lambda spec, itemsize: None)
    monkeypatch.setattr(memory, "device_free", lambda device: 4 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=4 * GIB))
    assert pipeline.memory_plan(spec, "cuda", torch.float16, None) is True  # 4 GiB < sd1's low_vram_gib
    assert pipeline.memory_plan(spec, "mps", torch.float16, None) is False


def test_fit_vae_tiles_a_large_image_once_and_records_it(monkeypatch):
    import torch

    tiled = []
    vae = SimpleNamespace(use_tiling=False, dtype=torch.float16, diffcli_memory=Plan("none", False, "x"),
                          enable_tiling=lambda: (tiled.append(1), setattr(vae, "use_tiling", True)))
    pipe = SimpleNamespace(vae=vae, diffcli_optimizations=["cpu threads 2"])
    said = []
    monkeypatch.setattr(memory, "device_free", lambda device: 8 * GIB)
    memory.fit_vae(pipe, "cuda", 1024, 1024, said.append)  # 3 GiB decode in 8 * 0.9 - 1 - 1 GiB: fits
    assert not tiled
    memory.fit_vae(pipe, "cuda", 2048, 2048, said.append)  # 12 GiB: tiled
    memory.fit_vae(pipe, "cuda", 2048, 2048, said.append)  # already on: said once
    assert tiled == [1] and len(said) == 1 and said[0].startswith("VAE tiling (auto: a 2048x2048 decode needs about 12.0")
    assert pipe.diffcli_optimizations[-1] == said[0]
    vae.use_tiling, vae.diffcli_memory = False, None  # --low-vram given: not ours to change
    memory.fit_vae(pipe, "cuda", 2048, 2048, said.append)
    assert tiled == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["all on the GPU", "model CPU offload", "group offload", "sequential CPU offload"])
def test_each_plan_runs_on_cuda_and_matches(cli, tiny_model, monkeypatch, offload):
    """On a real GPU: each plan, forced by a free memory scaled down to the tiny model's weights (no working memory),
    runs, is said and recorded, and gives the image all-on-the-GPU gives (8-bit values within 2)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import numpy as np
    from PIL import Image

    from diffcli import pipeline
    from diffcli.models import resolve_model

    w = memory.weight_sizes(resolve_model(str(tiny_model)), 2)
    usable = {"all on the GPU": None, "model CPU offload": (w.largest_component + w.total) / 2,
              "group offload": (2 * w.largest_tensor + w.largest_component) / 2,
              "sequential CPU offload": 1.5 * w.largest_tensor}[offload]
    if usable is not None:
        monkeypatch.setattr(memory, "CUDA_RESERVE", 0)
        monkeypatch.setattr(memory, "native_pixels", lambda spec: 0)
        monkeypatch.setattr(memory, "device_free", lambda device: int(usable / memory.MARGIN))
    monkeypatch.setattr(memory, "group_supported", lambda spec: offload != "sequential CPU offload")
    pipeline._CACHE.clear()
    made = cli("txt2img", "a cat", "--model", tiny_model, "--device", "cuda", "--no-optimize", "--seed", "3",
               "--steps", "2", "-o", "gpu.png", "--json")
    assert made.exit_code == 0, made.stderr
    entries = made.json_lines()[0]["optimizations"]
    assert any(entry.startswith(offload) and "(auto:" in entry for entry in entries), entries
    assert f": {offload}" in made.stderr
    pipeline._CACHE.clear()
    plain = cli("txt2img", "a cat", "--model", tiny_model, "--device", "cuda", "--no-optimize", "--no-low-vram",
                "--seed", "3", "--steps", "2", "-o", "plain.png")
    assert plain.exit_code == 0, plain.stderr
    difference = np.abs(np.asarray(Image.open("gpu.png"), float) - np.asarray(Image.open("plain.png"), float))
    assert difference.max() <= 2
