"""Transformer-only SD3/FLUX.1 files (.safetensors in SAI's/BFL's or diffusers' layout, GGUF written with the gguf
package) completed by --base: equal to plain diffusers loading the same file, their family told from tensor names,
and every bad file or base refused with one line (exit 2) before any weights load."""

from __future__ import annotations

import pickle
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from flow_models import flux2_to_original, sd3_to_original, tiny_flux, tiny_flux2, tiny_flux2_klein, tiny_flux_fill, tiny_sd3, write_gguf  # noqa: F401 (fixtures)
from PIL import Image
from task_inputs import pixels, write_photo

from diffcli import models, transformer_files
from diffcli.errors import ModelError
from diffcli.output import read_metadata

FAST = ("--steps", "2", "--seed", "1", "--quiet")
TOLERANCE = 2  # 8-bit values: the CLI's image against diffusers' own float output of the same file, rounded
SIZE = (32, 32)
COMFY = "model.diffusion_model."  # ComfyUI's prefix on the original names


def transformer_state(folder: Path) -> dict:
    """The tiny model's transformer weights (diffusers' names)."""
    from diffusers.models.model_loading_utils import load_state_dict

    return load_state_dict(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def save_safetensors(path: Path, state: dict, prefix: str = "") -> Path:
    from safetensors.torch import save_file

    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tiny_sd3, tiny_flux, tmp_path_factory) -> dict[str, Path]:
    """Transformer-only files of the tiny models: SD3 in SAI's layout (ComfyUI prefix) and as GGUF; FLUX.1 in
    diffusers' layout and as GGUF (diffusers converts BFL names at FLUX.1's width 3072 only)."""
    root = tmp_path_factory.mktemp("transformer-files")
    sd3, flux = transformer_state(tiny_sd3), transformer_state(tiny_flux)
    return {"sd3": save_safetensors(root / "sd3.5-tiny.safetensors", sd3_to_original(sd3), COMFY),
            "sd3-gguf": write_gguf(root / "sd3.5-tiny-Q8_0.gguf", sd3_to_original(sd3), "sd3"),
            "flux": save_safetensors(root / "flux1-tiny.safetensors", flux),
            "flux-gguf": write_gguf(root / "flux1-tiny-Q8_0.gguf", flux, "flux")}


def diffusers_image(class_name: str, file: Path, base: Path, prompt: str = "a red cat", **kwargs) -> np.ndarray:
    """Plain diffusers: the transformer from_single_file with the base's config, the pipeline from the base."""
    import diffusers
    import torch

    family = "SD3" if class_name.startswith("StableDiffusion3") else "Flux2" if class_name.startswith("Flux2") else "Flux"
    model_class = getattr(diffusers, f"{family}Transformer2DModel")
    quantized = {"quantization_config": diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32)} \
        if file.suffix == ".gguf" else {}
    transformer = model_class.from_single_file(str(file), config=str(base), subfolder="transformer", local_files_only=True,
                                               torch_dtype=torch.float32, **quantized)
    pipe = getattr(diffusers, class_name).from_pretrained(base, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=prompt, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(1), output_type="np",
                 width=SIZE[0], height=SIZE[1], **kwargs).images[0]
    return np.round(image * 255)


@pytest.mark.parametrize("name, class_name, base, guidance", [
    ("sd3", "StableDiffusion3Pipeline", "tiny_sd3", 4.5), ("sd3-gguf", "StableDiffusion3Pipeline", "tiny_sd3", 4.5),
    ("flux", "FluxPipeline", "tiny_flux", 3.5), ("flux-gguf", "FluxPipeline", "tiny_flux", 3.5),
])
def test_txt2img_equals_diffusers(cli, files, request, name, class_name, base, guidance):
    base = request.getfixturevalue(base)
    result = cli("txt2img", "a red cat", "--model", files[name], "--base", base, "--width", SIZE[0], "--height", SIZE[1],
                 *FAST, "-o", "t.png", "--json")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image(class_name, files[name], base, guidance_scale=guidance)
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    meta = read_metadata("t.png")
    assert (meta["model_family"], meta["cfg"], meta["base"]) == (name.split("-")[0], guidance, str(base))


