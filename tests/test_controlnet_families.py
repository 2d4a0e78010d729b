"""--control beyond SD 1.x/2.x: SD3, FLUX.1 (single and union) and SDXL union ControlNets on tiny random components,
through the CLI against the plain diffusers ControlNet pipelines for the same seed; the class and model checks that
stop a ControlNet made for something else before any weights load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flow_models import FAST, SIZE, TOLERANCE, tiny_flux, tiny_sd3  # noqa: F401 (fixtures)
from PIL import Image, ImageDraw
from task_inputs import pixels, write_mask, write_photo

from diffcli.output import read_metadata


def outline(path: Path, size=SIZE) -> Path:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((8, 6, size[0] - 8, size[1] - 6), outline="black", width=3)
    image.save(path)
    return path


def waken(net, seed: int = 0):
    """A ControlNet whose zero-initialised outputs have weight, so its control shows in a 2-step image."""
    import torch

    torch.manual_seed(seed)
    for parameter in net.parameters():
        if parameter.abs().sum() == 0:
            torch.nn.init.normal_(parameter, std=0.3)
    return net


def save_net(net, folder: Path, **kwargs) -> Path:
    net.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def sd3_two_blocks(tiny_sd3, tmp_path_factory) -> Path:
    """The tiny SD3 with two transformer blocks: SD3 adds ControlNet residuals after every block but the last."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel.from_config({**pipe.transformer.config, "num_layers": 2})
    folder = tmp_path_factory.mktemp("sd3") / "tiny-sd3-two"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd3_controlnet(sd3_two_blocks, tmp_path_factory) -> Path:
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(sd3_two_blocks, subfolder="transformer")
    net = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
    return save_net(waken(net), tmp_path_factory.mktemp("cn") / "sd3-cn")


