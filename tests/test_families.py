"""The model-family registry: every entry complete and consistent with diffusers and the packaged configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffcli import families
from diffcli.checkpoints import CONFIGS
from diffcli.errors import ModelError, UsageError
from diffcli.models import BUNDLED_DIR, ModelSpec

# Recorded in image metadata as model_family: a rename breaks every image made before it.
NAMES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd-refiner", "sd-x4-upscaler", "sd-latent-upscaler", "sd3", "flux",
         "flux-fill", "qwen-image", "z-image", "flux-kontext", "qwen-image-edit", "qwen-image-edit-plus", "flux2",
         "flux2-klein", "flux2-klein-kv", "generic")
ENTRIES = list(families.FAMILIES.values())


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_the_names_are_the_recorded_ones():
    assert tuple(families.FAMILIES) == NAMES
    assert all(families.get(name).name == name for name in NAMES)


@pytest.mark.parametrize("family", ENTRIES, ids=lambda f: f.name)
def test_entry_is_complete(family):
    import diffusers

    assert set(family.pipelines) <= set(families.TASKS)
    for class_name in family.pipelines.values():
        assert getattr(diffusers, class_name).__name__ == class_name
    controlnet_pipelines = {c for nets in family.controlnet.values() for c in nets.pipelines.values()}
    assert set(family.call_styles) <= set(family.pipelines.values()) | controlnet_pipelines
    import diffusers.models.controlnets as controlnets

    for model_class, nets in family.controlnet.items():
        assert getattr(controlnets, model_class).__name__ == model_class
        assert not nets.multi or hasattr(controlnets, nets.multi)  # "": one unit only (Z-Image)
        assert set(nets.pipelines) <= set(family.pipelines)  # a task runs without ControlNets too
        assert all(getattr(diffusers, c).__name__ == c for c in nets.pipelines.values())
        assert all(isinstance(value, int) and value >= 0 for value in nets.modes.values())
    assert family.prompt_encoder in families.PROMPT_ENCODERS
    assert (family.prompt_encoder == "none") == (not family.text_encoders)
    assert all(name.startswith("text_encoder") for name in family.text_encoders)
    assert set(family.refiners) <= set(families.FAMILIES)
    assert all(families.get(r).upscale is None for r in family.refiners)
    assert (family.upscale is not None) == ("upscale" in family.pipelines)
    assert family.upscale is None or (family.upscale[1] > 1 and family.native_size is None)  # sized by the input
    assert family.size_multiple in (4, 8) and family.low_vram_gib > 0
    assert family.prediction_type in ("epsilon", "v_prediction")
    classes = [getattr(diffusers, c) for c in family.pipelines.values()]
    assert family.lora == (bool(classes) and all(hasattr(c, "load_lora_weights") for c in classes))
    assert family.task_hint is None or set(family.pipelines) != set(families.TASKS)
    assert family.img2img == ("img2img" in family.pipelines) and family.inpaint == ("inpaint" in family.pipelines)
    assert family.takes_refiner == bool(family.refiners)
    assert family.denoiser in families.DENOISERS and family.guidance in families.GUIDANCE
    assert all(v.guidance in (None, *families.GUIDANCE) and "steps" in v.defaults for v in family.variants)
    assert not family.variants or not family.variants[-1].when  # the last variant takes the family's other models
    if family.denoiser == "transformer":  # what needs a U-Net is not declared for it
        assert not family.refiners and not family.single_file and family.flow_match
        assert all(not style.prompt_embeds for style in family.call_styles.values())


def test_one_call_style_per_pipeline_class():
    seen = {}
    for family in ENTRIES:
        for class_name, style in family.call_styles.items():
            assert seen.setdefault(class_name, style) == style, class_name
    assert families.call_style("StableDiffusionPipeline") == families.CallStyle()
    assert families.call_style("StableDiffusionInpaintPipeline").repeat_image
    latent = families.call_style("StableDiffusionLatentUpscalePipeline")
    assert (latent.prompt_embeds, latent.repeat_image, latent.step_end_callback) == (False, True, False)


def test_entries_cannot_be_changed():
    with pytest.raises(AttributeError):
        families.get("sd1").low_vram_gib = 1.0
    with pytest.raises(TypeError):
        families.get("sd1").pipelines["txt2img"] = "Other"


@pytest.mark.parametrize("family", [f for f in ENTRIES if f.single_file], ids=lambda f: f.name)
def test_packaged_configs_are_the_family(family):
    """Each config folder a single file loads with is detected as its family, with its encoders and widths."""
    single = family.single_file
    for inpaint, prediction, folder in [(False, "epsilon", single.config), (False, "v_prediction", single.config_v),
                                        (True, "epsilon", single.config_inpaint)]:
        if folder is None:
            continue
        assert single.config_name(inpaint, prediction) == folder
        index, unet = read(CONFIGS / folder, "model_index.json"), read(CONFIGS / folder, "unet/config.json")
        assert families.detect(index, unet) == family.name
        assert index["_class_name"] in family.pipelines.values()
        assert tuple(k for k, v in index.items() if k.startswith("text_encoder") and v[0]) == family.text_encoders
        assert unet["cross_attention_dim"] == single.cross_attention_dim and (unet["in_channels"] == 9) == inpaint
        scheduler = read(CONFIGS / folder, "scheduler/scheduler_config.json")
        assert scheduler.get("prediction_type", "epsilon") == ("v_prediction" if folder == single.config_v else "epsilon")
    native = single.config_v or single.config
    assert family.native_size == read(CONFIGS / native, "unet/config.json")["sample_size"] * family.size_multiple


def test_every_packaged_config_belongs_to_a_family():
    named = {n for f in ENTRIES if f.single_file for n in (f.single_file.config, f.single_file.config_v,
                                                          f.single_file.config_inpaint) if n}
    assert named == {p.name for p in CONFIGS.iterdir() if (p / "model_index.json").is_file()}


@pytest.mark.parametrize("family, inpaint, prediction, folder", [
    ("sd1", False, "epsilon", "sd15"), ("sd1", False, "v_prediction", "sd15"), ("sd1", True, "epsilon", "sd15-inpaint"),
    ("sd2", False, "epsilon", "sd2"), ("sd2", False, "v_prediction", "sd2-v"), ("sd2", True, "v_prediction", "sd2-inpaint"),
    ("sdxl", False, "v_prediction", "sdxl"), ("sdxl", True, "epsilon", "sdxl-inpaint"),
    ("sdxl-refiner", False, "epsilon", "sdxl-refiner"), ("sdxl-refiner", True, "epsilon", None),
])
def test_config_names(family, inpaint, prediction, folder):
    assert families.get(family).single_file.config_name(inpaint, prediction) == folder


def test_single_file_prefixes_tell_families_apart():
    prefixes = [f.single_file.text_encoder_prefix for f in ENTRIES if f.single_file]
    assert not any(a != b and a.startswith(b) for a in prefixes for b in prefixes)


# -- detection from a diffusers folder's configs -----------------------------------------------------------

SD_INDEX = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
NO_TEXT = {"text_encoder": [None, None]}


@pytest.mark.parametrize("index, unet, expected", [
    (SD_INDEX, {"cross_attention_dim": 768}, "sd1"),
    (SD_INDEX, {}, "sd1"),
    (SD_INDEX, {"cross_attention_dim": 1024}, "sd2"),
    ({**SD_INDEX, "_class_name": "StableDiffusionInpaintPipeline"}, {"cross_attention_dim": 1024, "in_channels": 9}, "sd2"),
    ({**SD_INDEX, **NO_TEXT}, {"cross_attention_dim": 768}, "sd-refiner"),
    ({"_class_name": "StableDiffusionPipeline"}, {}, "sd-refiner"),
    ({**SD_INDEX, "_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "X"]}, {}, "sdxl"),
    ({**SD_INDEX, "_class_name": "StableDiffusionPipeline"}, {"addition_embed_type": "text_time"}, "sdxl"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", **NO_TEXT, "text_encoder_2": ["transformers", "X"]}, {},
     "sdxl-refiner"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", **NO_TEXT}, {}, "sdxl"),
    ({"_class_name": "StableDiffusionUpscalePipeline"}, {}, "sd-x4-upscaler"),
    ({"_class_name": "StableDiffusionLatentUpscalePipeline"}, {}, "sd-latent-upscaler"),
    ({"_class_name": "StableDiffusion3Pipeline"}, {"qk_norm": "rms_norm"}, "sd3"),
    ({"_class_name": "StableDiffusion3InpaintPipeline"}, {}, "sd3"),
    ({"_class_name": "FluxPipeline"}, {"guidance_embeds": True}, "flux"),
    ({"_class_name": "FluxImg2ImgPipeline"}, {}, "flux"),
    ({"_class_name": "FluxFillPipeline"}, {"in_channels": 384}, "flux-fill"),
])
def test_detect(index, unet, expected):
    assert families.detect(index, unet) == expected


@pytest.mark.parametrize("class_name", ["KandinskyPipeline", "FluxControlPipeline", "StableDiffusion3ControlNetPipeline", ""])
def test_detect_refuses_other_pipelines(class_name):
    with pytest.raises(ModelError, match=f"unsupported pipeline class '{class_name}'") as err:
        families.detect({**SD_INDEX, "_class_name": class_name}, {})
    assert "Stable Diffusion 1.x, 2.x, XL and 3.x, FLUX.1" in err.value.hint and "Qwen-Image and Z-Image" in err.value.hint


@pytest.mark.parametrize("name, expected", [("tiny-shapes", "sd1"), ("tiny-shapes-refiner", "sd-refiner"),
                                            ("tiny-shapes-x4", "sd-x4-upscaler")])
def test_bundled_models(name, expected):
    folder = BUNDLED_DIR / name
    assert families.detect(read(folder, "model_index.json"), read(folder, "unet/config.json")) == expected


@pytest.mark.parametrize("family, denoiser, expected", [
    ("flux", {"guidance_embeds": True}, "dev"), ("flux", {"guidance_embeds": False}, "schnell"), ("flux", {}, "schnell"),
    ("sd3", {"qk_norm": "rms_norm"}, "sd3.5"), ("sd3", {"qk_norm": None}, "sd3"), ("sdxl", {}, None),
])
def test_variants(family, denoiser, expected):
    variant = families.variant(family, denoiser)
    assert (variant.name if variant else None) == expected


# -- lookups ---------------------------------------------------------------------------------------------

def test_upscalers():
    assert families.upscale_methods() == ("x4", "latent")
    assert families.upscaler("x4") == ("sd-x4-upscaler", 4)
    assert families.upscaler("latent") == ("sd-latent-upscaler", 2)
    with pytest.raises(UsageError, match="unknown upscale method 'lanczos'") as err:
        families.upscaler("lanczos")
    assert err.value.hint == "choose one of: x4, latent"


def test_refiners_of():
    assert families.refiners_of("sdxl") == ("sdxl-refiner", "sdxl")
    assert families.refiners_of("sd1") == families.refiners_of("sd2") == ("sd1", "sd2", "sd-refiner")
    for name in ("sdxl-refiner", "sd-refiner", "sd-x4-upscaler", "sd-latent-upscaler"):
        assert families.refiners_of(name) == ()


def test_pipeline_classes():
    assert families.pipeline_class("sd1", "inpaint") == families.pipeline_class("sd2", "inpaint") == "StableDiffusionInpaintPipeline"
    assert families.pipeline_class("sdxl", "txt2img") == "StableDiffusionXLPipeline"
    assert families.pipeline_class("sdxl-refiner", "img2img") == "StableDiffusionXLImg2ImgPipeline"
    assert families.pipeline_class("sdxl-refiner", "txt2img") is None
    assert families.pipeline_class("sd-refiner", "txt2img") is None
    assert families.pipeline_class("sd1", "upscale") is None


def test_pipeline_refuses_a_task_the_family_lacks():
    from diffcli.pipeline import pipeline_class_name

    spec = ModelSpec("folder", "/m", "m", "sd-refiner")
    with pytest.raises(UsageError, match=r"txt2img does not work with 'm' \(sd-refiner model\)") as err:
        pipeline_class_name(spec, "txt2img")
    assert "--refiner" in err.value.hint
    with pytest.raises(UsageError) as err:
        pipeline_class_name(ModelSpec("folder", "/m", "m", "sdxl-refiner"), "txt2img")
    assert err.value.hint is None


@pytest.mark.parametrize("call", [families.get, families.refiners_of, lambda n: families.pipeline_class(n, "txt2img")])
def test_unknown_family(call):
    with pytest.raises(ModelError, match="unknown model family 'sd9'") as err:
        call("sd9")
    assert "sd1" in err.value.hint


@pytest.mark.parametrize("family, bf16, expected", [
    ("flux", True, "bfloat16"), ("sd3", True, "bfloat16"), ("qwen-image", True, "bfloat16"), ("z-image", True, "bfloat16"),
    ("flux2", True, "bfloat16"), ("flux", False, "float16"),  # a GPU without bf16 (Turing): fp16 still
    ("sd1", True, "float16"), ("sdxl", True, "float16"),  # the U-Net families keep fp16 (their VAEs' fixes are fp16's)
])
def test_auto_dtype_on_cuda_is_bf16_for_the_transformer_families(monkeypatch, family, bf16, expected):
    import torch

    from diffcli.pipeline import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    spec = ModelSpec(source="hub", location="x/y", name="x/y", family=family)
    assert str(resolve_dtype("auto", "cuda", spec)) == f"torch.{expected}"
    assert str(resolve_dtype("auto", "mps", spec)) == "torch.float16"
    assert resolve_dtype("fp16", "cuda", spec) == torch.float16  # asked for: kept
