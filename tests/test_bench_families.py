"""`diffcli bench --arch flux|sd35|qwen-image|z-image`: the full-size configs (built on the meta device, no memory),
the refusal where the weights do not fit, and the bench run end to end on tiny pipelines of the same classes."""

import json

import pytest
from flow_models import build_tiny_flux, build_tiny_qwen_image, tiny_flux  # noqa: F401 (fixture)

from diffcli import bench, bench_families

# published sizes in billions of parameters (model cards, technical reports): each component within 1.5 %
PUBLISHED = {
    "flux": {"transformer": 11.9, "text_encoder": 0.123, "text_encoder_2": 4.76},  # FLUX.1 [dev], CLIP ViT-L, T5-XXL
    "sd35": {"transformer": 8.1, "text_encoder": 0.123, "text_encoder_2": 0.695, "text_encoder_3": 4.76},  # + bigG
    "qwen-image": {"transformer": 20.4, "text_encoder": 8.29},  # Qwen2.5-VL-7B
    "z-image": {"transformer": 6.15, "text_encoder": 4.02},  # Qwen3-4B
}


@pytest.mark.parametrize("arch", list(bench_families.FAMILIES))
def test_full_size_components_have_the_published_sizes(arch):
    import torch

    parts = bench_families.components(arch, "meta", torch.bfloat16, bench.PROMPT)
    for name, billions in PUBLISHED[arch].items():
        assert abs(bench_families.parameters({name: parts[name]}) / 1e9 - billions) <= 0.015 * billions, name
        assert next(parts[name].parameters()).dtype == torch.bfloat16  # made in the dtype asked, no float32 copy
    assert round(bench_families.parameters(parts) / 1e9, 2) == bench_families.FAMILIES[arch][4]
    assert torch.get_default_dtype() == torch.float32  # put back


def test_qwen_tokenizer_gives_qwen_like_token_counts(tmp_path):
    """The Qwen-Image template's system turn is 34 tokens, as Qwen's own tokenizer makes it (the pipeline drops 34)."""
    corpus = bench_families._prompt_corpus(bench.PROMPT)
    tokenizer = bench_families.qwen_tokenizer(tmp_path, corpus)
    system = f"<|im_start|>system\n{bench_families.QWEN_IMAGE_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert len(tokenizer(system).input_ids) == 34
    assert len(tokenizer(bench.PROMPT).input_ids) <= 16
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_family_that_does_not_fit_is_refused_before_anything_is_built(cli, monkeypatch):
    from diffcli import memory

    monkeypatch.setattr(memory, "device_free", lambda device: 20 * 2**30)
    monkeypatch.setattr(bench_families, "build", lambda *a: pytest.fail("built"))
    result = cli("bench", "--arch", "qwen-image", "--device", "cpu", "--dtype", "bf16")
    assert result.exit_code == 2, result.stderr
    assert "--arch qwen-image needs about 53.7 GiB for its bfloat16 weights alone, and cpu has 20.0 GiB free" in result.stderr


def test_all_skips_the_families_that_do_not_fit(cli, monkeypatch):
    from diffcli import memory

    ran = []
    monkeypatch.setattr(memory, "device_free", lambda device: 25 * 2**30)
    monkeypatch.setattr(bench, "run_bench", lambda arch, *args: ran.append((arch, args[3], args[4])) or {"arch": arch})
    result = cli("bench", "--arch", "all", "--device", "cpu", "--dtype", "bf16", "--json")
    assert result.exit_code == 0, result.stderr
    assert [arch for arch, _, _ in ran] == ["sd15", "sd21", "sdxl", "z-image"]  # 19.1 GiB of bf16 weights (+15 %) fit in 25
    assert ("z-image", 9, 0.0) in ran and ("sd15", 30, 7.5) in ran  # each family's steps and cfg from the registry
    for name in ("flux", "sd35", "qwen-image"):
        assert f"diffcli: skipping {name}: --arch {name} needs about" in result.stderr