@pytest.fixture(scope="module")
def flux_controlnets(tiny_flux, tmp_path_factory) -> dict[str, Path]:
    """InstantX-style FLUX.1 ControlNets (the map through the VAE): a single-type one and a union one of 7 modes."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    folders = {}
    for name, extra in (("single", {}), ("union", {"num_mode": 7})):
        net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                                   num_attention_heads=2)
        if extra:
            net = FluxControlNetModel.from_config({**{k: v for k, v in net.config.items() if not k.startswith("_")},
                                                   **extra})
        folders[name] = save_net(waken(net, len(folders)), tmp_path_factory.mktemp("cn") / f"flux-{name}")
    return folders


def plain_image(class_name: str, model: Path, nets: list[Path], net_class: str, prompt: str, seed: int = 1,
                multi: str = "", **kwargs) -> np.ndarray:
    import diffusers
    import diffusers.models.controlnets as controlnets
    import torch

    loaded = [getattr(controlnets, net_class).from_pretrained(net) for net in nets]
    controlnet = loaded[0] if len(loaded) == 1 else getattr(controlnets, multi)(loaded)
    pipe = getattr(diffusers, class_name).from_pretrained(model, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)  # SD3's ControlNet pipeline samples the map's latents with the global RNG; diffcli seeds it so
    image = pipe(prompt, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                 **kwargs).images[0]
    return np.round(image * 255)


def test_sd3_txt2img_with_a_controlnet_equals_diffusers(cli, isolated, sd3_two_blocks, sd3_controlnet):
    tiny_sd3 = sd3_two_blocks
    from diffcli.control import canny

    edges = outline(isolated / "edges.png")
    result = cli("txt2img", "a ring", "--model", tiny_sd3, *FAST, "--cfg", "3", "--width", SIZE[0], "--height", SIZE[1],
                 "-o", "c.png", "--control", f"canny:{edges};model={sd3_controlnet};weight=0.8")
    assert result.exit_code == 0, result.stderr
    expected = plain_image("StableDiffusion3ControlNetPipeline", tiny_sd3, [sd3_controlnet], "SD3ControlNetModel",
                           "a ring", control_image=canny(Image.open(edges).convert("RGB")), guidance_scale=3.0,
                           controlnet_conditioning_scale=0.8, width=SIZE[0], height=SIZE[1])
    assert np.abs(pixels("c.png") - expected).max() <= TOLERANCE
    free = cli("txt2img", "a ring", "--model", tiny_sd3, *FAST, "--cfg", "3", "--width", SIZE[0], "--height", SIZE[1],
               "-o", "free.png")
    assert free.exit_code == 0 and np.abs(pixels("c.png") - pixels("free.png")).max() > 8  # the control shows
    assert read_metadata("c.png")["control"][0]["weight"] == 0.8


def test_sd3_refuses_what_diffusers_has_no_controlnet_pipeline_for(cli, isolated, tiny_sd3, sd3_controlnet):
    edges = outline(isolated / "edges.png")
    photo = write_photo(isolated, SIZE)
    result = cli("img2img", photo, "a ring", "--model", tiny_sd3, *FAST, "--control", f"canny:{edges};model={sd3_controlnet}")
    assert result.exit_code == 2 and "diffusers has no sd3 ControlNet pipeline for img2img" in result.stderr
    guess = cli("txt2img", "a ring", "--model", tiny_sd3, *FAST, "--guess-mode",
                "--control", f"canny:{edges};model={sd3_controlnet}")
    assert guess.exit_code == 2 and "sd3's ControlNet pipelines have no guess mode" in guess.stderr


def test_flux_txt2img_img2img_and_inpaint_with_a_controlnet_equal_diffusers(cli, isolated, tiny_flux, flux_controlnets):
    from diffcli.control import canny

    edges = outline(isolated / "edges.png")
    control = canny(Image.open(edges).convert("RGB"))
    net = flux_controlnets["single"]
    size = ("--width", SIZE[0], "--height", SIZE[1])
    result = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, "--cfg", "3", *size, "-o", "t.png",
                 "--control", f"canny:{edges};model={net};end=0.5")
    assert result.exit_code == 0, result.stderr
    expected = plain_image("FluxControlNetPipeline", tiny_flux, [net], "FluxControlNetModel", "a ring",
                           control_image=control, guidance_scale=3.0, control_guidance_end=0.5, width=SIZE[0],
                           height=SIZE[1])
    assert np.abs(pixels("t.png") - expected).max() <= TOLERANCE
    photo, mask = write_photo(isolated, SIZE), write_mask(isolated, SIZE, box=(16, 8, 40, 32))
    result = cli("img2img", photo, "a ring", "--model", tiny_flux, *FAST, "--cfg", "3", "--strength", "0.6",
                 "--num-images", "2", "--batch-size", "2", "-o", "i-{seed}.png", "--control", f"canny:{edges};model={net}")
    assert result.exit_code == 0, result.stderr
    for seed in (1, 2):
        expected = plain_image("FluxControlNetImg2ImgPipeline", tiny_flux, [net], "FluxControlNetModel", "a ring",
                               seed=seed, image=Image.open(photo), control_image=control, strength=0.6,
                               guidance_scale=3.0, width=SIZE[0], height=SIZE[1])
        assert np.abs(pixels(f"i-{seed}.png") - expected).max() <= TOLERANCE
    result = cli("inpaint", photo, "a ring", "--mask", mask, "--mask-blur", "0", "--model", tiny_flux, *FAST, "--cfg", "3",
                 "-o", "m.png", "--control", f"canny:{edges};model={net}")
    assert result.exit_code == 0, result.stderr
    repaint = np.asarray(Image.open(mask)) == 255
    expected = plain_image("FluxControlNetInpaintPipeline", tiny_flux, [net], "FluxControlNetModel", "a ring",
                           image=Image.open(photo), mask_image=Image.open(mask), control_image=control, strength=1.0,
                           guidance_scale=3.0, width=SIZE[0], height=SIZE[1])
    assert np.abs(pixels("m.png")[repaint] - expected[repaint]).max() <= TOLERANCE
    assert np.array_equal(pixels("m.png")[~repaint], pixels(photo)[~repaint])


def test_flux_union_takes_a_mode_by_name_number_or_type(cli, isolated, tiny_flux, flux_controlnets):
    from diffcli.control import canny

    edges = outline(isolated / "edges.png")
    net = flux_controlnets["union"]
    size = ("--width", SIZE[0], "--height", SIZE[1])
    by_type = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, *size, "-o", "u.png", "--json",
                  "--control", f"canny:{edges};model={net}")  # canny: the union's mode 0
    assert by_type.exit_code == 0, by_type.stderr
    assert by_type.json_lines()[0]["control"][0]["mode"] == 0
    expected = plain_image("FluxControlNetPipeline", tiny_flux, [net], "FluxControlNetModel", "a ring",
                           control_image=canny(Image.open(edges).convert("RGB")), control_mode=0, guidance_scale=3.5,
                           width=SIZE[0], height=SIZE[1])
    assert np.abs(pixels("u.png") - expected).max() <= TOLERANCE
    tile = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, *size, "-o", "t.png",
               "--control", f"none:{edges};model={net};mode=tile")
    number = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, *size, "-o", "n.png",
                 "--control", f"none:{edges};model={net};mode=1")
    assert tile.exit_code == number.exit_code == 0, tile.stderr
    assert np.array_equal(pixels("t.png"), pixels("n.png"))  # tile is mode 1
    assert np.abs(pixels("t.png") - pixels("u.png")).max() > 0  # another mode, another image
    two = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, *size, "-o", "two.png",
              "--control", f"canny:{edges};model={net}", "--control", f"none:{edges};model={net};mode=blur;weight=0.5")
    assert two.exit_code == 0, two.stderr
    assert [u["mode"] for u in read_metadata("two.png")["control"]] == [0, 3]


@pytest.mark.parametrize(("unit", "message"), [
    ("none:{edges};model={union}", "is a union ControlNet: say which control it is"),
    ("none:{edges};model={union};mode=sketch", "mode='sketch' is none of its modes"),
    ("none:{edges};model={union};mode=7", "mode 7 is not one of"),
    ("canny:{edges};model={single};mode=canny", "mode= is for union ControlNets"),
])
def test_flux_union_mode_errors_exit_2(cli, isolated, tiny_flux, flux_controlnets, unit, message):
    edges = outline(isolated / "edges.png")
    text = unit.format(edges=edges, union=flux_controlnets["union"], single=flux_controlnets["single"])
    result = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, "--control", text)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    mixed = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, "--control", f"canny:{edges};model={flux_controlnets['union']}",
                "--control", f"canny:{edges};model={flux_controlnets['single']}")
    assert mixed.exit_code == 2 and "union and single-type ControlNets cannot run together" in mixed.stderr


def test_a_controlnet_for_another_family_or_model_exits_2_before_loading(cli, isolated, tiny_model, tiny_sdxl,
                                                                         tiny_flux, tiny_controlnets, sd3_controlnet,
                                                                         flux_controlnets, tmp_path):
    edges = outline(isolated / "edges.png")
    cases = [
        (tiny_model, sd3_controlnet, "a SD3ControlNetModel; sd1 models take ControlNetModel"),
        (tiny_flux, tiny_controlnets[0], "a ControlNetModel; flux models take FluxControlNetModel"),
        (tiny_sdxl, tiny_controlnets[0], "made for another model"),
    ]
    wide = json.loads((Path(tiny_controlnets[0]) / "config.json").read_text())
    folder = tmp_path / "cn-wide"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**wide, "cross_attention_dim": 96}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    cases.append((tiny_model, folder, "made for another model (cross_attention_dim 96"))
    for model, net, message in cases:
        result = cli("txt2img", "a ring", "--model", model, *FAST, "--control", f"canny:{edges};model={net}")
        assert result.exit_code == 2 and message in result.stderr, (net, result.stderr)
        assert "Loading" not in result.stderr


def test_a_controlnet_model_path_too_long_is_exit_2(cli, isolated, tiny_model):
    edges = outline(isolated / "edges.png")
    result = cli("txt2img", "a ring", "--model", tiny_model, *FAST, "--control", f"canny:{edges};model={'a' * 300}")
    assert result.exit_code == 2 and "file name too long" in result.stderr


def test_a_controlnet_given_as_its_fp16_variant_loads(cli, isolated, tiny_model, tiny_controlnets, tmp_path):
    from diffusers import ControlNetModel

    folder = tmp_path / "cn-fp16"
    ControlNetModel.from_pretrained(tiny_controlnets[0]).save_pretrained(folder, variant="fp16")
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    edges = outline(isolated / "edges.png", (64, 64))
    result = cli("txt2img", "a ring", "--model", tiny_model, *FAST, "--width", "64", "--height", "64", "-o", "v.png",
                 "--control", f"canny:{edges};model={folder}")
    plain = cli("txt2img", "a ring", "--model", tiny_model, *FAST, "--width", "64", "--height", "64", "-o", "p.png",
                "--control", f"canny:{edges};model={tiny_controlnets[0]}")
    assert result.exit_code == plain.exit_code == 0, result.stderr
    assert np.abs(pixels("v.png") - pixels("p.png")).max() <= 1


def test_controlnet_inpaint_batch_images_equal_their_seeds_alone(cli, isolated, tiny_model, tiny_controlnets):
    """The ControlNet inpaint pipeline encodes one input with the first generator only: each image gets its own copy,
    as with the plain inpaint pipeline, so image 2 of a batch is the image of its seed."""
    photo, mask = write_photo(isolated, (64, 64)), write_mask(isolated, (64, 64), box=(16, 16, 48, 48))
    unit = ("--control", f"canny:{photo};model={tiny_controlnets[0]}")
    batch = cli("inpaint", photo, "a ring", "--mask", mask, "--model", tiny_model, "--steps", "2", "--seed", "10",
                "--quiet", "--num-images", "2", "--batch-size", "2", "-o", "b-{seed}.png", *unit)
    alone = cli("inpaint", photo, "a ring", "--mask", mask, "--model", tiny_model, "--steps", "2", "--seed", "11",
                "--quiet", "-o", "a.png", *unit)
    assert batch.exit_code == alone.exit_code == 0, batch.stderr
    assert np.abs(pixels("b-11.png") - pixels("a.png")).max() <= TOLERANCE


@pytest.fixture(scope="module")
def sdxl_union(tiny_sdxl, tmp_path_factory) -> Path:
    from diffusers import ControlNetUnionModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    net = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    config = {k: v for k, v in net.config.items() if not k.startswith("_")}  # ProMax's 8 modes, at the tiny width
    width = unet.config.block_out_channels[0]
    net = ControlNetUnionModel.from_config({**config, "num_control_type": 8, "num_trans_channel": width,
                                            "num_trans_head": 2, "num_proj_channel": width})
    return save_net(waken(net), tmp_path_factory.mktemp("cn") / "sdxl-union")


def test_sdxl_union_controlnet_equals_diffusers(cli, isolated, tiny_sdxl, sdxl_union):
    from diffcli.control import canny

    edges = outline(isolated / "edges.png", (64, 64))
    base = ("--model", tiny_sdxl, "--steps", "2", "--cfg", "7.5", "--width", "64", "--height", "64", "--seed", "1", "--quiet")
    result = cli("txt2img", "a ring", *base, "-o", "x.png", "--json", "--control", f"canny:{edges};model={sdxl_union}")
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["control"][0]["mode"] == 3  # canny: xinsir's ProMax mode 3
    expected = plain_image("StableDiffusionXLControlNetUnionPipeline", tiny_sdxl, [sdxl_union], "ControlNetUnionModel",
                           "a ring", control_image=[canny(Image.open(edges).convert("RGB"))], control_mode=[3],
                           guidance_scale=7.5, width=64, height=64)
    assert np.abs(pixels("x.png") - expected).max() <= TOLERANCE
    two = cli("txt2img", "a ring", *base, "-o", "two.png", "--control", f"canny:{edges};model={sdxl_union}",
              "--control", f"none:{edges};model={sdxl_union};mode=depth;weight=0.5")
    assert two.exit_code == 0, two.stderr
    expected = plain_image("StableDiffusionXLControlNetUnionPipeline", tiny_sdxl, [sdxl_union, sdxl_union],
                           "ControlNetUnionModel", "a ring", multi="MultiControlNetUnionModel",
                           control_image=[canny(Image.open(edges).convert("RGB")), Image.open(edges).convert("RGB")],
                           control_mode=[3, 1], controlnet_conditioning_scale=[1.0, 0.5], guidance_scale=7.5,
                           width=64, height=64)
    assert np.abs(pixels("two.png") - expected).max() <= TOLERANCE


def test_masked_only_inpaint_cuts_the_control_map_to_the_repainted_area(isolated, tiny_model, tiny_controlnets):
    """The pipeline sees the mask's area (plus padding) scaled up: the map is cut to the same area, not squeezed whole."""
    from PIL import ImageOps

    from diffcli.jobs import build
    from diffcli.plan import plan_job

    photo = Image.new("RGB", (128, 128), "gray")
    photo.save(isolated / "photo.png")
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((80, 80, 111, 111), fill=255)
    mask.save(isolated / "mask.png")
    control = Image.new("RGB", (256, 256), "black")  # twice the input's size: the cut scales with it
    ImageDraw.Draw(control).rectangle((128, 128, 255, 255), fill="white")
    control.save(isolated / "control.png")
    [job] = build("inpaint", {"input": str(isolated / "photo.png"), "mask": str(isolated / "mask.png"), "prompt": "x",
                              "model": str(tiny_model), "masked_only": True, "padding": 8,
                              "control": [f"none:{isolated / 'control.png'};model={tiny_controlnets[0]}"]})
    plan = plan_job(job)
    box = (72, 72, 120, 120)  # the mask's box with 8 px padding, in the input's pixels
    expected = ImageOps.fit(control.crop(tuple(2 * v for v in box)), (plan.width, plan.height), Image.LANCZOS)
    assert np.array_equal(np.asarray(plan.controls.maps[0]), np.asarray(expected))
    assert np.asarray(plan.controls.maps[0]).mean() > 200  # all white: the cut holds the white square only


