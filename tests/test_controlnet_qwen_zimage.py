"""--control on Qwen-Image and Z-Image: tiny ControlNets of each family through the CLI against the plain diffusers
ControlNet pipelines for the same seed, and what their pipelines cannot take refused with exit 2 before loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flow_models import FAST, SIZE, TOLERANCE, model, tiny_qwen_image, tiny_z_image  # noqa: F401 (fixtures)
from PIL import Image
from task_inputs import pixels, write_mask, write_photo
from test_controlnet_families import outline, plain_image, save_net, waken

from diffcli.output import read_metadata

WH = ("--width", SIZE[0], "--height", SIZE[1])


@pytest.fixture(scope="module")
def qwen_controlnet(tiny_qwen_image, tmp_path_factory) -> Path:
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image, subfolder="transformer")
    net = QwenImageControlNetModel.from_transformer(transformer, num_layers=1, attention_head_dim=16,
                                                    num_attention_heads=2)
    return save_net(waken(net), tmp_path_factory.mktemp("cn") / "qwen-cn")


@pytest.fixture(scope="module")
def z_controlnets(tmp_path_factory) -> dict[str, Path]:
    """Fun Controlnet Union layouts at the tiny Z-Image's width: the map alone (1.0, control_in_dim 16) and the map,
    mask and masked image (2.0, 33: what its inpaint pipeline feeds it)."""
    from diffusers import ZImageControlNetModel

    folders = {}
    for name, channels in (("map", 16), ("inpaint", 33)):
        net = ZImageControlNetModel(control_layers_places=[0], control_refiner_layers_places=[0],
                                    control_in_dim=channels, add_control_noise_refiner="control_noise_refiner", dim=32,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2)
        folders[name] = save_net(waken(net, len(folders)), tmp_path_factory.mktemp("cn") / f"z-{name}")
    return folders


def canny_of(path: Path):
    from diffcli.control import canny

    return canny(Image.open(path).convert("RGB"))


def test_qwen_image_txt2img_with_a_controlnet_equals_diffusers(cli, isolated, tiny_qwen_image, qwen_controlnet):
    """Each image of a batch as its seed alone (the pipeline VAE-samples the map with each image's generator). Weight 0
    is not the uncontrolled image in diffusers either: that sampling draws from the generator before the noise."""
    edges = outline(isolated / "edges.png")
    result = cli("txt2img", "a ring", "--model", tiny_qwen_image, *FAST, "--cfg", "3", *WH, "--num-images", "2",
                 "--batch-size", "2", "-o", "q-{seed}.png",
                 "--control", f"canny:{edges};model={qwen_controlnet};weight=0.8;end=0.5")
    assert result.exit_code == 0, result.stderr
    for seed in (1, 2):
        expected = plain_image("QwenImageControlNetPipeline", tiny_qwen_image, [qwen_controlnet],
                               "QwenImageControlNetModel", "a ring", seed=seed, control_image=canny_of(edges),
                               controlnet_conditioning_scale=0.8, control_guidance_end=0.5, true_cfg_scale=3.0,
                               negative_prompt="", width=SIZE[0], height=SIZE[1])
        assert np.abs(pixels(f"q-{seed}.png") - expected).max() <= TOLERANCE
    assert read_metadata("q-1.png")["control"][0]["weight"] == 0.8


def test_qwen_image_runs_several_maps_through_its_one_controlnet(cli, isolated, tiny_qwen_image, qwen_controlnet):
    """diffusers' QwenImageMultiControlNetModel holds a single (union) ControlNet that reads every map."""
    import diffusers
    import torch

    edges = outline(isolated / "edges.png")
    result = cli("txt2img", "a ring", "--model", tiny_qwen_image, *FAST, "--cfg", "3", *WH, "-o", "two.png",
                 "--control", f"canny:{edges};model={qwen_controlnet}",
                 "--control", f"none:{edges};model={qwen_controlnet};weight=0.5;start=0.5")
    assert result.exit_code == 0, result.stderr
    net = diffusers.QwenImageControlNetModel.from_pretrained(qwen_controlnet)
    pipe = diffusers.QwenImageControlNetPipeline.from_pretrained(
        tiny_qwen_image, controlnet=diffusers.QwenImageMultiControlNetModel([net]))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a ring", num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(1), output_type="np",
                    control_image=[canny_of(edges), Image.open(edges).convert("RGB")],
                    controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.5],
                    control_guidance_end=[1.0, 1.0], true_cfg_scale=3.0, negative_prompt="", width=SIZE[0],
                    height=SIZE[1]).images[0]
    assert np.abs(pixels("two.png") - np.round(expected * 255)).max() <= TOLERANCE


