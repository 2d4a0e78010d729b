"""--ip-adapter: tiny IP-Adapters built for the tiny test U-Nets (a CLIPVisionModelWithProjection from a config dict as
the image encoder, an image_proj./ip_adapter. safetensors file shaped for the U-Net), through the CLI, against the plain
diffusers pipeline with load_ip_adapter for the same seed; scale 0, two adapters, metadata, a batch line, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flow_models import tiny_flux  # noqa: F401 (fixture)
from PIL import Image, ImageDraw

SEED = ("--seed", "3", "--steps", "2", "--quiet", "--width", "64", "--height", "64")
TOLERANCE = 2  # /255: the same computation as diffusers', through our pipeline cache and prompt encoding
ZERO_TOLERANCE = 2  # /255: --ip-scale 0 adds exactly zero attention, but the IP processors compute in another order


def build_adapter(unet, embed_dim: int, seed: int) -> dict:
    """A plain IP-Adapter state dict (4 image tokens) for `unet`, keys as h94/IP-Adapter's safetensors files: one
    to_k_ip/to_v_ip per cross-attention layer, numbered 1, 3, 5... in attn_processors order (diffusers' loader)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    cross, blocks = unet.config.cross_attention_dim, unet.config.block_out_channels
    state = {"image_proj.proj.weight": torch.randn(4 * cross, embed_dim, generator=generator) * 0.3,
             "image_proj.proj.bias": torch.zeros(4 * cross),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        for kind in ("k", "v"):
            state[f"ip_adapter.{key}.to_{kind}_ip.weight"] = torch.randn(hidden, cross, generator=generator) * 0.5
        key += 2
    return state


def save_adapters(root: Path, model: Path, count: int) -> list[Path]:
    """`count` adapter files (seeds 0, 1...) for the model in root/, with its image_encoder/ beside them."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=8))
    encoder.save_pretrained(root / "image_encoder")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    files = []
    for seed in range(count):
        save_file(build_adapter(unet, 16, seed), root / f"ip-adapter-{seed}.safetensors")
        files.append(root / f"ip-adapter-{seed}.safetensors")
    return files


@pytest.fixture(scope="session")
def tiny_ip(tmp_path_factory, tiny_model) -> list[Path]:
    return save_adapters(tmp_path_factory.mktemp("ip-sd1"), tiny_model, 2)


@pytest.fixture(scope="session")
def tiny_ip_xl(tmp_path_factory, tiny_sdxl) -> list[Path]:
    return save_adapters(tmp_path_factory.mktemp("ip-sdxl"), tiny_sdxl, 1)


def picture(path: Path, colour=(200, 40, 40)) -> Path:
    image = Image.new("RGB", (48, 48), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=colour)
    image.save(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def plain(model, adapters, images, scales, prompt, xl=False) -> np.ndarray:
    """The same image from diffusers alone: from_pretrained, load_ip_adapter from the folder, set_ip_adapter_scale."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = cls.from_pretrained(model, **({} if xl else {"safety_checker": None}))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapters[0].parent), subfolder="", weight_name=[a.name for a in adapters])
    pipe.set_ip_adapter_scale(scales)
    image = pipe(prompt, ip_adapter_image=[Image.open(i).convert("RGB") for i in images] if len(images) > 1
                 else Image.open(images[0]).convert("RGB"), num_inference_steps=2, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    return (image * 255).round().astype(np.int16)


def test_adapter_changes_the_image_equals_diffusers_and_scale_zero_is_off(cli, isolated, tiny_model, tiny_ip):
    red = picture(isolated / "red.png")
    free = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "free.png")
    full = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "full.png", "--json",
               "--ip-adapter", tiny_ip[0], "--ip-image", red, "--ip-scale", "0.8")
    zero = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "zero.png",
               "--ip-adapter", tiny_ip[0], "--ip-image", red, "--ip-scale", "0")
    assert free.exit_code == full.exit_code == zero.exit_code == 0, (full.stderr, zero.stderr)
    assert np.abs(pixels("full.png") - pixels("free.png")).max() > 8  # the tiny adapter does change the image
    assert np.abs(pixels("zero.png") - pixels("free.png")).max() <= ZERO_TOLERANCE
    expected = plain(tiny_model, tiny_ip[:1], [red], [0.8], "a circle")
    assert np.abs(pixels("full.png") - expected).max() <= TOLERANCE
    record = full.json_lines()[0]
    assert record["ip_adapter"] == [{"model": str(tiny_ip[0]), "image": str(red), "scale": 0.8}]
    assert record["ip_encoder"] == str(tiny_ip[0].parent / "image_encoder")
    read_back = json.loads(Image.open("full.png").info["diffcli"])
    assert read_back["ip_adapter"] == record["ip_adapter"]
    text = Image.open("full.png").info["parameters"]
    assert 'ControlNet 0: "Module: ip-adapter-auto, Model: ip-adapter-0, Weight: 0.8, Resize Mode: Crop and Resize, ' \
           'Guidance Start: 0, Guidance End: 1, Control Mode: Balanced"' in text
    again = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "after.png")  # unloaded for the next job
    assert again.exit_code == 0 and np.abs(pixels("after.png") - pixels("free.png")).max() <= ZERO_TOLERANCE


