"""Other diffusers text-to-image pipelines (the generic family) on tiny real components, through the CLI: PixArt-Sigma
(noise prediction), Chroma (flow matching) and an LCM (img2img as diffusers' AutoPipeline maps it) equal to the plain
diffusers pipelines, their metadata, a batch line, what they cannot honour refused before loading, and model_index.json
files that name no pipeline diffcli runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flow_models import FAST, SIZE, TOLERANCE, diffusers_image, model, tiny_chroma, tiny_lcm, tiny_pixart, tiny_sana, tiny_hidream  # noqa: F401 (fixtures)
from PIL import Image
from task_inputs import pixels, write_mask, write_photo

from diffcli import families
from diffcli.output import read_metadata

PIXART = {"use_resolution_binning": False, "clean_caption": False}  # what diffcli passes: the size asked, the prompt as is


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights load (plan-time refusals)."""
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))


def test_folders_resolve_to_the_generic_family_with_their_pipeline(tiny_pixart, tiny_chroma, tiny_lcm):
    from diffcli.models import resolve_model

    pixart, chroma, lcm = (resolve_model(str(folder)) for folder in (tiny_pixart, tiny_chroma, tiny_lcm))
    assert (pixart.family, pixart.pipeline, pixart.flow_match) == ("generic", "PixArtSigmaPipeline", False)
    assert (chroma.family, chroma.pipeline, chroma.flow_match) == ("generic", "ChromaPipeline", True)
    assert pixart.defaults == {"steps": 20, "cfg": 4.5} and chroma.defaults == {"steps": 35, "cfg": 5.0}  # __call__'s
    assert pixart.sample_size == 64 and chroma.sample_size == 1024  # 8 x the VAE's 8; no sample_size: the family's
    assert pixart.size_multiple == chroma.size_multiple == 16  # PixArt's 2x2 patches, Chroma's packed 2x2 latents
    assert families.of(pixart).pipelines == {"txt2img": "PixArtSigmaPipeline"}
    assert families.of(lcm).pipelines == {"txt2img": "LatentConsistencyModelPipeline",
                                          "img2img": "LatentConsistencyModelImg2ImgPipeline"}
    assert not families.of(pixart).lora and families.of(chroma).lora


@pytest.mark.parametrize("model, class_name, extra, size", [
    ("tiny_pixart", "PixArtSigmaPipeline", PIXART, SIZE), ("tiny_chroma", "ChromaPipeline", {}, SIZE),
    ("tiny_sana", "SanaPipeline", PIXART, (64, 32)),  # its DC-AE's factor 32
], indirect=["model"], ids=["pixart", "chroma", "sana"])
def test_txt2img_equals_diffusers(cli, model, class_name, extra, size):
    result = cli("txt2img", "a red cat", "-n", "blurry", "--cfg", "3", "--model", model, "--width", size[0],
                 "--height", size[1], *FAST, "-o", "t.png", "--json")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image(class_name, model, "a red cat", negative_prompt="blurry", guidance_scale=3.0,
                               width=size[0], height=size[1], **extra)
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    meta = read_metadata("t.png")
    assert (meta["model_family"], meta["pipeline"], meta["steps"], meta["cfg"]) == ("generic", class_name, 2, 3.0)
    assert meta["negative"] == "blurry" and meta["warnings"] == [] and result.json_lines()[0]["pipeline"] == class_name


