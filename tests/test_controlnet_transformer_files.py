"""Single-file FLUX.1, SD3 and Qwen-Image ControlNets in diffusers' layout (a folder's weights file kept alone, as
ComfyUI users keep InstantX's and Shakker-Labs' files): each draws through the CLI what its folder draws, with its
config read from the tensors and the model; files that make no ControlNet are exit 2 before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flow_models import FAST, SIZE, tiny_flux, tiny_qwen_image, tiny_sd3  # noqa: F401 (fixtures)
from safetensors.torch import load_file, save_file
from task_inputs import pixels
from test_controlnet_families import flux_controlnets, outline, sd3_controlnet, sd3_two_blocks  # noqa: F401 (fixtures)
from test_controlnet_qwen_zimage import qwen_controlnet  # noqa: F401 (fixture)

WH = ("--width", SIZE[0], "--height", SIZE[1])


def as_file(folder: Path, path: Path, fp16: bool = False) -> Path:
    """The folder's weights alone, as one file (fp16 if asked)."""
    if fp16:
        save_file({k: v.half() for k, v in load_file(str(folder / "diffusion_pytorch_model.safetensors")).items()},
                  str(path))
    else:
        shutil.copy(folder / "diffusion_pytorch_model.safetensors", path)
    return path


def draw(cli, model, unit: str, out: str, *extra) -> np.ndarray:
    result = cli("txt2img", "a ring", "--model", model, *FAST, *WH, "--cfg", "3", "-o", out, "--overwrite",
                 "--control", unit, *extra)
    assert result.exit_code == 0, result.stderr
    return pixels(out)


@pytest.mark.parametrize("which, unit_extra", [("single", ""), ("union", ";mode=canny")])
def test_a_flux_controlnet_file_draws_what_its_folder_draws(cli, isolated, tiny_flux, flux_controlnets, which,
                                                            unit_extra):
    folder = flux_controlnets[which]
    edges = outline(isolated / "edges.png")
    path = as_file(folder, isolated / f"FLUX-{which}.SAFETENSORS")
    expected = draw(cli, tiny_flux, f"canny:{edges};model={folder}{unit_extra}", "folder.png")
    got = draw(cli, tiny_flux, f"canny:{edges};model={path}{unit_extra}", "file.png")
    assert np.abs(got - expected).max() == 0  # the same weights in the same class compute the same image
    other = flux_controlnets["union" if which == "single" else "single"]
    assert np.abs(got - draw(cli, tiny_flux, f"canny:{edges};model={other}{';mode=canny' if which == 'single' else ''}",
                             "other.png")).max() > 8
    again = cli("replay", "file.png", "-o", "again.png")
    assert again.exit_code == 0 and np.abs(pixels("again.png") - got).max() == 0, again.stderr


def test_an_sd3_controlnet_file_draws_what_its_folder_draws(cli, isolated, sd3_two_blocks, sd3_controlnet):
    edges = outline(isolated / "edges.png")
    path = as_file(sd3_controlnet, isolated / "sd3_canny.safetensors", fp16=True)
    expected = draw(cli, sd3_two_blocks, f"canny:{edges};model={sd3_controlnet}", "folder.png")
    got = draw(cli, sd3_two_blocks, f"canny:{edges};model={path}", "file.png")
    assert np.abs(got - expected).max() <= 6  # fp16 weights round
    free = cli("txt2img", "a ring", "--model", sd3_two_blocks, *FAST, *WH, "--cfg", "3", "-o", "free.png")
    assert free.exit_code == 0 and np.abs(got - pixels("free.png")).max() > 8


def test_an_sd35_large_style_controlnet_file_without_positions_is_read(isolated, sd3_two_blocks):
    """SD3.5 Large's ControlNets have no position embedding or text projection of their own (SD3 single blocks):
    the config still comes out of the shapes, in_channels and head size from the model."""
    from diffusers import SD3ControlNetModel

    from diffcli import controlnet_files

    net = SD3ControlNetModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                             num_attention_heads=4, joint_attention_dim=None, pooled_projection_dim=32,
                             out_channels=16, use_pos_embed=False, pos_embed_type=None, extra_conditioning_channels=1)
    save_file(net.state_dict(), str(isolated / "sd35l.safetensors"))
    config = controlnet_files.read_config(str(isolated / "sd35l.safetensors"), False,
                                          {"in_channels": 16, "attention_head_dim": 8, "sample_size": 32})
    assert config["_class_name"] == "SD3ControlNetModel" and not config["use_pos_embed"]
    assert (config["num_layers"], config["num_attention_heads"], config["extra_conditioning_channels"]) == (2, 4, 1)
    assert config["force_zeros_for_pooled_projection"] is False  # they take the pooled text, as Stability's configs say
    loaded = controlnet_files.load(str(isolated / "sd35l.safetensors"), config, False, net.dtype)
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_a_qwen_image_controlnet_file_draws_what_its_folder_draws(cli, isolated, tiny_qwen_image, qwen_controlnet):
    edges = outline(isolated / "edges.png")
    path = as_file(qwen_controlnet, isolated / "qwen_canny.safetensors")
    expected = draw(cli, tiny_qwen_image, f"canny:{edges};model={qwen_controlnet}", "folder.png")
    assert np.abs(draw(cli, tiny_qwen_image, f"canny:{edges};model={path}", "file.png") - expected).max() == 0