def test_z_image_txt2img_with_a_controlnet_equals_diffusers(cli, isolated, tiny_z_image, z_controlnets):
    edges = outline(isolated / "edges.png")
    for name, net in z_controlnets.items():  # 2.0's wider input: the pipeline pads the map's latents with zeros
        result = cli("txt2img", "a ring", "--model", tiny_z_image, *FAST, "--cfg", "2", *WH, "-o", f"{name}.png",
                     "--control", f"canny:{edges};model={net};weight=0.8")
        assert result.exit_code == 0, result.stderr
        expected = plain_image("ZImageControlNetPipeline", tiny_z_image, [net], "ZImageControlNetModel", "a ring",
                               control_image=canny_of(edges), controlnet_conditioning_scale=0.8, guidance_scale=2.0,
                               width=SIZE[0], height=SIZE[1])
        assert np.abs(pixels(f"{name}.png") - expected).max() <= TOLERANCE
    free = cli("txt2img", "a ring", "--model", tiny_z_image, *FAST, "--cfg", "2", *WH, "-o", "free.png")
    zero = cli("txt2img", "a ring", "--model", tiny_z_image, *FAST, "--cfg", "2", *WH, "-o", "zero.png",
               "--control", f"canny:{edges};model={z_controlnets['map']};weight=0")
    assert free.exit_code == zero.exit_code == 0, zero.stderr
    assert np.abs(pixels("zero.png") - pixels("free.png")).max() <= 1  # weight 0: the uncontrolled image
    assert np.abs(pixels("map.png") - pixels("free.png")).max() > 8  # the control shows


def test_z_image_inpaint_with_a_controlnet_equals_diffusers(cli, isolated, tiny_z_image, z_controlnets):
    """The masked area repainted from noise as diffusers' (the ControlNet reads the map, mask and masked image), the
    rest the input's; a batch runs one image per call (the pipeline batches the images, not the mask)."""
    edges = outline(isolated / "edges.png")
    photo, mask = write_photo(isolated, SIZE), write_mask(isolated, SIZE, box=(16, 8, 40, 32))
    net = z_controlnets["inpaint"]
    result = cli("inpaint", photo, "a ring", "--mask", mask, "--mask-blur", "0", "--model", tiny_z_image, *FAST,
                 "--cfg", "2", "--num-images", "2", "--batch-size", "2", "-o", "m-{seed}.png",
                 "--control", f"canny:{edges};model={net}")
    assert result.exit_code == 0, result.stderr
    repaint = np.asarray(Image.open(mask)) == 255
    for seed in (1, 2):
        expected = plain_image("ZImageControlNetInpaintPipeline", tiny_z_image, [net], "ZImageControlNetModel",
                               "a ring", seed=seed, image=Image.open(photo), mask_image=Image.open(mask),
                               control_image=canny_of(edges), controlnet_conditioning_scale=1.0, guidance_scale=2.0,
                               width=SIZE[0], height=SIZE[1])
        assert np.abs(pixels(f"m-{seed}.png")[repaint] - expected[repaint]).max() <= TOLERANCE
        assert np.array_equal(pixels(f"m-{seed}.png")[~repaint], pixels(photo)[~repaint])