def test_a_hub_controlnet_not_in_the_cache_offline_is_exit_2_before_loading(cli, isolated, tiny_model):
    edges = outline(isolated / "edges.png", (64, 64))
    result = cli("txt2img", "a ring", "--model", tiny_model, *FAST, "--control", f"canny:{edges};model=someone/cn-canny")
    assert result.exit_code == 2 and "--control model=someone/cn-canny: not in the Hugging Face cache" in result.stderr


def test_a_huge_control_image_is_preprocessed_near_the_size_it_is_used_at(isolated, monkeypatch):
    from diffcli import control, controlnet

    Image.new("RGB", (3000, 2000), "white").save(isolated / "big.png")
    seen = []
    real = control.make
    monkeypatch.setattr(control, "make", lambda image, *args: seen.append(image.size) or real(image, *args))
    unit = controlnet.parse(f"canny:{isolated / 'big.png'};model=x")
    made = controlnet.control_map(unit, 64, 48, False)
    assert made.size == (64, 48) and seen == [(128, 85)]  # twice the map's longest side
    cut = controlnet.control_map(unit, 64, 48, False, crop=((0, 0, 300, 200), (3000, 2000)))
    assert cut.size == (64, 48) and seen[-1] == (1280, 853)  # the cut, a tenth of the image, still at twice the map