def test_inputs_the_pipeline_itself_refuses_are_a_usage_error(cli, tiny_pixart, monkeypatch):
    """A generic pipeline's own rules (known only once it is loaded) are one line and exit 2, not an unexpected error;
    other ValueErrors stay what they are."""
    from diffusers import PixArtSigmaPipeline

    def check_inputs(self, *args, **kwargs):
        raise ValueError("`height` and `width` have to be divisible by 48 but are 64 and 48.\nmore")

    monkeypatch.setattr(PixArtSigmaPipeline, "check_inputs", check_inputs)
    result = cli("txt2img", "a red cat", "--model", tiny_pixart, "--width", SIZE[0], "--height", SIZE[1], *FAST, "-o", "r.png")
    assert result.exit_code == 2 and not Path("r.png").exists(), result.stderr
    assert ("diffcli: error: PixArtSigmaPipeline refused the inputs: `height` and `width` have to be divisible by 48 but "
            "are 64 and 48.\n") in result.stderr
    monkeypatch.setattr(PixArtSigmaPipeline, "prepare_latents", lambda *a, **k: (_ for _ in ()).throw(ValueError("bug")))
    monkeypatch.setattr(PixArtSigmaPipeline, "check_inputs", lambda *a, **k: None)
    other = cli("txt2img", "a red cat", "--model", tiny_pixart, "--width", SIZE[0], "--height", SIZE[1], *FAST, "-o", "r.png")
    assert other.exit_code == 1 and "unexpected ValueError: bug" in other.stderr, other.stderr


@pytest.mark.slow
def test_hidream_records_the_size_it_makes(cli, tiny_hidream):
    """HiDream's pipeline generates at its native area (1024x1024 worth of pixels, the asked aspect ratio): the image
    is diffusers' own, recorded at the size made, said once, and replay makes it again."""
    result = cli("txt2img", "a red cat", "--model", tiny_hidream, "--width", "64", "--height", "32", *FAST, "-o", "h.png",
                 "--json")
    assert result.exit_code == 0, result.stderr
    expected = diffusers_image("HiDreamImagePipeline", tiny_hidream, "a red cat", width=64, height=32,
                               guidance_scale=5.0)
    assert Image.open("h.png").size == (1440, 720) and np.abs(pixels("h.png") - expected).max() <= TOLERANCE
    meta = read_metadata("h.png")
    assert (meta["pipeline"], meta["width"], meta["height"]) == ("HiDreamImagePipeline", 1440, 720)
    assert meta["warnings"] == ["HiDreamImagePipeline made 1440x720 for --width 64 --height 32 (it chooses its own "
                                "size); recorded as made"]
    again = cli("replay", "h.png", "-o", "again.png")
    assert again.exit_code == 0, again.stderr
    assert np.abs(pixels("again.png") - pixels("h.png")).max() <= 1


def test_a_batch_line_runs_at_the_native_size_with_the_pipeline_defaults(cli, tiny_pixart):
    line = {"prompt": "a (cat:1.2)", "model": str(tiny_pixart), "steps": 2, "seed": 3}
    Path("jobs.jsonl").write_text(json.dumps(line) + "\n")
    result = cli("batch", "jobs.jsonl", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["model_family"], record["pipeline"], record["cfg"]) == ("generic", "PixArtSigmaPipeline", 4.5)
    assert Image.open(record["path"]).size == (64, 64)
    assert "read attention brackets like (word:1.2) and BREAK as plain text" in record["warnings"][0]
    replayed = cli("replay", record["path"], "-o", "again.png", "-q")
    assert replayed.exit_code == 0, replayed.stderr
    assert np.array_equal(pixels("again.png"), pixels(record["path"]))


def test_what_a_pipeline_does_not_take_is_warned_about_and_left_out(cli, tiny_lcm):
    result = cli("txt2img", "a cat", "-n", "blurry", "--model", tiny_lcm, "--width", "32", "--height", "32", *FAST,
                 "--json")  # LCM's __call__ takes no negative prompt: passing one would be a TypeError
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["warnings"] == [
        "--negative has no effect on generic LatentConsistencyModelPipeline models: its pipeline takes no negative prompt"]