def _drop(name_part: str):
    return lambda state: {k: v for k, v in state.items() if name_part not in k}


@pytest.mark.parametrize("change, message", [
    (_drop("controlnet_blocks.0."), "2 missing"),
    (lambda state: {**state, "transformer_blocks.0.attn.norm_q.weight": __import__("torch").zeros(5)},
     "no whole number of 5-wide heads"),
    (lambda state: {**state, **{f"transformer_blocks.{i}.x": __import__("torch").zeros(1) for i in range(200)}},
     "200 transformer_blocks, no ControlNet's layout"),
    (_drop("context_embedder"), "in another layout than diffusers', or incomplete"),
    (lambda state: {**state, "transformer_blocks.0.attn.norm_q.weight": __import__("torch").zeros(1, 0)},
     "no usable tensor transformer_blocks.0.attn.norm_q.weight"),
])
def test_hostile_flux_controlnet_files_are_exit_2_before_any_model_loads(cli, isolated, tiny_flux, flux_controlnets,
                                                                         monkeypatch, change, message):
    state = load_file(str(flux_controlnets["single"] / "diffusion_pytorch_model.safetensors"))
    save_file(change(state), str(isolated / "cn.safetensors"))
    edges = outline(isolated / "edges.png")
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))
    result = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, *WH, "--control",
                 f"canny:{edges};model={isolated / 'cn.safetensors'}")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_flux_controlnet_file_on_another_family_is_exit_2(cli, isolated, tiny_sd3, flux_controlnets):
    edges = outline(isolated / "edges.png")
    path = as_file(flux_controlnets["single"], isolated / "flux.safetensors")
    result = cli("txt2img", "a ring", "--model", tiny_sd3, *FAST, "--control", f"canny:{edges};model={path}")
    assert result.exit_code == 2 and "a FluxControlNetModel; sd3 models take SD3ControlNetModel" in result.stderr


def test_a_pickled_flux_controlnet_plans_under_dry_run_without_opening_it(cli, isolated, tiny_flux, flux_controlnets):
    import torch

    torch.save(load_file(str(flux_controlnets["single"] / "diffusion_pytorch_model.safetensors")), isolated / "cn.pth")
    edges = outline(isolated / "edges.png")
    unit = f"canny:{edges};model={isolated / 'cn.pth'}"
    Path("jobs.jsonl").write_text(json.dumps({"prompt": "a ring", "control": [unit], "steps": 2}) + "\n")
    planned = cli("batch", "jobs.jsonl", "--model", tiny_flux, "--dry-run", "--allow-pickle")
    assert planned.exit_code == 0, planned.stderr
    got = draw(cli, tiny_flux, unit, "pickle.png", "--allow-pickle")
    assert np.abs(got - draw(cli, tiny_flux, f"canny:{edges};model={flux_controlnets['single']}", "f.png")).max() == 0


def test_the_server_lists_flux_and_sd3_controlnet_files_by_name(isolated, flux_controlnets, sd3_controlnet):
    from diffcli.server.catalog import _controlnets

    as_file(flux_controlnets["union"], isolated / "FLUX.1-dev-ControlNet-Union-Pro.safetensors")
    as_file(sd3_controlnet, isolated / "sd3_canny.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": __import__("torch").zeros(2, 2)}, str(isolated / "xlabs.safetensors"))
    assert set(_controlnets(str(isolated))) == {"FLUX.1-dev-ControlNet-Union-Pro", "sd3_canny"}


def _config_of(net, path: Path, model: dict) -> dict:
    from diffcli import controlnet_files

    save_file(net.state_dict(), str(path))
    return controlnet_files.read_config(str(path), False, model)


def test_other_valid_layouts_read_their_config_from_the_shapes(isolated):
    """FLUX.1 with a map encoder in pixels (XLabs' diffusers conversions) and no double blocks; SD3 whose position
    table is not saved (no maximum size); each config builds the model the file holds."""
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    flux = FluxControlNetModel(in_channels=16, num_layers=0, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                               axes_dims_rope=[2, 2, 4], conditioning_embedding_channels=16)
    config = _config_of(flux, isolated / "xlabs.safetensors", {"axes_dims_rope": [2, 2, 4]})
    assert (config["conditioning_embedding_channels"], config["num_layers"], config["num_single_layers"]) == (16, 0, 2)
    sd3 = SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                             num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                             pooled_projection_dim=10, out_channels=4, pos_embed_max_size=None)
    config = _config_of(sd3, isolated / "sd3.safetensors", {"pos_embed_max_size": 96, "sample_size": 16, "attention_head_dim": 8})
    assert config["pos_embed_max_size"] is None and config["force_zeros_for_pooled_projection"] is True