def test_two_adapters_equal_diffusers_and_replay(cli, isolated, tiny_model, tiny_ip):
    red, blue = picture(isolated / "red.png"), picture(isolated / "blue.png", (30, 60, 220))
    both = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "both.png", "--ip-adapter", tiny_ip[0],
               "--ip-image", red, "--ip-scale", "0.7", "--ip-adapter", tiny_ip[1], "--ip-image", blue, "--ip-scale", "0.4")
    assert both.exit_code == 0, both.stderr
    expected = plain(tiny_model, tiny_ip, [red, blue], [0.7, 0.4], "a circle")
    assert np.abs(pixels("both.png") - expected).max() <= TOLERANCE
    text = Image.open("both.png").info["parameters"]
    assert 'ControlNet 1: "Module: ip-adapter-auto, Model: ip-adapter-1, Weight: 0.4' in text
    again = cli("replay", "both.png", "-o", "again.png")
    assert again.exit_code == 0, again.stderr
    assert np.abs(pixels("again.png") - pixels("both.png")).max() <= 1


def test_sdxl_adapter_changes_the_image_and_scale_zero_is_off(cli, isolated, tiny_sdxl, tiny_ip_xl):
    """(Not compared with plain diffusers: diffcli's tiny-SDXL image differs from StableDiffusionXLPipeline's by ~30/255
    without any adapter too, from its prompt encoding; the SD 1.x tests above make the pixel comparison.)"""
    red = picture(isolated / "red.png")
    made = {name: cli("txt2img", "a circle", "--model", tiny_sdxl, *SEED, "-o", f"{name}.png", *extra)
            for name, extra in (("free", ()), ("ip", ("--ip-adapter", tiny_ip_xl[0], "--ip-image", red)),
                                ("zero", ("--ip-adapter", tiny_ip_xl[0], "--ip-image", red, "--ip-scale", "0")))}
    assert all(result.exit_code == 0 for result in made.values()), made["ip"].stderr
    assert np.abs(pixels("ip.png") - pixels("free.png")).max() > 8
    assert np.abs(pixels("zero.png") - pixels("free.png")).max() <= ZERO_TOLERANCE