@pytest.fixture
def tiny_families(monkeypatch, tmp_path):
    """--arch flux and qwen-image build tiny pipelines of their classes (the full-size ones are a GPU's)."""
    builders = {"flux": build_tiny_flux, "qwen-image": build_tiny_qwen_image}
    monkeypatch.setattr(bench_families, "build", lambda arch, device, dtype, prompt: builders[arch](tmp_path))
    for arch in builders:
        monkeypatch.setitem(bench_families.FAMILIES, arch, bench_families.FAMILIES[arch][:4] + (1e-6,))  # fits


@pytest.mark.parametrize("arch", ["flux", "qwen-image"])
def test_bench_runs_a_family_against_plain_diffusers(cli, tiny_families, arch):
    result = cli("bench", "--arch", arch, "--device", "cpu", "--size", "32", "--steps", "3", "--batch-sizes", "1,2",
                 "--repeats", "1", "--compare", "plain,openvino", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == f"{arch} (random weights)" and report["steps"] == 3
    assert report["cfg"] == bench.arch_defaults(arch)[2] == {"flux": 3.5, "qwen-image": 4.0}[arch]  # the registry's
    for path in ("plain", "diffcli"):
        assert set(report[path]["images_per_s_latents"]) == {"1", "2"}
    assert report["diffcli"]["psnr_vs_plain_db"] > 40  # the same prompts and guidance on both paths
    assert report["openvino"] == {"skipped": "the bench runs optimum-intel on SD 1.x/2.x/XL only"}


def test_each_path_gets_the_familys_guidance(tiny_model, tmp_path):
    """FLUX.1: --cfg is the distilled guidance and the prompt goes as text on diffcli's path too (as run.py passes it);
    Qwen-Image: --cfg is the true CFG scale, with an empty negative prompt that turns it on; SD: diffcli's embeddings."""
    from diffusers import StableDiffusionPipeline

    flux, qwen = build_tiny_flux(tmp_path), build_tiny_qwen_image(tmp_path)
    for own in (False, True):
        assert bench.prompt_inputs(flux, 1, own, 3.5) == {"prompt": bench.PROMPT, "guidance_scale": 3.5}
        assert bench.prompt_inputs(qwen, 2, own, 4.0) == {"prompt": [bench.PROMPT] * 2, "true_cfg_scale": 4.0,
                                                          "negative_prompt": ["", ""]}
    sd = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    assert set(bench.prompt_inputs(sd, 1, True, 7.0)) == {"prompt_embeds", "negative_prompt_embeds", "guidance_scale"}


def test_deep_cache_is_refused_for_a_transformer(cli, monkeypatch):
    from diffcli import memory

    monkeypatch.setattr(memory, "device_free", lambda device: 2**50)
    monkeypatch.setattr(bench_families, "build", lambda *a: pytest.fail("built"))
    result = cli("bench", "--arch", "flux", "--device", "cpu", "--deep-cache", "2")
    assert result.exit_code == 2 and "--deep-cache caches U-Net blocks; --arch flux has a transformer" in result.stderr


def test_the_bench_dtype_on_cuda_is_bf16_for_a_transformer_family(monkeypatch, tiny_model, tiny_flux):
    import torch

    from diffcli.models import resolve_model

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert bench.bench_dtype("flux", "auto", "cuda") == torch.bfloat16
    assert bench.bench_dtype("sd15", "auto", "cuda") == torch.float16
    assert bench.bench_dtype(None, "auto", "cuda", resolve_model(str(tiny_model))) == torch.float16
    assert bench.bench_dtype(None, "auto", "cuda", resolve_model(str(tiny_flux))) == torch.bfloat16  # a --model
    assert bench.bench_dtype("flux", "fp16", "cuda") == torch.float16  # asked for
    assert bench.bench_dtype(None, "auto", "cpu", resolve_model(str(tiny_model))) == torch.float32  # plain's, on the CPU