def test_img2img_where_autopipeline_maps_it_equals_diffusers(cli, tiny_lcm, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    result = cli("img2img", photo, "a dog", "--model", tiny_lcm, "--strength", "0.6", "--cfg", "3", *FAST,
                 "--num-images", "2", "--batch-size", "2", "-o", "i-{seed}.png")  # one call: each image as its seed alone
    assert result.exit_code == 0, result.stderr
    for seed in (1, 2):
        expected = diffusers_image("LatentConsistencyModelImg2ImgPipeline", tiny_lcm, "a dog", seed=seed,
                                   image=Image.open(photo), strength=0.6, guidance_scale=3.0)
        assert np.abs(pixels(f"i-{seed}.png") - expected).max() <= TOLERANCE
    meta = read_metadata("i-1.png")
    assert (meta["model_family"], meta["pipeline"], meta["task"]) == ("generic", "LatentConsistencyModelImg2ImgPipeline",
                                                                      "img2img")


@pytest.mark.parametrize("model, command, args, message", [
    ("tiny_pixart", "img2img", [], "img2img does not work with '{model}' (generic PixArtSigmaPipeline model) (diffcli "
     "runs PixArtSigmaPipeline for txt2img: diffusers' AutoPipeline maps it to no img2img or inpaint pipeline)"),
    ("tiny_pixart", "inpaint", ["--mask", "{mask}"], "inpaint does not work with '{model}' (generic PixArtSigmaPipeline"),
    ("tiny_lcm", "inpaint", ["--mask", "{mask}"], "diffusers' AutoPipeline maps it to no inpaint pipeline"),
    ("tiny_pixart", "edit", [], "edit: '{model}' (generic) cannot edit from an instruction"),
    ("tiny_pixart", "txt2img", ["--clip-skip", "2"], "(generic PixArtSigmaPipeline) takes no CLIP skip, got 2"),
    ("tiny_chroma", "txt2img", ["--true-cfg", "2", "-n", "x"], "--true-cfg: '{model}' (generic) takes none"),
    ("tiny_pixart", "txt2img", ["--hires", "2"], "--hires: works with U-Net models (SD 1.x, 2.x, XL) only, got "
     "'{model}' (generic, its own pipeline)"),
    ("tiny_lcm", "txt2img", ["--variation-seed", "3", "--variation-strength", "0.5"], "--variation-seed: works with U-Net models"),
    ("tiny_pixart", "txt2img", ["--lora", "{lora}"], "--lora: '{model}' (generic PixArtSigmaPipeline) loads no LoRAs"),
    ("tiny_pixart", "txt2img", ["--scheduler", "flow-euler"], "is a noise-prediction model (generic) and takes every "
     "scheduler but flow-euler, got flow-euler"),
    ("tiny_chroma", "txt2img", ["--scheduler", "euler"], "is a flow-matching model (generic) and takes flow-euler"),
    ("tiny_sana", "txt2img", ["--width", "48", "--height", "64"],
     "--width and --height must be multiples of 32 for this model, got 48x64 (try 32x64)"),
], indirect=["model"], ids=["pixart-img2img", "pixart-inpaint", "lcm-inpaint", "edit", "clip-skip", "true-cfg", "hires",
                            "variation", "lora", "flow-scheduler", "noise-scheduler", "sana-size"])
def test_what_they_cannot_do_is_refused_before_loading(cli, no_loading, tmp_path, model, command, args, message):
    from safetensors.torch import save_file
    import torch

    photo, mask = write_photo(tmp_path, SIZE), write_mask(tmp_path, SIZE)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, tmp_path / "style.safetensors")
    inputs = [] if command == "txt2img" else [photo]
    args = [a.format(mask=mask, lora=tmp_path / "style.safetensors") for a in args]
    result = cli(command, *inputs, "a cat", "--model", model, *args)
    assert result.exit_code == 2 and message.format(model=model) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("class_name, message", [
    (5, "model_index.json: _class_name is not a pipeline class name, got 5"),
    (["os", "system"], "model_index.json: _class_name is not a pipeline class name, got ['os', 'system']"),
    ("os.system", "unsupported pipeline class 'os.system': not a diffusers pipeline class"),
    ("AutoencoderKL", "unsupported pipeline class 'AutoencoderKL': not a diffusers pipeline class"),
    ("LTXPipeline", "unsupported pipeline class 'LTXPipeline': not a diffusers text-to-image pipeline that loads alone"),
    ("AudioLDM2Pipeline", "unsupported pipeline class 'AudioLDM2Pipeline': not a diffusers text-to-image pipeline"),
    ("LatentConsistencyModelImg2ImgPipeline", "unsupported pipeline class 'LatentConsistencyModelImg2ImgPipeline'"),
    ("KandinskyV22Pipeline", "unsupported pipeline class 'KandinskyV22Pipeline'"),  # a decoder: needs its prior's output
], ids=["number", "list", "dotted", "model-class", "video", "audio", "img2img-class", "decoder"])
def test_model_index_naming_no_text_to_image_pipeline_is_refused(cli, no_loading, tiny_pixart, tmp_path, class_name,
                                                                   message):
    folder = tmp_path / "hostile"
    shutil.copytree(tiny_pixart, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name=class_name)))
    result = cli("txt2img", "a cat", "--model", folder)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "other diffusers text-to-image pipelines (PixArt, Sana, Chroma, HiDream...)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_model_index_that_is_not_an_object_is_refused(cli, no_loading, tiny_pixart, tmp_path):
    folder = tmp_path / "hostile"
    shutil.copytree(tiny_pixart, folder)
    (folder / "model_index.json").write_text('["PixArtSigmaPipeline"]')
    result = cli("txt2img", "a cat", "--model", folder)
    assert result.exit_code == 2 and "model_index.json is not a JSON object" in result.stderr, result.stderr