def test_img2img_inpaint_outpaint_and_with_a_controlnet(cli, isolated, tiny_model, tiny_ip, tiny_controlnets):
    red = picture(isolated / "red.png")
    Image.new("RGB", (64, 64), (40, 160, 40)).save("in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save("mask.png")
    ip = ("--ip-adapter", tiny_ip[0], "--ip-image", red, "--seed", "3", "--steps", "4", "-q", "--json")
    for args in (("img2img", "in.png", "a circle", "--strength", "0.8"),
                 ("inpaint", "in.png", "a circle", "--mask", "mask.png"), ("outpaint", "in.png", "a circle", "--extend", "right=16"),
                 ("txt2img", "a circle", "--width", "64", "--height", "64", "--control",
                  f"scribble:{red};model={tiny_controlnets[0]}")):
        result = cli(*args, "--model", tiny_model, *ip, "-o", f"{args[0]}.png")
        assert result.exit_code == 0, (args[0], result.stderr)
        assert result.json_lines()[0]["ip_adapter"][0]["image"] == str(red)
    text = Image.open("txt2img.png").info["parameters"]
    assert 'ControlNet 0: "Module: scribble' in text and 'ControlNet 1: "Module: ip-adapter-auto' in text


def test_a_batch_line_takes_an_adapter(cli, isolated, tiny_model, tiny_ip):
    red = picture(isolated / "red.png")
    Path("jobs.jsonl").write_text(json.dumps({"prompt": "a circle", "ip_adapter": [str(tiny_ip[0])], "ip_image": [str(red)],
                                              "ip_scale": "0.5", "width": 64, "height": 64, "steps": 2}) + "\n")
    result = cli("batch", "jobs.jsonl", "--model", tiny_model, "--seed", "1", "-o", "b/", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["ip_adapter"][0]["scale"] == 0.5


def test_a_pickle_adapter_needs_allow_pickle_and_then_loads_as_data(cli, isolated, tiny_model, tiny_ip):
    """h94's .bin layout ({"image_proj": {...}, "ip_adapter": {...}}, torch.save): refused, then with --allow-pickle read
    by torch's restricted unpickler; the same image as the safetensors file."""
    import shutil

    import torch
    from safetensors.torch import load_file

    red = picture(isolated / "red.png")
    folder = isolated / "bin"
    shutil.copytree(tiny_ip[0].parent / "image_encoder", folder / "image_encoder")
    flat = load_file(tiny_ip[0])
    nested = {head: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(head + ".")}
              for head in ("image_proj", "ip_adapter")}
    torch.save(nested, folder / "ip-adapter.bin")
    args = ("txt2img", "a circle", "--model", tiny_model, *SEED, "--ip-image", red)
    refused = cli(*args, "--ip-adapter", folder / "ip-adapter.bin", "-o", "refused.png")
    assert refused.exit_code == 2 and "pickle file" in refused.stderr, refused.stderr
    allowed = cli(*args, "--ip-adapter", folder / "ip-adapter.bin", "-o", "bin.png", "--allow-pickle")
    safe = cli(*args, "--ip-adapter", tiny_ip[0], "-o", "safe.png")
    assert allowed.exit_code == safe.exit_code == 0, allowed.stderr
    assert np.abs(pixels("bin.png") - pixels("safe.png")).max() <= 1


def _pickle_file(path: Path) -> Path:
    path.write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # a pickle's PROTO 4 opcode: judged from the bytes, never opened
    return path


@pytest.mark.parametrize("args, message", [
    (("--ip-adapter", "{ip}"), "one --ip-image per adapter"),
    (("--ip-image", "{red}"), "--ip-image works with --ip-adapter"),
    (("--ip-adapter", "{ip}", "--ip-image", "{red}", "--ip-scale", "strong"), "--ip-scale must be a number"),
    (("--ip-adapter", "{ip}", "--ip-image", "{red}", "--ip-scale", "-1"), "--ip-scale must be a finite number >= 0"),
    (("--ip-adapter", "{ip}", "--ip-image", "{red}", "--ip-scale", "1", "--ip-scale", "1"), "one per adapter or none"),
    (("--ip-adapter", "{ip}", "--ip-image", "missing.png"), "missing.png: no such file"),
    (("--ip-adapter", "{pickle}", "--ip-image", "{red}"), "pickle file"),
    (("--ip-adapter", "{truncated}", "--ip-image", "{red}"), "truncated"),
    (("--ip-adapter", "{xl}", "--ip-image", "{red}"), "made for a model with 72-wide cross-attention"),
    (("--ip-adapter", "{ip}", "--ip-image", "{red}", "--ip-encoder", "./nowhere"), "--ip-encoder './nowhere': no such"),
    (("--ip-adapter", "./nowhere.safetensors", "--ip-image", "{red}"), "no such file or folder"),
    (("--ip-adapter", "h94/IP-Adapter/models/ip-adapter_sd15.safetensors", "--ip-image", "{red}"),
     "not in the Hugging Face cache"),
    (("--ip-adapter", "{ip}", "--ip-image", "{red}", "--hires", "2"), "not supported together yet"),
])
def test_bad_input_exits_2_before_loading(cli, isolated, tiny_model, tiny_ip, tiny_ip_xl, args, message):
    red = picture(isolated / "red.png")
    truncated = isolated / "cut.safetensors"
    truncated.write_bytes(tiny_ip[0].read_bytes()[:200])
    names = {"ip": tiny_ip[0], "red": red, "pickle": _pickle_file(isolated / "ip.safetensors"), "truncated": truncated,
             "xl": tiny_ip_xl[0]}
    result = cli("txt2img", "a circle", "--model", tiny_model, *SEED, *(str(a).format(**names) for a in args))
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_family_without_adapters_is_refused(cli, isolated, tiny_ip):
    red = picture(isolated / "red.png")
    result = cli("txt2img", "a circle", "--model", "tiny-shapes-x4", *SEED, "--ip-adapter", tiny_ip[0], "--ip-image", red)
    assert result.exit_code == 2 and "IP-Adapters run on sd1, sdxl, flux models" in result.stderr, result.stderr


@pytest.mark.slow
def test_the_server_takes_adapters_by_name_and_images_as_data(cli, isolated, tiny_model, tiny_ip):
    """--ip-adapter through --server: the adapter named by its file in the server's --controlnet-dir (where A1111 keeps
    IP-Adapters), the image sent as base64; the same pixels as a local run. A request cannot name a path."""
    pytest.importorskip("fastapi")
    pytest.importorskip("webuiapi")
    import base64
    import io
    import shutil

    from test_server import post, serving

    red = picture(isolated / "red.png")
    shutil.copytree(tiny_model, isolated / "served" / "tiny-sd")
    local = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "-o", "local.png",
                "--ip-adapter", tiny_ip[0], "--ip-image", "red.png", "--ip-scale", "0.8")
    assert local.exit_code == 0, local.stderr
    with serving(models_dir=str(isolated / "served"), controlnet_dir=str(tiny_ip[0].parent)) as (url, app):
        remote = cli("txt2img", "a circle", "--model", "tiny-sd", *SEED, "-o", "remote.png", "--json", "--server", url,
                     "--ip-adapter", "ip-adapter-0", "--ip-image", "red.png", "--ip-scale", "0.8")
        assert remote.exit_code == 0, remote.stderr
        assert np.array_equal(pixels("remote.png"), pixels("local.png"))
        assert remote.json_lines()[0]["ip_adapter"] == [{"model": "ip-adapter-0", "image": "red.png", "scale": 0.8}]
        unit = {"enabled": True, "input_image": base64.b64encode(Path("red.png").read_bytes()).decode(),
                "module": "ip-adapter_clip_h", "model": "ip-adapter-0 [abc]", "weight": 0.8}
        body = {"prompt": "a circle", "seed": 3, "steps": 2, "width": 64, "height": 64,
                "override_settings": {"sd_model_checkpoint": "tiny-sd"}, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
        status, answer = post(url, "/sdapi/v1/txt2img", body)  # A1111's ControlNet extension's IP-Adapter unit
        assert status == 200, answer
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"), dtype=np.int16)
        assert np.array_equal(served, pixels("local.png"))
        for body in ({"prompt": "x", "ip_adapter": [{"model": str(tiny_ip[0]), "image": "AAAA"}]},
                     {"prompt": "x", "ip_adapter": [{"model": "ip-adapter-0"}], "ip_image": ["/etc/passwd"]},
                     {"prompt": "x", "ip_encoder": "/etc"}):
            status, answer = post(url, "/diffcli/v1/plan", body)
            assert status == 422, (body, answer)


@pytest.mark.slow
def test_a_hub_adapter_loads_from_the_hf_cache(cli, isolated, tiny_model, tiny_ip):
    """owner/repo/subfolder/file.safetensors through huggingface_hub and transformers' Hub loading, offline from a
    cache as `hf download` leaves it (its image_encoder beside the file); the same image as the local file."""
    import shutil

    from conftest import HUB_COMMIT, run_subprocess

    red = picture(isolated / "red.png")
    repo = isolated / "hf" / "models--diffcli-test--tiny-ip"
    shutil.copytree(tiny_ip[0].parent, repo / "snapshots" / HUB_COMMIT / "models")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    args = ("txt2img", "a circle", "--model", tiny_model, *SEED, "--ip-image", red, "--ip-scale", "0.8")
    local = cli(*args, "--ip-adapter", tiny_ip[0], "-o", "local.png")
    hub = run_subprocess(*args, "--ip-adapter", "diffcli-test/tiny-ip/models/ip-adapter-0.safetensors", "-o", "hub.png",
                         env={"HF_HUB_CACHE": str(isolated / "hf"), "HF_HUB_OFFLINE": "1"}, cwd=isolated)
    assert local.exit_code == 0 and hub.returncode == 0, hub.stderr
    assert np.abs(pixels("hub.png") - pixels("local.png")).max() <= 1


def test_a_refiner_finishes_without_the_image_prompt(cli, isolated, tiny_model, tiny_ip, tiny_sdxl, tiny_ip_xl,
                                                     tiny_sdxl_refiner, tiny_sd2):
    """The adapter acts on the base model's steps; an SD 1.x/2.x refiner's U-Net (taking over inside the call) and an
    SDXL refiner (a second call) run without it, as A1111 runs the refiner model without the unit's adapter."""
    red = picture(isolated / "red.png")
    for name, model, refiner, ip in (("sd", tiny_model, tiny_sd2, tiny_ip[0]),
                                     ("xl", tiny_sdxl, tiny_sdxl_refiner, tiny_ip_xl[0])):
        args = ("txt2img", "a circle", "--model", model, *SEED, "--refiner", refiner, "--refiner-start", "0.5")
        free = cli(*args, "-o", f"{name}-free.png")
        made = cli(*args, "-o", f"{name}-ip.png", "--ip-adapter", ip, "--ip-image", red)
        assert free.exit_code == made.exit_code == 0, (name, made.stderr)
        assert np.abs(pixels(f"{name}-ip.png") - pixels(f"{name}-free.png")).max() > 0, name


# --- FLUX.1: XLabs' adapter layout, loaded into the transformer -------------------------------------------------------

def save_flux_adapter(root: Path, model: Path) -> Path:
    """An adapter for the tiny FLUX.1 under XLabs' names (flux-ip-adapter's ip_adapter.safetensors: ip_adapter_proj_model.*
    and double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*), with a CLIP image encoder beside it."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=8)).save_pretrained(root / "image_encoder")
    config = FluxTransformer2DModel.load_config(model, subfolder="transformer")
    text, inner = config["joint_attention_dim"], config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(0)
    state = {"ip_adapter_proj_model.proj.weight": torch.randn(4 * text, 16, generator=generator),
             "ip_adapter_proj_model.proj.bias": torch.zeros(4 * text),
             "ip_adapter_proj_model.norm.weight": torch.ones(text), "ip_adapter_proj_model.norm.bias": torch.zeros(text)}
    for block in range(config["num_layers"]):
        for kind in ("k", "v"):
            name = f"double_blocks.{block}.processor.ip_adapter_double_stream_{kind}_proj"
            state[f"{name}.weight"] = torch.randn(inner, text, generator=generator) * 2
            state[f"{name}.bias"] = torch.zeros(inner)
    save_file(state, root / "ip_adapter.safetensors")
    return root / "ip_adapter.safetensors"


FLUX_RUN = ("--seed", "3", "--steps", "2", "--quiet", "--width", "32", "--height", "32")


def test_flux_adapter_equals_diffusers_and_scale_zero_is_off(cli, isolated, tiny_flux):
    """XLabs' layout into FLUX.1's transformer: the image of diffusers' own load_ip_adapter of the file; scale 0 and
    the next job without it give the adapter-free image."""
    import torch
    from diffusers import FluxPipeline

    adapter, red = save_flux_adapter(isolated / "ip", tiny_flux), picture(isolated / "red.png")
    runs = {name: cli("txt2img", "a circle", "--model", tiny_flux, *FLUX_RUN, "-o", f"{name}.png", *args)
            for name, args in (("free", ()), ("full", ("--ip-adapter", adapter, "--ip-image", red, "--ip-scale", "0.8")),
                               ("zero", ("--ip-adapter", adapter, "--ip-image", red, "--ip-scale", "0")), ("after", ()))}
    assert all(r.exit_code == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapter.parent), weight_name=adapter.name, image_encoder_dtype=torch.float32,
                         image_encoder_pretrained_model_name_or_path=str(adapter.parent / "image_encoder"))
    pipe.set_ip_adapter_scale(0.8)
    expected = pipe("a circle", ip_adapter_image=Image.open(red).convert("RGB"), num_inference_steps=2, width=32,
                    height=32, guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    assert np.abs(pixels("full.png") - (expected * 255).round()).max() <= TOLERANCE
    assert np.abs(pixels("full.png") - pixels("free.png")).max() > 4 * TOLERANCE  # the adapter counts
    for name in ("zero", "after"):
        assert np.abs(pixels(f"{name}.png") - pixels("free.png")).max() <= ZERO_TOLERANCE, name


def test_flux_adapter_without_an_encoder_beside_it_names_clip_vit_l(cli, isolated, tiny_flux):
    """XLabs' repository has no image_encoder folder: CLIP ViT-L/14 from the Hub is the default, offline (and not
    cached) a one-line error naming it, before any model loads."""
    adapter, red = save_flux_adapter(isolated / "ip", tiny_flux), picture(isolated / "red.png")
    import shutil

    shutil.rmtree(adapter.parent / "image_encoder")
    result = cli("txt2img", "a circle", "--model", tiny_flux, *FLUX_RUN, "--ip-adapter", adapter, "--ip-image", red)
    assert result.exit_code == 2 and "openai/clip-vit-large-patch14" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, message", [
    ("no-proj", "not an IP-Adapter (no image_proj.* and ip_adapter.*.to_k_ip tensors)"),
    ("wide", "made for a model with 48-wide cross-attention"),
    ("blocks", "has 2 cross-attention layers"),
    ("truncated", "truncated"),
    ("sd-adapter", "has 4 cross-attention layers"),
])
def test_bad_flux_adapter_files_exit_2_before_loading(cli, isolated, tiny_flux, tiny_ip, damage, message):
    """XLabs-layout files read as diffusers' names are checked like SD ones: a file without its projection, one made
    for another text width or block count, a cut file, and an SD adapter on FLUX.1 are one line, exit 2."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter, red = save_flux_adapter(isolated / "ip", tiny_flux), picture(isolated / "red.png")
    state, bad = load_file(adapter), isolated / "ip" / "bad.safetensors"
    if damage == "no-proj":
        save_file({k: v for k, v in state.items() if not k.startswith("ip_adapter_proj_model.")}, bad)
    elif damage == "wide":
        save_file({k: torch.zeros(v.shape[0], 48) if "double_stream" in k and k.endswith("weight") else v
                   for k, v in state.items()}, bad)
    elif damage == "blocks":
        extra = {k.replace("double_blocks.0.", "double_blocks.1."): v.clone() for k, v in state.items()
                 if "double_blocks.0." in k}
        save_file({**state, **extra}, bad)
    elif damage == "truncated":
        bad.write_bytes(adapter.read_bytes()[:300])
    else:
        bad = tiny_ip[0]
    result = cli("txt2img", "a circle", "--model", tiny_flux, *FLUX_RUN, "--ip-adapter", bad, "--ip-image", red,
                 "--ip-encoder", adapter.parent / "image_encoder")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_sdxl_model_refining_itself_with_an_adapter_exits_2(cli, isolated, tiny_sdxl, tiny_ip_xl):
    """Its refiner pipeline would share the U-Net holding the adapter and call it without the image prompt."""
    red = picture(isolated / "red.png")
    result = cli("txt2img", "a circle", "--model", tiny_sdxl, *SEED, "--refiner", tiny_sdxl, "--ip-adapter", tiny_ip_xl[0],
                 "--ip-image", red)
    assert result.exit_code == 2 and "--refiner (the model itself, on SDXL): not supported together" in result.stderr