@pytest.mark.parametrize("change, message", [
    (lambda state: {**state, "pos_embed.pos_embed": __import__("torch").zeros(1, 4096 * 4096, 1)},
     "not a square grid of at most 512x512"),
    (lambda state: {**state, "time_text_embed.timestep_embedder.linear_1.weight": __import__("torch").zeros(40000, 1)},
     "beyond any ControlNet's 16384"),
])
def test_hostile_sd3_files_are_refused_before_their_tables_are_built(isolated, sd3_controlnet, change, message):
    from diffcli import controlnet_files
    from diffcli.errors import UsageError

    state = load_file(str(sd3_controlnet / "diffusion_pytorch_model.safetensors"))
    save_file(change(state), str(isolated / "cn.safetensors"))
    with pytest.raises(UsageError, match=message):
        controlnet_files.read_config(str(isolated / "cn.safetensors"), False, {"pos_embed_max_size": 96})


def test_a_qwen_file_whose_map_input_is_narrower_than_its_latents_is_refused(isolated, qwen_controlnet):
    import torch

    from diffcli import controlnet_files
    from diffcli.errors import UsageError

    state = load_file(str(qwen_controlnet / "diffusion_pytorch_model.safetensors"))
    width, channels = state["img_in.weight"].shape
    save_file({**state, "controlnet_x_embedder.weight": torch.zeros(width, channels - 1)}, str(isolated / "q.safetensors"))
    with pytest.raises(UsageError, match="narrower than its latent input"):
        controlnet_files.read_config(str(isolated / "q.safetensors"), False, {})


def test_a_controlnet_of_another_width_is_made_for_another_model(cli, isolated, tiny_flux, flux_controlnets):
    from diffusers import FluxControlNetModel

    wide = FluxControlNetModel.from_config({**FluxControlNetModel.load_config(flux_controlnets["single"]),
                                            "num_attention_heads": 4})
    save_file(wide.state_dict(), str(isolated / "wide.safetensors"))
    edges = outline(isolated / "edges.png")
    result = cli("txt2img", "a ring", "--model", tiny_flux, *FAST, "--control",
                 f"canny:{edges};model={isolated / 'wide.safetensors'}")
    assert result.exit_code == 2 and "made for another model (width 64" in result.stderr, result.stderr


def test_an_sd3_inpainting_controlnet_is_refused_before_loading(cli, isolated, sd3_two_blocks, sd3_controlnet):
    """Its map input also reads a mask (extra_conditioning_channels), which the txt2img ControlNet pipeline never gives."""
    from diffusers import SD3ControlNetModel

    config = {**SD3ControlNetModel.load_config(sd3_controlnet), "extra_conditioning_channels": 1}
    save_file(SD3ControlNetModel.from_config(config).state_dict(), str(isolated / "sd3_inpaint.safetensors"))
    edges = outline(isolated / "edges.png")
    result = cli("txt2img", "a ring", "--model", sd3_two_blocks, *FAST, "--control",
                 f"canny:{edges};model={isolated / 'sd3_inpaint.safetensors'}")
    assert result.exit_code == 2 and "an inpainting ControlNet" in result.stderr, result.stderr


@pytest.mark.parametrize(("model", "message"), [
    ({"n_layers": 2, "n_refiner_layers": 2, "n_heads": 2}, "1 control layers cannot feed this model's 2 noise refiners"),
    ({"n_layers": 3, "n_refiner_layers": 1, "n_heads": 2}, None),  # one control layer, fed to layer 0 only
    ({"n_layers": 2, "n_refiner_layers": 1, "n_heads": 3}, "width 32, no whole number of this model's 3 heads"),
])
def test_a_z_image_file_checked_against_its_model(model, message):
    """Union 2.0's layout (no refiner blocks of its own): its control layers also feed the noise refiners."""
    from diffcli import controlnet_transformer_files as files
    from diffcli.errors import UsageError

    shapes = {"control_layers.0.after_proj.weight": [32, 32], "control_all_x_embedder.2-1.weight": [32, 132]}
    if message is None:
        config = files.config(shapes, "z.safetensors", model, lambda name: pytest.fail("no value is read"))
        assert config["control_layers_places"] == [0] and config["add_control_noise_refiner"] == "control_layers"
        assert config["control_in_dim"] == 33 and files.unused(config) == ("control_noise_refiner.",)
        return
    with pytest.raises(UsageError, match=message):
        files.config(shapes, "z.safetensors", model, lambda name: pytest.fail("no value is read"))