@pytest.fixture(scope="module")
def flux2_files(tiny_flux2, tiny_flux2_klein, tmp_path_factory) -> dict[str, Path]:
    """Transformer-only FLUX.2 files: dev in BFL's layout (ComfyUI prefix) and as GGUF, klein in diffusers' layout and
    as a GGUF of BFL's names."""
    root = tmp_path_factory.mktemp("flux2-files")
    dev, klein = transformer_state(tiny_flux2), transformer_state(tiny_flux2_klein)
    return {"flux2": save_safetensors(root / "flux2-dev-tiny.safetensors", flux2_to_original(dev), COMFY),
            "flux2-bfl": save_safetensors(root / "flux2-dev-bfl.safetensors", flux2_to_original(dev)),
            "flux2-gguf": write_gguf(root / "flux2-dev-tiny-Q8_0.gguf", flux2_to_original(dev), "flux"),
            "flux2-klein": save_safetensors(root / "flux2-klein-tiny.safetensors", klein),
            "flux2-klein-gguf": write_gguf(root / "flux2-klein-tiny-Q8_0.gguf", flux2_to_original(klein), "flux")}


@pytest.mark.parametrize("name, class_name, base, guidance", [
    ("flux2", "Flux2Pipeline", "tiny_flux2", 4.0), ("flux2-gguf", "Flux2Pipeline", "tiny_flux2", 4.0),
    ("flux2-klein", "Flux2KleinPipeline", "tiny_flux2_klein", 1.0),
    ("flux2-klein-gguf", "Flux2KleinPipeline", "tiny_flux2_klein", 1.0),
])
def test_flux2_files_equal_diffusers(cli, flux2_files, request, monkeypatch, name, class_name, base, guidance):
    """FLUX.2 dev and klein transformer files (BFL's names, diffusers', GGUF) with --base: the family from the file
    (no guidance embedding: klein), the image diffusers makes of the same file."""
    import diffcli.extras

    available = diffcli.extras.available  # the tiny dev's tokenizer needs no torchvision (tests/test_flux2.py)
    monkeypatch.setattr(diffcli.extras, "available", lambda module: module == "torchvision" or available(module))
    base = request.getfixturevalue(base)
    result = cli("txt2img", "a red cat", "--model", flux2_files[name], "--base", base, "--width", SIZE[0], "--height",
                 SIZE[1], *FAST, "-o", "t.png", "--json")
    assert result.exit_code == 0, result.stderr
    reference = flux2_files["flux2-bfl" if name == "flux2" else name]  # diffusers' own converter reads no ComfyUI prefix
    expected = diffusers_image(class_name, reference, base, guidance_scale=guidance)
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    meta = read_metadata("t.png")
    assert (meta["model_family"], meta["cfg"], meta["base"]) == (name.removesuffix("-gguf"), guidance, str(base))


def test_a_klein_file_needs_its_base(cli, no_loading, flux2_files):
    line = refused(cli, "--model", flux2_files["flux2-klein"])
    assert "holds only a flux2-klein transformer and its family names no default base" in line and "pass --base" in line


