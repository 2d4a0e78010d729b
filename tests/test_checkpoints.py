"""Single-file checkpoints: header checks, family detection, pickle refusal, offline loading, packaged configs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from diffcli import checkpoints, weights
from diffcli.errors import ModelError
from conftest import build_tiny_sdxl
from diffcli.ldm_format import save_original_checkpoint, unet_to_ldm

SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
XL_TEXT = ["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
           "conditioner.embedders.1.model.positional_embedding"]
REFINER_TEXT = "conditioner.embedders.0.model.text_projection"
VAE = "first_stage_model.decoder.conv_out.weight"
SD_TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
XL_TO_K = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def write_checkpoint(path: Path, text_keys: list[str], context: int, in_channels: int = 4,
                     to_k: str = SD_TO_K, extra: dict | None = None, metadata: dict | None = None) -> Path:
    """A tiny safetensors file with a family's key names and only the telling shapes real-sized."""
    import torch
    from safetensors.torch import save_file

    tensors = {key: torch.zeros(1) for key in [*text_keys, VAE]}
    tensors[to_k] = torch.zeros(1, context)
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1, in_channels, 1, 1)
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


# -- header ------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "git lfs pull"),
    (b"PK\x03\x04" + b"\0" * 40, "PyTorch zip"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a safetensors file"),
    (b"abc", "only 3 bytes"),
    (struct.pack("<Q", 1000) + b'{"a": 1}', "header needs 1008 bytes"),
    (struct.pack("<Q", 5) + b"{oops", "bad JSON header"),
])
def test_header_errors(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        weights.read_safetensors_header(path)


def test_truncated_file_is_named(tmp_path):
    path = write_checkpoint(tmp_path / "model.safetensors", [SD1_TEXT], 768)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"truncated: its tensors need \d+ bytes, the file has \d+"):
        weights.read_safetensors_header(path)


def test_header_reads_metadata_and_shapes(tmp_path):
    path = write_checkpoint(tmp_path / "model.safetensors", [SD1_TEXT], 768, metadata={"k": "v"})
    header = weights.read_safetensors_header(path)
    assert header["__metadata__"] == {"k": "v"} and header[SD_TO_K]["shape"] == [1, 768]


# -- family detection ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, context, channels, to_k, extra_key, metadata, expected", [
    ([SD1_TEXT], 768, 4, SD_TO_K, None, None, ("sd1", False, "epsilon", True, "sd15")),
    ([SD1_TEXT], 768, 9, SD_TO_K, None, None, ("sd1", True, "epsilon", True, "sd15-inpaint")),
    ([SD2_TEXT], 1024, 4, SD_TO_K, None, None, ("sd2", False, "v_prediction", True, "sd2-v")),
    ([SD2_TEXT], 1024, 4, SD_TO_K, None, {"modelspec.prediction_type": "epsilon"}, ("sd2", False, "epsilon", False, "sd2")),
    ([SD2_TEXT], 1024, 4, SD_TO_K, None, {"ss_v_parameterization": "True"}, ("sd2", False, "v_prediction", False, "sd2-v")),
    ([SD2_TEXT], 1024, 9, SD_TO_K, None, None, ("sd2", True, "epsilon", True, "sd2-inpaint")),
    (XL_TEXT, 2048, 4, XL_TO_K, None, None, ("sdxl", False, "epsilon", True, "sdxl")),
    (XL_TEXT, 2048, 4, XL_TO_K, "v_pred", None, ("sdxl", False, "v_prediction", False, "sdxl")),
    (XL_TEXT, 2048, 9, XL_TO_K, None, None, ("sdxl", True, "epsilon", True, "sdxl-inpaint")),
    ([REFINER_TEXT], 1280, 4, XL_TO_K, None, None, ("sdxl-refiner", False, "epsilon", True, "sdxl-refiner")),
])
def test_family_from_keys_and_shapes(tmp_path, text, context, channels, to_k, extra_key, metadata, expected):
    import torch

    extra = {extra_key: torch.zeros(1)} if extra_key else None
    path = write_checkpoint(tmp_path / "model.safetensors", text, context, channels, to_k, extra, metadata)
    info = checkpoints.inspect_checkpoint(path)
    assert (info.family, info.inpaint, info.prediction_type, info.prediction_guessed, Path(info.config_dir).name) == expected
    assert Path(info.config_dir).parent == checkpoints.CONFIGS