@pytest.fixture(scope="module")
def z_union_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """alibaba-pai's Fun Controlnet Union files at the tiny Z-Image's width, each beside the diffusers folder of the
    same weights: 1.0 (noise-refiner blocks of the transformer's kind), 2.0 (its control layers serve the noise
    refiner; the file carries refiner control blocks with a zero before_proj, which diffusers drops) and 2.1 (trained
    refiner control blocks)."""
    import torch
    from diffusers import ZImageControlNetModel
    from safetensors.torch import save_file

    root, made = tmp_path_factory.mktemp("z-files"), {}
    for version, mode, channels in (("1.0", None, 16), ("2.0", "control_layers", 33), ("2.1", "control_noise_refiner", 33)):
        settings = dict(control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=channels, dim=32,
                        n_refiner_layers=1, n_heads=2, n_kv_heads=2)
        net = waken(ZImageControlNetModel(add_control_noise_refiner=mode, **settings), len(made))
        state = {name: tensor.contiguous() for name, tensor in net.state_dict().items()}
        if version == "2.0":  # the untrained refiner blocks alibaba-pai's 2.0 file carries
            spare = waken(ZImageControlNetModel(add_control_noise_refiner="control_noise_refiner", **settings), 9)
            state.update({name: tensor.contiguous() for name, tensor in spare.state_dict().items()
                          if name.startswith("control_noise_refiner.")})
            state["control_noise_refiner.0.before_proj.weight"] = torch.zeros_like(state["control_noise_refiner.0.before_proj.weight"])
        save_file(state, root / f"Z-Image-Turbo-Fun-Controlnet-Union-{version}.safetensors")
        made[version] = (root / f"Z-Image-Turbo-Fun-Controlnet-Union-{version}.safetensors",
                         save_net(net, root / f"folder-{version}"))
    return made


def test_z_image_reads_alibaba_pais_controlnet_files(cli, isolated, tiny_z_image, z_union_files):
    """Each Union version's single file makes the image the plain diffusers pipeline makes with its diffusers folder;
    nothing is fetched (the config comes from the tensors and the model's transformer config)."""
    edges = outline(isolated / "edges.png")
    images = {}
    for version, (file, folder) in z_union_files.items():
        result = cli("txt2img", "a ring", "--model", tiny_z_image, *FAST, "--cfg", "2", *WH, "-o", f"{version}.png",
                     "--control", f"canny:{edges};model={file};weight=0.8")
        assert result.exit_code == 0, (version, result.stderr)
        expected = plain_image("ZImageControlNetPipeline", tiny_z_image, [folder], "ZImageControlNetModel", "a ring",
                               control_image=canny_of(edges), controlnet_conditioning_scale=0.8, guidance_scale=2.0,
                               width=SIZE[0], height=SIZE[1])
        assert np.abs(pixels(f"{version}.png") - expected).max() <= TOLERANCE, version
        images[version] = pixels(f"{version}.png")
    assert np.abs(images["2.0"] - images["2.1"]).max() > 8  # the versions are told apart


def test_a_z_image_controlnet_file_that_does_not_fit_exits_2_before_loading(cli, isolated, tiny_z_image,
                                                                            z_union_files, tmp_path):
    """Hostile or mismatched files: more control layers than the model has (which layers they feed is unknown), a
    width of another model, a missing first control layer, a truncated file."""
    from safetensors.torch import load_file, save_file

    edges = outline(isolated / "edges.png")
    state = load_file(z_union_files["2.1"][0])
    extra = {**state, **{name.replace("control_layers.0.", "control_layers.1."): tensor.clone()
                         for name, tensor in state.items() if name.startswith("control_layers.0.")}}
    from diffusers import ZImageControlNetModel

    wide = ZImageControlNetModel(control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=33,
                                 add_control_noise_refiner="control_noise_refiner", dim=64, n_refiner_layers=1,
                                 n_heads=2, n_kv_heads=2).state_dict()
    wide["control_noise_refiner.0.before_proj.weight"] += 1  # (a 2.1 file: trained refiner blocks)
    headless = {name: tensor for name, tensor in state.items() if not name.startswith("control_layers.0.")}
    cases = {"extra": (extra, "2 control layers taking 132 values per patch do not fit this model's 1 layers"),
             "wide": (wide, "made for another model (dim 64"),
             "headless": (headless, "a Z-Image ControlNet without its first control layer")}
    for name, (tensors, message) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        result = cli("txt2img", "a ring", "--model", tiny_z_image, *FAST, "--control",
                     f"canny:{edges};model={tmp_path / f'{name}.safetensors'}")
        assert result.exit_code == 2 and message in result.stderr, (name, result.stderr)
        assert "Loading" not in result.stderr
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(z_union_files["2.1"][0].read_bytes()[:200])
    result = cli("txt2img", "a ring", "--model", tiny_z_image, *FAST, "--control", f"canny:{edges};model={cut}")
    assert result.exit_code == 2 and str(cut) in result.stderr, result.stderr