def test_a_gguf_file_runs_img2img_and_inpaint(cli, files, tiny_flux, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    result = cli("img2img", photo, "a dog", "--model", files["flux-gguf"], "--base", tiny_flux, "--strength", "0.6", *FAST,
                 "-o", "i.png")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image("FluxImg2ImgPipeline", files["flux-gguf"], tiny_flux, "a dog", image=Image.open(photo),
                               strength=0.6, guidance_scale=3.5)
    assert np.abs(pixels("i.png") - expected).max() <= TOLERANCE
    Image.new("L", SIZE, 255).save("mask.png")
    result = cli("inpaint", photo, "a dog", "--mask", "mask.png", "--model", files["flux-gguf"], "--base", tiny_flux, *FAST,
                 "-o", "m.png")
    assert result.exit_code == 0 and Image.open("m.png").size == SIZE, result.stderr


@pytest.mark.gpu
def test_a_gguf_file_on_the_gpu_matches_the_cpu(cli, files, tiny_flux):
    """GGUF weights dequantized on the GPU in fp16: the CPU generator's noise, so close to the CPU's fp32 image."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base = ("a cat", "--model", files["flux-gguf"], "--base", tiny_flux, "--width", "32", "--height", "32", *FAST)
    gpu = cli("txt2img", *base, "--device", "cuda", "--no-optimize", "-o", "gpu.png", "--json")
    cpu = cli("txt2img", *base, "--device", "cpu", "-o", "cpu.png")
    assert gpu.exit_code == cpu.exit_code == 0, gpu.stderr
    assert gpu.json_lines()[0]["dtype"] == "float16"
    assert np.abs(pixels("gpu.png") - pixels("cpu.png")).mean() < 8


def test_a_fill_file_inpaints_on_a_dev_base(cli, tiny_flux_fill, tiny_flux, tmp_path):
    """flux1-fill-dev.safetensors on FLUX.1 dev's text encoders and VAE: the file's channels override the base's."""
    import diffusers
    import torch

    fill = save_safetensors(tmp_path / "fill.safetensors", transformer_state(tiny_flux_fill))
    photo = write_photo(tmp_path, SIZE)
    Image.new("L", SIZE, 255).save("mask.png")
    result = cli("inpaint", photo, "a dog", "--mask", "mask.png", "--model", fill, "--base", tiny_flux, *FAST,
                 "-o", "f.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert (result.json_lines()[0]["model_family"], result.json_lines()[0]["cfg"]) == ("flux-fill", 30.0)
    transformer = diffusers.FluxTransformer2DModel.from_single_file(str(fill), config=str(tiny_flux), subfolder="transformer",
                                                                    local_files_only=True, in_channels=288, out_channels=16)
    pipe = diffusers.FluxFillPipeline.from_pretrained(tiny_flux, transformer=transformer)
    expected = pipe("a dog", image=Image.open(photo), mask_image=Image.open("mask.png"), width=SIZE[0], height=SIZE[1],
                    num_inference_steps=2, guidance_scale=30.0, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.abs(pixels("f.png") - np.round(expected * 255)).max() <= TOLERANCE


# -- telling the family from the names (no weights read) ------------------------------------------------------------

def names_file(path: Path, shapes: dict[str, tuple]) -> Path:
    """A safetensors file holding zeros of these shapes (only the header matters)."""
    import torch

    return save_safetensors(path, {name: torch.zeros(shape) for name, shape in shapes.items()})


BFL = {"double_blocks.0.img_attn.qkv.weight": (9, 3), "double_blocks.0.img_mod.lin.weight": (18, 3),
       "img_in.weight": (3, 64), "final_layer.linear.weight": (64, 3),
       "single_blocks.0.linear1.weight": (1, 3), "single_blocks.1.linear1.weight": (1, 3)}
GUIDANCE = {"guidance_in.in_layer.weight": (3, 1)}
# FLUX.2's BFL names: FLUX.1's double and single blocks, but one modulation shared by all of each kind
FLUX2 = {"double_blocks.0.img_attn.qkv.weight": (9, 3), "single_stream_modulation.lin.weight": (9, 3),
         "img_in.weight": (3, 128), "final_layer.linear.weight": (128, 3), "single_blocks.0.linear1.weight": (1, 3),
         "single_blocks.1.linear1.weight": (1, 3)}


@pytest.mark.parametrize("shapes, prefix, expected", [
    ({**BFL, **GUIDANCE}, "", ("flux", "original", "black-forest-labs/FLUX.1-dev", 1, 2)),
    (BFL, COMFY, ("flux", "original", "black-forest-labs/FLUX.1-schnell", 1, 2)),
    ({**BFL, **GUIDANCE, "img_in.weight": (3, 384)}, "", ("flux-fill", "original", "black-forest-labs/FLUX.1-Fill-dev", 1, 2)),
    ({"joint_blocks.0.x_block.attn.qkv.weight": (9, 3), "joint_blocks.0.x_block.attn.ln_q.weight": (1,),
      "joint_blocks.1.x_block.attn.qkv.weight": (9, 3), "x_embedder.proj.weight": (3, 16, 2, 2)}, COMFY,
     ("sd3", "original", "stabilityai/stable-diffusion-3.5-large", 2, None)),
    ({"pos_embed.proj.weight": (3, 16, 2, 2), "transformer_blocks.0.attn.to_q.weight": (3, 3)}, "",
     ("sd3", "diffusers", "stabilityai/stable-diffusion-3-medium-diffusers", 1, None)),
    ({**FLUX2, **GUIDANCE}, COMFY, ("flux2", "original", "black-forest-labs/FLUX.2-dev", 1, 2)),
    (FLUX2, "", ("flux2-klein", "original", None, 1, 2)),
    ({"single_stream_modulation.linear.weight": (9, 3), "x_embedder.weight": (3, 128), "proj_out.weight": (128, 3),
      "transformer_blocks.0.attn.to_q.weight": (3, 3), "single_transformer_blocks.0.attn.to_out.weight": (3, 12)}, "",
     ("flux2-klein", "diffusers", None, 1, 1)),
], ids=["flux-dev", "flux-schnell-comfy", "flux-fill", "sd3.5-comfy", "sd3-diffusers", "flux2-dev-comfy", "flux2-klein",
        "flux2-klein-diffusers"])
def test_family_layout_and_default_base_from_names(tmp_path, shapes, prefix, expected):
    path = names_file(tmp_path / "t.safetensors", {prefix + name: shape for name, shape in shapes.items()})
    if expected[0] == "sd3" and expected[3] == 2:  # the same SD3.5 names in a file named as Large Turbo's
        turbo = transformer_files.inspect(shutil.copy(path, tmp_path / "sd3.5_large_turbo.safetensors"))
        assert models.default_base(turbo) == "stabilityai/stable-diffusion-3.5-large-turbo"
    info = transformer_files.inspect(path)
    config = info.denoiser
    try:
        base = models.default_base(info)
    except ModelError:  # FLUX.2 klein: 4B and 9B need their own --base
        base = None
    assert (info.family, info.layout, base, config["num_layers"], config.get("num_single_layers")) == expected


def test_an_sd_checkpoint_is_no_transformer_file(tmp_path):
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (1, 4, 1, 1), "first_stage_model.decoder.conv_out.weight": (1,)}
    assert transformer_files.inspect(names_file(tmp_path / "sd.safetensors", shapes)) is None


# -- refused before any weights load --------------------------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))


def refused(cli, *args) -> str:
    """Run txt2img; assert exit 2 with one line on stderr; return it."""
    result = cli("txt2img", "a cat", *FAST, *map(str, args))
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def gguf_bytes(version: int = 3, tensors: int = 1, entries: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, entries)


@pytest.mark.parametrize("content, message", [
    (b"GGUX" + b"\0" * 40, "not a weight file diffcli can read"),
    (b"GGUF\x03\0\0\0", "is truncated: a GGUF header needs 24 bytes"),
    (gguf_bytes(version=9) + b"\0" * 64, "is GGUF version 9"),
    (gguf_bytes(tensors=2**62) + b"\0" * 64, "not a valid GGUF file: it claims 4611686018427387904 tensors"),
    (gguf_bytes(entries=10**6) + b"\0" * 64, "not a valid GGUF file: it claims 1 tensors and 1000000 metadata"),
    (gguf_bytes(tensors=2) + struct.pack("<Q", 2**40) + b"\0" * 40, "not a valid GGUF file"),  # a name 1 TB long
    (pickle.dumps({"x": 1}, protocol=2), "is a pickle file"),
])
def test_bad_gguf_bytes_are_refused(cli, no_loading, tmp_path, content, message):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    assert message in refused(cli, "--model", path)


def test_a_truncated_gguf_file_is_refused(cli, no_loading, files, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(files["flux-gguf"].read_bytes()[:-200])
    assert "is not a valid GGUF file" in refused(cli, "--model", path, "--base", tmp_path)


def test_a_gguf_of_another_model_and_a_plain_safetensors_named_gguf(cli, no_loading, tmp_path):
    import torch

    line = refused(cli, "--model", write_gguf(tmp_path / "llm.gguf", {"blk.0.attn_q.weight": torch.zeros(4, 32)}, "llama"))
    assert "is a GGUF file of no transformer diffcli loads (first tensors: blk.0.attn_q.weight)" in line
    line = refused(cli, "--model", save_safetensors(tmp_path / "x.gguf", {"x": torch.zeros(2)}))
    assert "is not a full Stable Diffusion checkpoint" in line  # the bytes decide: a safetensors file, of no model


def test_the_name_never_decides(files, tmp_path):
    upper = tmp_path / "FLUX.GGUF"
    upper.write_bytes(files["flux-gguf"].read_bytes())
    assert transformer_files.inspect(upper).format == "gguf"


@pytest.mark.parametrize("base, message", [
    ("{tmp}/missing", "/missing': no such folder"),
    ("../../etc/passwd", "'../../etc/passwd': no such folder"),
    ("no-slash", "is neither a folder nor a Hub id (owner/name)"),
    ("{tmp}/note.txt", "is a file"),
    ("{tmp}", "is not a diffusers folder (no model_index.json)"),
    ("{sd3}", "is not a flux model (its transformer is SD3Transformer2DModel), got a flux file"),
])
def test_bad_bases_are_refused(cli, no_loading, files, tiny_sd3, tmp_path, base, message):
    (tmp_path / "note.txt").write_text("x")
    line = refused(cli, "--model", files["flux"], "--base", base.format(tmp=tmp_path, sd3=tiny_sd3))
    assert line.startswith("diffcli: error: --base ") and message in line, line


def test_base_is_for_transformer_only_files(cli, no_loading, tiny_flux):
    line = refused(cli, "--model", tiny_flux, "--base", tiny_flux)
    assert "--base completes a transformer-only file; " in line and "is a complete model" in line


def test_the_default_base_offline_names_base(cli, no_loading, files):
    line = refused(cli, "--model", files["flux"])
    assert "its text encoders and VAE come from --base, by default black-forest-labs/FLUX.1-dev" in line
    assert "pass --base" in line


@pytest.mark.parametrize("suffix", [".safetensors", ".gguf"])
def test_a_narrow_bfl_file_is_refused_with_the_diffusers_limit(cli, no_loading, tiny_flux, tmp_path, suffix):
    """city96's GGUF files name tensors as BFL does; diffusers 0.42 converts those at FLUX.1's width only."""
    import torch

    shapes = {**BFL, **GUIDANCE, "img_in.weight": (32, 16), "final_layer.linear.weight": (16, 32)}
    path = tmp_path / f"bfl{suffix}"
    if suffix == ".gguf":
        write_gguf(path, {COMFY + name: torch.zeros(shape) for name, shape in shapes.items()}, "flux")
    else:
        names_file(path, shapes)
    line = refused(cli, "--model", path, "--base", tiny_flux)
    assert "diffusers converts original-layout flux files of width 3072 only, got 32" in line


def test_a_gguf_file_without_the_gguf_package(cli, no_loading, files, tiny_flux, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    line = refused(cli, "--model", files["flux-gguf"], "--base", tiny_flux)
    assert "needs the optional package gguf, which is not installed (pip install 'diffcli[gguf]')" in line


def test_a_hub_base_from_the_cache(cli, files, tiny_flux, tmp_path, monkeypatch):
    """A Hub id as --base is read from the Hugging Face cache, as --model is (offline: the cache only)."""
    import shutil

    from huggingface_hub import constants

    repo, commit = "diffcli-test/tiny-flux", "0" * 40
    shutil.copytree(tiny_flux, tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / commit)
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    from diffcli.models import resolve_model

    spec = resolve_model(str(files["flux"]), base=repo)
    assert (spec.family, spec.base, spec.revision, Path(spec.config_dir).name) == ("flux", repo, commit, commit)
    result = cli("txt2img", "a cat", "--model", files["flux"], "--base", repo, "--width", "32", "--height", "32", *FAST,
                 "--json")
    assert result.exit_code == 0 and result.json_lines()[0]["base"] == repo, result.stderr
    with pytest.raises(ModelError, match="--base 'diffcli-test/absent' is not in the Hugging Face cache"):
        resolve_model(str(files["flux"]), base="diffcli-test/absent")


def test_replay_reads_the_recorded_base(cli, files, tiny_flux):
    made = cli("txt2img", "a cat", "--model", files["flux-gguf"], "--base", tiny_flux, "--width", "32", "--height", "32",
               *FAST, "-o", "r.png")
    assert made.exit_code == 0, made.stderr
    result = cli("replay", "r.png", "--verify", "-o", "again.png")
    assert result.exit_code == 0 and "verify: identical to r.png" in result.stderr, result.stderr


def test_the_cpu_path_counts_a_transformer_files_parameters_without_loading(files, tiny_flux):
    """cpu.denoiser_parameters reads GGUF and safetensors tables only: a tiny file stays on the fp32 path."""
    from diffcli import cpu, models

    expected = sum(t.numel() for t in transformer_state(tiny_flux).values())
    for name in ("flux", "flux-gguf"):
        spec = models.resolve_model(str(files[name]), base=str(tiny_flux))
        assert cpu.denoiser_parameters(spec) == expected


@pytest.mark.parametrize("case, message", [
    ("flat-input", "tensor img_in.weight has shape [128], not a flux2 transformer's"),
    ("flux1-base", "is not a flux2-klein model (its transformer is FluxTransformer2DModel), got a flux2-klein file"),
    ("dev-base", "its transformer is 32 wide, the file's 3"),
])
def test_bad_flux2_files_and_bases_are_refused(cli, no_loading, tmp_path, tiny_flux, tiny_flux2, case, message):
    """A FLUX.2-named file whose input projection is no matrix, a klein file with a FLUX.1 base, and one wider than
    its base: one line, exit 2, before any weights load."""
    shapes = dict(FLUX2, **({"img_in.weight": (128,)} if case == "flat-input" else {}))
    path = names_file(tmp_path / "flux2-klein.safetensors", shapes)
    base = {"flat-input": tiny_flux2, "flux1-base": tiny_flux, "dev-base": tiny_flux2}[case]
    assert message in refused(cli, "--model", path, "--base", base)