def test_unknown_layouts_say_what_they_look_like(tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.zeros(1)}, str(lora))
    with pytest.raises(ModelError, match=r"style.safetensors.*no model.diffusion_model.\* keys.*a LoRA"):
        checkpoints.inspect_checkpoint(lora)
    with pytest.raises(ModelError, match="no text encoder weights") as err:
        checkpoints.inspect_checkpoint(write_checkpoint(tmp_path / "unet.safetensors", [], 768))
    assert "cond_stage_model.transformer.*" in err.value.hint
    with pytest.raises(ModelError, match="cross-attention width 1024, expected 768"):
        checkpoints.inspect_checkpoint(write_checkpoint(tmp_path / "mixed.safetensors", [SD1_TEXT], 1024))
    with pytest.raises(ModelError, match="takes 8 input channels"):
        checkpoints.inspect_checkpoint(write_checkpoint(tmp_path / "p2p.safetensors", [SD1_TEXT], 768, 8))


def test_model_config_skips_shape_checks(tmp_path, tiny_model):
    path = write_checkpoint(tmp_path / "odd.safetensors", [SD1_TEXT], 1024, 8)
    assert checkpoints.inspect_checkpoint(path, str(tiny_model)).config_dir == str(tiny_model)
    with pytest.raises(ModelError, match=r"--model-config '.*nowhere' is not a diffusers folder"):
        checkpoints.inspect_checkpoint(path, str(tmp_path / "nowhere"))


# -- pickle ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".SAFETENSORS"])
def test_pickle_refused_unless_allowed(tmp_path, suffix):
    import torch

    path = tmp_path / f"model{suffix}"
    torch.save({SD1_TEXT: torch.zeros(1)}, path)
    with pytest.raises(ModelError, match="is a pickle file") as err:
        checkpoints.inspect_checkpoint(path)
    assert "--allow-pickle" in err.value.hint and "safetensors" in err.value.hint


def test_allowed_pickle_is_inspected(tmp_path):
    import torch

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {SD1_TEXT: torch.zeros(1), VAE: torch.zeros(1), SD_TO_K: torch.zeros(1, 768),
                               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}}, path)
    assert checkpoints.inspect_checkpoint(path, allow_pickle=True).family == "sd1"