@pytest.mark.parametrize(("model", "command", "units", "message"), [
    ("tiny_qwen_image", "img2img", ["{qwen}"], "diffusers has no qwen-image ControlNet pipeline for img2img"),
    ("tiny_qwen_image", "inpaint", ["{qwen}"], "diffusers has no qwen-image ControlNet pipeline for inpaint"),
    ("tiny_qwen_image", "txt2img", ["{qwen}", "{qwen2}"], "qwen-image's ControlNet pipeline runs one ControlNet for all"),
    ("tiny_z_image", "img2img", ["{z}"], "diffusers has no z-image ControlNet pipeline for img2img"),
    ("tiny_z_image", "txt2img", ["{z}", "{z}"], "z-image's ControlNet pipelines take one unit, got 2"),
    ("tiny_z_image", "txt2img", ["{z};end=0.5"], "z-image's ControlNet pipelines act on every step"),
    ("tiny_z_image", "inpaint", ["{z}", "--strength", "0.5"], "z-image's ControlNet inpaint pipeline repaints the"),
    ("tiny_z_image", "inpaint", ["{z_map}"], "reads a map only (control_in_dim 16)"),
    ("tiny_qwen_image", "txt2img", ["{qwen};mode=canny"], "qwen-image's ControlNets take no mode="),
], indirect=["model"], ids=["qwen-img2img", "qwen-inpaint", "qwen-two-models", "z-img2img", "z-two-units", "z-end",
                            "z-strength", "z-inpaint-map-only", "qwen-mode"])
def test_what_their_controlnet_pipelines_cannot_take_exits_2(cli, isolated, model, command, units, message,
                                                            qwen_controlnet, z_controlnets, tmp_path):
    """`units`: each unit's model= (and options), then any CLI flags."""
    import shutil

    edges = outline(isolated / "edges.png")
    photo, mask = write_photo(isolated, SIZE), write_mask(isolated, SIZE)
    names = dict(qwen=qwen_controlnet, qwen2=shutil.copytree(qwen_controlnet, tmp_path / "qwen-cn-copy"),
                 z=z_controlnets["inpaint"], z_map=z_controlnets["map"])
    flags = next((i for i, unit in enumerate(units) if unit.startswith("--")), len(units))
    controls = [part for unit in units[:flags] for part in ("--control", f"canny:{edges};model=" + unit.format(**names))]
    inputs = {"txt2img": [], "img2img": [photo], "inpaint": [photo, "--mask", mask]}[command]
    result = cli(command, *inputs[:1], "a ring", *inputs[1:], "--model", model, *FAST, *units[flags:], *controls)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Loading" not in result.stderr


def test_a_controlnet_of_the_other_family_or_width_exits_2_before_loading(cli, isolated, tiny_qwen_image, tiny_z_image,
                                                                          qwen_controlnet, z_controlnets, tmp_path):
    edges = outline(isolated / "edges.png")

    def widened(net: Path, **config) -> Path:  # a config only: refused before its (empty) weights are read
        folder = tmp_path / f"{net.name}-{'-'.join(config)}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**json.loads((net / "config.json").read_text()), **config}))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        return folder

    cases = [
        (tiny_z_image, qwen_controlnet, "a QwenImageControlNetModel; z-image models take ZImageControlNetModel"),
        (tiny_qwen_image, z_controlnets["map"], "a ZImageControlNetModel; qwen-image models take QwenImageControlNetModel"),
        (tiny_z_image, widened(z_controlnets["map"], dim=64), "made for another model (dim 64"),
        (tiny_qwen_image, widened(qwen_controlnet, joint_attention_dim=24), "made for another model (joint_attention_dim"),
        (tiny_qwen_image, widened(qwen_controlnet, extra_condition_channels=4), "an inpainting ControlNet"),
    ]
    for model_folder, net, message in cases:
        result = cli("txt2img", "a ring", "--model", model_folder, *FAST, "--control", f"canny:{edges};model={net}")
        assert result.exit_code == 2 and message in result.stderr, (net, result.stderr)
        assert "Loading" not in result.stderr