def test_adapters_load_into_a_u_net_with_sliced_attention(tiny_model, tiny_ip, isolated):
    """--low-vram slices attention on CUDA; diffusers' loader cannot rebuild sliced processors, so they are put back to
    the default ones first, and the out-of-memory ladder then leaves slicing out."""
    from diffusers import StableDiffusionPipeline

    from diffcli import ip_adapter
    from diffcli.jobs import build
    from diffcli.models import resolve_model

    [job] = build("txt2img", {"prompt": "a circle", "model": str(tiny_model), "ip_adapter": [str(tiny_ip[0])],
                              "ip_image": [str(picture(isolated / "red.png"))]})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.enable_attention_slicing()
    resolved = ip_adapter.resolve(job, resolve_model(str(tiny_model)))
    ip_adapter.activate(pipe, resolved, "cpu", pipe.unet.dtype, False)
    assert ip_adapter.loaded(pipe)
    assert any(type(p).__name__.startswith("IPAdapter") for p in pipe.unet.attn_processors.values())


def test_the_out_of_memory_ladder_leaves_attention_slicing_out_with_an_adapter(cli, isolated, tiny_model, tiny_ip,
                                                                                oom_twice):
    red = picture(isolated / "red.png")
    loud = [a for a in SEED if a != "--quiet"]  # the ladder's steps are said on stderr
    result = cli("txt2img", "a circle", "--model", tiny_model, *loud, "-o", "o.png", "--ip-adapter", tiny_ip[0],
                 "--ip-image", red)
    assert result.exit_code == 0, result.stderr
    assert "attention slicing" not in result.stderr
    assert "retrying with VAE tiling" in result.stderr and "retrying with one image per call" in result.stderr


def test_an_encoder_read_only_when_it_loads_is_still_checked_against_the_adapter(cli, isolated, tiny_model, tiny_ip,
                                                                                  monkeypatch):
    """A Hub encoder's config is not read at plan time; once loaded, an encoder of another width is one line, exit 2,
    not a matrix error inside the pipeline."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffcli import ip_adapter

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=24, intermediate_size=37,
                                                   num_attention_heads=4, num_hidden_layers=2, image_size=32,
                                                   patch_size=8)).save_pretrained(isolated / "wide-encoder")
    monkeypatch.setattr(ip_adapter, "_check_encoder", lambda *args, **kwargs: None)  # as a Hub encoder at plan time
    result = cli("txt2img", "a circle", "--model", tiny_model, *SEED, "--ip-adapter", tiny_ip[0],
                 "--ip-image", picture(isolated / "red.png"), "--ip-encoder", isolated / "wide-encoder")
    assert result.exit_code == 2 and "takes 16-wide image embeddings, its image encoder gives 24" in result.stderr
