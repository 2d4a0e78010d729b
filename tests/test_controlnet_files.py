"""Single-file ControlNets (A1111/ComfyUI's models/ControlNet files): lllyasviel's original layout (with and without
`control_model.`) and diffusers' layout in one file, SD 1.x and SDXL (plain and union), safetensors and an allowed
pickle, each through the CLI against the same weights as a diffusers folder; hostile files are exit 2 before loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from test_controlnet import outline, pixels

from diffcli import ldm_format

SEED = ("--seed", "3", "--steps", "2", "--quiet", "--width", "64", "--height", "64")


def folder_state(folder: Path) -> dict:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def as_original(folder: Path, prefix: str = "control_model.") -> dict:
    import json

    layers = json.loads((folder / "config.json").read_text())["layers_per_block"]
    return ldm_format.controlnet_to_ldm(folder_state(folder), layers, prefix)


def draw(cli, model, unit: str, out: str, *extra):
    result = cli("txt2img", "a circle", "--model", model, *SEED, "-o", out, "--overwrite", "--control", unit, *extra)
    assert result.exit_code == 0, result.stderr
    return pixels(out)


@pytest.mark.parametrize("layout, name", [("diffusers", "cn.safetensors"), ("original", "control_v11p_canny.safetensors"),
                                          ("original-bare", "CN.SAFETENSORS"), ("original-fp16", "cn_fp16.safetensors")])
def test_a_single_file_controlnet_draws_what_its_folder_draws(cli, isolated, tiny_model, tiny_controlnets, layout, name):
    folder = tiny_controlnets[0]
    state = {"diffusers": folder_state(folder), "original": as_original(folder),
             "original-bare": as_original(folder, ""),
             "original-fp16": {k: v.half() for k, v in as_original(folder).items()}}[layout]
    save_file(state, str(isolated / name))
    edges = outline(isolated / "edges.png")
    expected = draw(cli, tiny_model, f"canny:{edges};model={folder}", "folder.png")
    got = draw(cli, tiny_model, f"canny:{edges};model={isolated / name}", "file.png", "--json")
    tolerance = 6 if layout.endswith("fp16") else 0  # fp16 weights round; the same weights compute the same image
    assert np.abs(got - expected).max() <= tolerance  # and another ControlNet's image is far from it:
    assert np.abs(got - draw(cli, tiny_model, f"canny:{edges};model={tiny_controlnets[1]}", "other.png")).max() > 8
    assert f"Model: {Path(name).stem}, Weight: 1" in Image.open("file.png").info["parameters"]  # A1111's naming
    again = cli("replay", "file.png", "-o", "again.png")
    assert again.exit_code == 0 and np.abs(pixels("again.png") - got).max() == 0, again.stderr


def test_a_pickled_controlnet_needs_allow_pickle(cli, isolated, tiny_model, tiny_controlnets):
    import torch

    torch.save(as_original(tiny_controlnets[0]), isolated / "control_sd15_canny.pth")
    edges = outline(isolated / "edges.png")
    unit = f"canny:{edges};model={isolated / 'control_sd15_canny.pth'}"
    refused = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "--control", unit)
    assert refused.exit_code == 2 and "pickle" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    got = draw(cli, tiny_model, unit, "pickle.png", "--allow-pickle")
    assert np.abs(got - draw(cli, tiny_model, f"canny:{edges};model={tiny_controlnets[0]}", "folder.png")).max() == 0


def test_a_v1_controlnet_saved_with_its_whole_sd_model_reads_its_control_model_part(cli, isolated, tiny_model,
                                                                                   tiny_controlnets):
    import torch

    state = {**as_original(tiny_controlnets[0]), "model.diffusion_model.input_blocks.3.0.op.weight": torch.zeros(4, 4, 3, 3),
             "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}  # as control_sd15_canny.pth holds
    save_file(state, str(isolated / "control_sd15_canny.safetensors"))
    edges = outline(isolated / "edges.png")
    got = draw(cli, tiny_model, f"canny:{edges};model={isolated / 'control_sd15_canny.safetensors'}", "file.png")
    assert np.abs(got - draw(cli, tiny_model, f"canny:{edges};model={tiny_controlnets[0]}", "folder.png")).max() == 0


def test_a_batch_dry_run_opens_no_pickled_controlnet(cli, isolated, tiny_model, tiny_controlnets):
    import json

    import torch

    torch.save({"state_dict": as_original(tiny_controlnets[0])}, isolated / "cn.pth")  # a training checkpoint's wrapper
    unit = f"canny:{outline(isolated / 'edges.png')};model={isolated / 'cn.pth'}"
    Path("jobs.jsonl").write_text(json.dumps({"prompt": "a circle", "control": [unit], "steps": 2}) + "\n")
    dry = cli("batch", "jobs.jsonl", "--model", tiny_model, "--dry-run", "--allow-pickle", *SEED[:2])
    assert dry.exit_code == 0, dry.stderr
    got = draw(cli, tiny_model, unit, "pickle.png", "--allow-pickle")  # and the wrapper is read when it runs
    assert np.abs(got - draw(cli, tiny_model, unit.replace(str(isolated / "cn.pth"), str(tiny_controlnets[0])),
                             "folder.png")).max() == 0


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d, net: write_bytes(d / "cn.safetensors", (d / "edges.png").read_bytes()), "not a weight file"),
    (lambda d, net: write_bytes(d / "cn.safetensors", (net / "diffusion_pytorch_model.safetensors").read_bytes()[:300]),
     "cn.safetensors"),
    (lambda d, net: write_bytes(d / "cn.safetensors", b""), "is empty"),
    (lambda d, net: save_file({"lora_unet_down.lora_up.weight": __import__("torch").zeros(2, 2)},
                              str(d / "cn.safetensors")), "a LoRA"),
    (lambda d, net: save_file({"controlnet_blocks.0.weight": __import__("torch").zeros(2, 2)}, str(d / "cn.safetensors")),
     "FLUX.1, SD3 or Qwen-Image ControlNet in another layout"),
    (lambda d, net: save_file({"double_blocks.0.img_attn.qkv.weight": __import__("torch").zeros(2, 2)},
                              str(d / "cn.safetensors")), "XLabs"),
    (lambda d, net: save_file({k: v for k, v in as_original(net).items() if "zero_convs.1." not in k},
                              str(d / "cn.safetensors")), "2 missing"),
    (lambda d, net: save_file({**folder_state(net), "extra.weight": __import__("torch").zeros(1)},
                              str(d / "cn.safetensors")), "1 unknown"),
    (lambda d, net: save_file({**as_original(net), "control_model.zero_convs.0.0.bias": __import__("torch").zeros(5)},
                              str(d / "cn.safetensors")), "of another shape"),
    (lambda d, net: d / "missing.safetensors", "no such file"),
])
def test_hostile_single_files_are_exit_2_before_any_model_loads(cli, isolated, tiny_model, tiny_controlnets,
                                                                 monkeypatch, make, message):
    outline(isolated / "edges.png")
    path = make(isolated, tiny_controlnets[0]) or isolated / "cn.safetensors"
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))
    result = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "--control",
                 f"canny:{isolated / 'edges.png'};model={path}")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_sd15_single_file_on_sdxl_is_made_for_another_model(cli, isolated, tiny_sdxl, tiny_controlnets):
    save_file(as_original(tiny_controlnets[0]), str(isolated / "cn.safetensors"))
    result = cli("txt2img", "a circle", "--model", tiny_sdxl, *SEED, "--control",
                 f"canny:{outline(isolated / 'edges.png')};model={isolated / 'cn.safetensors'}")
    assert result.exit_code == 2 and "made for another model" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def sdxl_nets(tiny_sdxl, tmp_path_factory) -> dict[str, Path]:
    """Tiny SDXL ControlNets saved as diffusers folders: plain, union (ProMax's 8 modes, its 8 heads) and "small"
    (attention levels without transformer layers)."""
    import torch
    from diffusers import ControlNetModel, ControlNetUnionModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    torch.manual_seed(0)
    plain = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    config = {k: v for k, v in ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
              .config.items() if not k.startswith("_")}
    width = unet.config.block_out_channels[0]
    union = ControlNetUnionModel.from_config({**config, "num_control_type": 8, "num_trans_channel": width,
                                              "num_trans_head": 8, "num_proj_channel": width})
    small = ControlNetModel.from_config({**{k: v for k, v in plain.config.items() if not k.startswith("_")},
                                         "transformer_layers_per_block": 0})  # as diffusers' SDXL "small" ControlNets
    folders = {}
    for name, net in (("plain", plain), ("union", union), ("small", small)):
        for parameter in net.parameters():
            if parameter.abs().sum() == 0:
                torch.nn.init.normal_(parameter, std=0.3)
        folders[name] = tmp_path_factory.mktemp("sdxl-cn") / name
        net.save_pretrained(folders[name])
    return folders


def test_sdxl_single_files_plain_original_union_and_small_draw_what_their_folders_draw(cli, isolated, tiny_sdxl, sdxl_nets):
    edges = outline(isolated / "edges.png")
    save_file(as_original(sdxl_nets["plain"]), str(isolated / "xl.safetensors"))  # label_emb: SDXL's size conditioning
    shutil.copy(sdxl_nets["union"] / "diffusion_pytorch_model.safetensors", isolated / "promax.safetensors")
    shutil.copy(sdxl_nets["small"] / "diffusion_pytorch_model.safetensors", isolated / "xl_small.safetensors")
    for folder, file in ((sdxl_nets["plain"], "xl.safetensors"), (sdxl_nets["union"], "promax.safetensors"),
                         (sdxl_nets["small"], "xl_small.safetensors")):
        expected = draw(cli, tiny_sdxl, f"canny:{edges};model={folder}", "folder.png")
        got = draw(cli, tiny_sdxl, f"canny:{edges};model={isolated / file}", "file.png")
        assert np.abs(got - expected).max() == 0, file


def test_the_server_offers_single_files_in_controlnet_dir_by_name(isolated, tiny_controlnets):
    from diffcli.errors import UsageError
    from diffcli.server.catalog import _controlnets

    save_file(as_original(tiny_controlnets[0]), str(isolated / "control_v11p_sd15_canny.safetensors"))
    save_file({"lora_unet_x.lora_up.weight": __import__("torch").zeros(2, 2)}, str(isolated / "a-lora.safetensors"))
    save_file(folder_state(tiny_controlnets[0]), str(isolated / "Upper.SAFETENSORS"))
    (isolated / "notes.txt").write_text("not a model")
    shutil.copytree(tiny_controlnets[1], isolated / "tiny-cn-1")
    found = _controlnets(str(isolated))
    assert found == {"control_v11p_sd15_canny": str(isolated / "control_v11p_sd15_canny.safetensors"),
                     "Upper": str(isolated / "Upper.SAFETENSORS"), "tiny-cn-1": str(isolated / "tiny-cn-1")}
    from diffcli.server.catalog import Catalog

    catalog = Catalog.__new__(Catalog)
    catalog.controlnets = found
    assert catalog.controlnet("control_v11p_sd15_canny [a1b2c3d4]") == found["control_v11p_sd15_canny"]
    assert catalog.controlnet("control_v11p_sd15_canny.safetensors") == found["control_v11p_sd15_canny"]
    assert catalog.controlnet("Upper.SAFETENSORS") == found["Upper"]
    with pytest.raises(UsageError):
        catalog.controlnet("../control_v11p_sd15_canny")