def test_registry_classes_and_control_pipelines_are_not_generic():
    generic = families._generic_classes()
    assert "PixArtSigmaPipeline" in generic and "SanaPipeline" in generic and "HiDreamImagePipeline" in generic
    assert not {"StableDiffusionPipeline", "FluxPipeline", "QwenImagePipeline", "FluxControlPipeline",
                "KandinskyV22CombinedPipeline"} & set(generic)
    assert families.call_style("StableDiffusionPipeline") == families.CallStyle()  # not a generic style
    style = families.call_style("PixArtSigmaPipeline")
    assert (style.prompt_embeds, style.step_end_callback, "use_resolution_binning" in style.takes) == (False, False, True)


def test_a_sana_folder_is_sized_by_its_dc_ae_and_flow_scheduler(tmp_path):
    """Sana's configs alone (no weights read to resolve): a DC-AE names its encoder's blocks (6: a factor of 32) and
    its DPM++ runs on flow sigmas, so only flow-matching schedulers fit it."""
    from diffcli.models import resolve_model

    folder = tmp_path / "sana"
    configs = {
        "model_index.json": {"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"],
                             "vae": ["diffusers", "AutoencoderDC"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                             "text_encoder": ["transformers", "Gemma2Model"], "tokenizer": ["transformers", "GemmaTokenizer"]},
        "transformer/config.json": {"_class_name": "SanaTransformer2DModel", "sample_size": 32, "patch_size": 1,
                                    "in_channels": 32},
        "vae/config.json": {"_class_name": "AutoencoderDC", "latent_channels": 32,
                            "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024]},
        "scheduler/scheduler_config.json": {"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 3.0,
                                            "prediction_type": "flow_prediction", "use_flow_sigmas": True},
    }
    for name, config in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    spec = resolve_model(str(folder))
    assert (spec.family, spec.pipeline, spec.flow_match) == ("generic", "SanaPipeline", True)
    assert (spec.sample_size, spec.size_multiple, spec.defaults) == (1024, 32, {"steps": 20, "cfg": 4.5})
    assert families.of(spec).pipelines == {"txt2img": "SanaPipeline"} and families.of(spec).lora