# -- loading ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_single_file(tiny_model, tiny_checkpoint):
    """The tiny pipeline and its original-layout single file."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model), tiny_checkpoint


def test_round_trip_through_from_single_file(tiny_model, tiny_single_file):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe, path = tiny_single_file
    info = checkpoints.inspect_checkpoint(path, str(tiny_model))
    assert (info.family, info.inpaint) == ("sd1", False)
    kwargs = checkpoints.single_file_kwargs(info, str(tiny_model))
    assert kwargs["config"] == str(tiny_model) and "tokenizer" not in kwargs  # the folder has its own vocabulary
    loaded = StableDiffusionPipeline.from_single_file(str(path), **kwargs, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        original, reloaded = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == reloaded.keys(), name
        assert all(torch.equal(original[k], reloaded[k]) for k in original), name


def test_sdxl_round_trip_through_from_single_file(tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = build_tiny_sdxl(tmp_path)
    pipe.save_pretrained(tmp_path / "tiny-xl")
    path = save_original_checkpoint(pipe, tmp_path / "tiny-xl.safetensors")
    info = checkpoints.inspect_checkpoint(path, str(tmp_path / "tiny-xl"))
    assert info.family == "sdxl"
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), **checkpoints.single_file_kwargs(info))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        original, reloaded = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == reloaded.keys(), name
        assert all(torch.equal(original[k], reloaded[k]) for k in original), name


def test_single_file_kwargs_for_packaged_configs(tmp_path):
    path = write_checkpoint(tmp_path / "v.safetensors", [SD1_TEXT], 768, metadata={"modelspec.prediction_type": "v"})
    kwargs = checkpoints.single_file_kwargs(checkpoints.inspect_checkpoint(path))
    assert Path(kwargs["config"]).name == "sd15" and kwargs["local_files_only"]
    assert kwargs["scheduler"].config.prediction_type == "v_prediction"  # sd15's scheduler says epsilon
    assert kwargs["tokenizer"].pad_token == "<|endoftext|>"


def test_packaged_tokenizers_are_clip():
    prompt_ids = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    tokenizers = checkpoints.packaged_tokenizers("sdxl")
    assert set(tokenizers) == {"tokenizer", "tokenizer_2"}
    for tokenizer in tokenizers.values():
        assert tokenizer("a photo of an astronaut riding a horse").input_ids == prompt_ids
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert (tokenizers["tokenizer"].pad_token_id, tokenizers["tokenizer_2"].pad_token_id) == (49407, 0)
    assert checkpoints.packaged_tokenizers("sd2")["tokenizer"].pad_token == "!"  # OpenCLIP pads with id 0
    assert set(checkpoints.packaged_tokenizers("sdxl-refiner")) == {"tokenizer_2"}


# -- packaged configs --------------------------------------------------------------------------------

PACKAGED = {  # folder -> (pipeline, unet params, cross-attention, in channels, prediction, vae scale, text params)
    "sd15": ("StableDiffusionPipeline", 859_520_964, 768, 4, "epsilon", 0.18215, [123_060_480]),
    "sd15-inpaint": ("StableDiffusionInpaintPipeline", 859_535_364, 768, 9, "epsilon", 0.18215, [123_060_480]),
    "sd2": ("StableDiffusionPipeline", 865_910_724, 1024, 4, "epsilon", 0.18215, [340_387_840]),
    "sd2-v": ("StableDiffusionPipeline", 865_910_724, 1024, 4, "v_prediction", 0.18215, [340_387_840]),
    "sd2-inpaint": ("StableDiffusionInpaintPipeline", 865_925_124, 1024, 9, "epsilon", 0.18215, [340_387_840]),
    "sdxl": ("StableDiffusionXLPipeline", 2_567_463_684, 2048, 4, "epsilon", 0.13025, [123_060_480, 694_659_840]),
    "sdxl-inpaint": ("StableDiffusionXLInpaintPipeline", 2_567_478_084, 2048, 9, "epsilon", 0.13025,
                     [123_060_480, 694_659_840]),
    "sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline", 2_259_526_660, 1280, 4, "epsilon", 0.13025, [694_659_840]),
}


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_config_builds_the_published_architecture(name):
    """Parameter counts on the meta device equal the published models' (no weights allocated)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pipeline, unet_params, context, in_channels, prediction, scale, text_params = PACKAGED[name]
    root = checkpoints.CONFIGS / name
    index = json.loads((root / "model_index.json").read_text())
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == pipeline and scheduler["prediction_type"] == prediction
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        encoders = [getattr(transformers, index[n][1])(transformers.CLIPTextConfig.from_pretrained(root / n))
                    for n in ("text_encoder", "text_encoder_2") if index.get(n, [None])[0]]
    assert (count(unet), unet.config.cross_attention_dim, unet.config.in_channels) == (unet_params, context, in_channels)
    assert (count(vae), vae.config.scaling_factor) == (83_653_863, scale)
    assert [count(e) for e in encoders] == text_params
    assert all((root / n / "tokenizer_config.json").is_file() for n in index if n.startswith("tokenizer") and index[n][0])


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_ldm_keys_match_diffusers_conversion(name):
    """ldm_format's UNet layout is what diffusers' converter reads back, key for key (meta tensors)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = UNet2DConditionModel.load_config(checkpoints.CONFIGS / name / "unet")
    with torch.device("meta"):
        state = UNet2DConditionModel.from_config(config).state_dict()
    ldm = unet_to_ldm(state, config["layers_per_block"])
    if name == "sd15":  # names as in v1-5-pruned-emaonly.safetensors
        assert {"model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight", "model.diffusion_model.middle_block.2.out_layers.3.bias",
                SD_TO_K} <= ldm.keys()
    assert convert_ldm_unet_checkpoint(ldm, config).keys() == state.keys()
