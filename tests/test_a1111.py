"""A1111 habits end to end on the tiny model: --seed -1, --vae, replay, Prompt S/R, and the model-loading line."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from diffcli.output import read_metadata

FAST = ("--steps", "2")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------- --seed -1


def test_seed_minus_one_is_random_and_reported(cli, tiny_model):
    result = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "-1", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    (record,) = result.json_lines()
    assert 0 <= record["seed"] < 2**32 and f"seed {record['seed']}" in result.stderr
    assert read_metadata(record["path"])["seed"] == record["seed"]
    swept = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "5,-1", "-o", "s/{index}.png", "--json", "--quiet", *FAST)
    assert swept.exit_code == 0, swept.stderr
    first, second = swept.json_lines()
    assert first["seed"] == 5 and second["seed"] != -1 and 0 <= second["seed"] < 2**32


def test_seed_minus_one_on_image_commands(cli, tiny_model, tmp_path):
    from task_inputs import write_photo

    result = cli("img2img", write_photo(tmp_path, (64, 64)), "a cat", "--model", tiny_model, "--seed", "-1",
                 "--strength", "0.5", "--json", "--quiet", *FAST)
    assert result.exit_code == 0, result.stderr
    assert 0 <= result.json_lines()[0]["seed"] < 2**32


@pytest.mark.parametrize("command", [["txt2img", "a"], ["batch", "jobs.txt", "--dry-run"]])
def test_other_negative_seeds_are_refused(cli, tiny_model, command):
    Path("jobs.txt").write_text("a cat\n")
    result = cli(*command, "--model", tiny_model, "--seed", "-2", *FAST)
    assert result.exit_code == 2 and "or -1 (random), got -2" in result.stderr, result.stderr
    assert not Path("outputs").exists()


def test_batch_seed_minus_one(cli, tiny_model):
    Path("jobs.jsonl").write_text(json.dumps({"prompt": "a", "seed": -1}) + "\n" + json.dumps({"prompt": "b", "seed": 4}) + "\n")
    runs = [cli("batch", "jobs.jsonl", "--model", tiny_model, "--seed", "100", "--dry-run", *FAST) for _ in range(2)]
    assert all(run.exit_code == 0 for run in runs), runs[0].stderr
    first, second = runs[0].json_lines()
    assert first["seeds"][0] not in (-1, 100) and 0 <= first["seeds"][0] < 2**32 and second["seeds"] == [4]
    assert runs[1].json_lines()[0]["seeds"] == first["seeds"]  # drawn from the base seed: a rerun resumes
    base = cli("batch", "jobs.jsonl", "--model", tiny_model, "--seed", "-1", "--dry-run", *FAST)
    assert base.exit_code == 0 and "drawn at run time" in base.stderr, base.stderr


# ---------------------------------------------------------------- --vae


@pytest.fixture(scope="module")
def vaes(tiny_model, tmp_path_factory):
    """The tiny model's VAE architecture with other random weights: a folder, an A1111 (LDM layout) file, a
    diffusers-layout file, a pickle; and an 8-latent-channel VAE the tiny model cannot use."""
    import torch
    from diffusers import AutoencoderKL
    from diffcli.ldm_format import vae_to_ldm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("vaes")
    config = AutoencoderKL.load_config(tiny_model / "vae")
    torch.manual_seed(7)
    vae = AutoencoderKL.from_config(config)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    vae.save_pretrained(root / "other-vae")
    state = {k: v.detach().contiguous().clone() for k, v in vae.state_dict().items()}
    ldm = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(state, len(config["block_out_channels"])).items()}
    save_file(ldm, str(root / "other-vae-a1111.safetensors"))
    save_file(state, str(root / "other-vae-diffusers.safetensors"))
    torch.save(ldm, root / "other-vae.pt")
    torch.manual_seed(8)
    AutoencoderKL.from_config(config, latent_channels=8).save_pretrained(root / "wide-vae")
    return root


def test_vae_folder_and_single_files_change_the_image_alike(cli, tiny_model, vaes):
    base = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "1", "-o", "base.png", "--quiet", *FAST)
    assert base.exit_code == 0, base.stderr
    made = {}
    for name in ("other-vae", "other-vae-a1111.safetensors", "other-vae-diffusers.safetensors"):
        result = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "1", "--vae", vaes / name, "-o", f"{name}.png",
                     "--quiet", *FAST)
        assert result.exit_code == 0, result.stderr
        made[name] = pixels(f"{name}.png")
        meta = read_metadata(f"{name}.png")
        assert meta["vae"] == str(vaes / name) and len(meta["vae_hash"]) == 10
        assert f"VAE: {name}, VAE hash: {meta['vae_hash']}" in Image.open(f"{name}.png").info["parameters"]
        assert meta["id"] != read_metadata("base.png")["id"]  # the VAE is part of the image's identity
    assert np.abs(made["other-vae"] - pixels("base.png")).max() > 10
    assert np.abs(made["other-vae-a1111.safetensors"] - made["other-vae"]).max() <= 1  # the same weights, converted
    assert np.abs(made["other-vae-diffusers.safetensors"] - made["other-vae"]).max() <= 1
    again = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "1", "-o", "again.png", "--quiet", *FAST)
    assert again.exit_code == 0 and np.array_equal(pixels("again.png"), pixels("base.png"))  # cached per VAE


def test_vae_refusals(cli, tiny_model, vaes, tmp_path):
    wide = cli("txt2img", "a", "--model", tiny_model, "--vae", vaes / "wide-vae", *FAST)
    assert wide.exit_code == 2 and "has 8 latent channels, the model" in wide.stderr and "has 4" in wide.stderr
    pickle = cli("txt2img", "a", "--model", tiny_model, "--vae", vaes / "other-vae.pt", *FAST)
    assert pickle.exit_code == 2 and "is a pickle file" in pickle.stderr and "--allow-pickle" in pickle.stderr
    (tmp_path / "empty").mkdir()
    empty = cli("txt2img", "a", "--model", tiny_model, "--vae", tmp_path / "empty", *FAST)
    assert empty.exit_code == 2 and "has no config.json" in empty.stderr
    missing = cli("txt2img", "a", "--model", tiny_model, "--vae", "nope.safetensors", *FAST)
    assert missing.exit_code == 2 and "no such file or folder" in missing.stderr
    assert not Path("outputs").exists()
    allowed = cli("txt2img", "a", "--model", tiny_model, "--seed", "1", "--vae", vaes / "other-vae.pt", "--allow-pickle",
                  "-o", "p.png", "--quiet", *FAST)
    folder = cli("txt2img", "a", "--model", tiny_model, "--seed", "1", "--vae", vaes / "other-vae", "-o", "f.png", "--quiet", *FAST)
    assert allowed.exit_code == folder.exit_code == 0, allowed.stderr
    assert np.abs(pixels("p.png") - pixels("f.png")).max() <= 1


def test_vae_on_a_single_file_model_and_img2img(cli, tiny_model, tiny_checkpoint, vaes, tmp_path):
    from task_inputs import write_photo

    result = cli("img2img", write_photo(tmp_path, (64, 64)), "a cat", "--model", tiny_checkpoint, "--model-config", tiny_model, "--vae",
                 vaes / "other-vae-a1111.safetensors", "--strength", "0.5", "--seed", "2", "--json", "--quiet", *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["vae"] == str(vaes / "other-vae-a1111.safetensors")


@pytest.mark.slow  # starts a process
def test_vae_from_the_hub_cache(cli, tiny_model, hf_cache, tmp_path):
    from conftest import HUB_REPO, run_subprocess

    result = run_subprocess("txt2img", "a cat", "--model", tiny_model, "--vae", HUB_REPO, "--seed", "1", "--steps", "2",
                            "-o", "hub.png", env={"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = read_metadata(tmp_path / "hub.png")
    assert meta["vae"] == HUB_REPO and meta["vae_hash"] == ""  # a pipeline repo: its vae/ folder
    assert f"VAE: {HUB_REPO}," in Image.open(tmp_path / "hub.png").info["parameters"]
    own = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "1", "-o", "own.png", "--quiet", *FAST)
    assert own.exit_code == 0 and np.abs(pixels(tmp_path / "hub.png") - pixels("own.png")).max() <= 1  # the same VAE


# ---------------------------------------------------------------- replay


def test_replay_of_a_diffcli_image_is_identical(cli, tiny_model):
    made = cli("txt2img", "a red cat", "-n", "blurry", "--model", tiny_model, "--seed", "3", "--cfg", "5", "-o", "orig.png",
               "--quiet", *FAST)
    assert made.exit_code == 0, made.stderr
    result = cli("replay", "orig.png", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    (record,) = result.json_lines()
    assert (record["prompt"], record["negative"], record["seed"], record["cfg"], record["steps"]) == ("a red cat", "blurry", 3, 5.0, 2)
    assert Path(record["path"]).parent == Path("outputs")
    assert record["verify"]["identical"] and record["verify"]["max_abs"] == 0 and record["verify"]["mean_abs"] == 0
    changed = cli("replay", "orig.png", "--steps", "3", "--seed", "4", "--verify", "-o", "changed.png")
    assert changed.exit_code == 0 and changed.stdout.strip() == "changed.png", changed.stderr
    meta = read_metadata("changed.png")
    assert (meta["steps"], meta["seed"], meta["prompt"]) == (3, 4, "a red cat")
    assert "verify: differs from orig.png: max absolute difference" in changed.stderr


def test_replay_keeps_the_vae(cli, tiny_model, vaes):
    made = cli("txt2img", "a", "--model", tiny_model, "--seed", "3", "--vae", vaes / "other-vae", "-o", "v.png", "--quiet", *FAST)
    assert made.exit_code == 0, made.stderr
    result = cli("replay", "v.png", "--verify", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["verify"]["identical"]


def _a1111_png(path: str, text: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), "gray").save(path, pnginfo=info)


def test_replay_of_a1111_parameters(cli, tiny_model):
    _a1111_png("a1111.png", "a red cat,\nsitting\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, "
               f'CFG scale: 6, Seed: 42, Size: 64x64, Model hash: 0123456789, Model: {tiny_model}, Foo: "a, b", Bar: 1')
    result = cli("replay", "a1111.png", "--json")
    assert result.exit_code == 0, result.stderr
    (record,) = result.json_lines()
    assert (record["prompt"], record["negative"], record["steps"], record["cfg"], record["seed"], record["scheduler"]) == \
        ("a red cat,\nsitting", "blurry", 2, 6.0, 42, "dpm++2m-karras")
    assert "replay: ignoring what diffcli does not use: Foo, Bar" in result.stderr
    assert "has hash" in result.stderr  # the recorded Model hash is not the tiny model's
    same = cli("txt2img", "a red cat,\nsitting", "-n", "blurry", "--model", tiny_model, "--steps", "2", "--cfg", "6", "--seed",
               "42", "--scheduler", "dpm++2m-karras", "-o", "direct.png", "--quiet")
    assert same.exit_code == 0 and np.array_equal(pixels(record["path"]), pixels("direct.png"))


def test_replay_by_model_name_and_overrides(cli, tiny_model):
    _a1111_png("named.png", "a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model: my-model")
    missing = cli("replay", "named.png")
    assert missing.exit_code == 2 and "made with model 'my-model'" in missing.stderr and "--model" in missing.stderr
    result = cli("replay", "named.png", "--model", tiny_model, "--cfg", "3", "--scheduler", "ddim", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["cfg"], record["scheduler"], record["seed"], record["model"]) == (3.0, "ddim", 1, str(tiny_model))
    random = cli("replay", "named.png", "--model", tiny_model, "--seed", "-1", "--json", "--quiet")
    assert random.exit_code == 0 and random.json_lines()[0]["seed"] != -1, random.stderr
    bad = cli("replay", "named.png", "--model", tiny_model, "--seed", "-3")
    assert bad.exit_code == 2 and "or -1 (random), got -3" in bad.stderr


def test_replay_of_a_jpeg_reads_exif(cli, tiny_model):
    made = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "8", "-o", "cat.jpg", "--quiet", *FAST)
    assert made.exit_code == 0, made.stderr
    result = cli("replay", "cat.jpg", "--verify", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert record["seed"] == 8 and record["verify"]["max_abs"] >= 0 and "mean_abs" in record["verify"]


def test_replay_refusals(cli, tiny_model, tmp_path):
    from task_inputs import write_photo

    Image.new("RGB", (8, 8)).save("plain.png")
    plain = cli("replay", "plain.png")
    assert plain.exit_code == 2 and "plain.png has no generation parameters" in plain.stderr
    photo = write_photo(tmp_path, (64, 64), "input.png")
    made = cli("img2img", photo, "a", "--model", tiny_model, "--strength", "0.5", "-o", "i2i.png", "--quiet", *FAST)
    assert made.exit_code == 0, made.stderr
    again = cli("replay", "i2i.png", "--verify", "--json", "--quiet")
    assert again.exit_code == 0 and again.json_lines()[0]["verify"]["identical"], again.stderr
    photo.unlink()
    gone = cli("replay", "i2i.png")
    assert gone.exit_code == 2 and "made by img2img from" in gone.stderr and "not available" in gone.stderr
    _a1111_png("a-i2i.png", "a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.5")
    other = cli("replay", "a-i2i.png", "--model", tiny_model)
    assert other.exit_code == 2 and "made by img2img" in other.stderr, other.stderr


def test_a1111_text_parsing():
    from diffcli.replay import parse_a1111, settings_from_a1111

    text = ('a (cat:1.2)\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 9, Size: 512x768, '
            'Clip skip: 2, Denoising strength: 0.6, Hires upscale: 2, Hires steps: 5, Hires upscaler: Latent (nearest-exact), '
            'Lora hashes: "x: 1234, y: 5678", Version: v1.9.0')
    prompt, negative, fields = parse_a1111(text)
    assert (prompt, negative, fields["Lora hashes"]) == ("a (cat:1.2)", "ugly", "x: 1234, y: 5678")
    settings, unused = settings_from_a1111(text, "x.png")
    assert unused == [] and settings["task"] == "txt2img" and settings["refiner"] is None
    assert (settings["width"], settings["height"], settings["clip_skip"], settings["hires_scale"], settings["hires_steps"],
            settings["hires_strength"], settings["hires_upscaler"]) == (512, 768, 2, 2.0, 5, 0.6, "latent")
    only_prompt, _, none = parse_a1111("just a prompt, with commas")
    assert only_prompt == "just a prompt, with commas" and none == {}


def test_a1111_hires_resize_is_a_hires_fix_not_an_img2img():
    """A1111 writes `Hires resize: WxH` when a target size was set: the scale from Size, the strength the hires fix's."""
    from diffcli.errors import UsageError
    from diffcli.replay import settings_from_a1111

    text = "a cat\nSteps: 20, Seed: 9, Size: 512x768, Denoising strength: 0.55, Hires resize: 1024x1536"
    settings, unused = settings_from_a1111(text, "x.png")
    assert unused == [] and settings["task"] == "txt2img"
    assert (settings["hires_scale"], settings["hires_strength"]) == (2.0, 0.55)
    with pytest.raises(UsageError, match="another factor on each side"):
        settings_from_a1111(text.replace("1024x1536", "1024x1024"), "x.png")


# ---------------------------------------------------------------- Prompt S/R


def test_prompt_sr_parsing():
    from diffcli.sweep import parse_prompt_sr

    assert parse_prompt_sr('red, green,"dark, blue"') == ("red", "green", "dark, blue")


def test_prompt_sr_sweeps_with_grid(cli, tiny_model):
    result = cli("txt2img", "a red cat", "--model", tiny_model, "--seed", "2", "--prompt-sr", 'red,green,"dark, blue"',
                 "--cfg", "3,7", "-o", "sr/{slug}-{cfg}.png", "--grid", "--json", "--quiet", *FAST)
    assert result.exit_code == 0, result.stderr
    *images, sheet = result.json_lines()
    assert [(r["prompt"], r["cfg"]) for r in images] == [(p, c) for p in ("a red cat", "a green cat", "a dark, blue cat")
                                                         for c in (3.0, 7.0)]
    assert [Path(r["path"]).name for r in images][:3] == ["a-red-cat-3.png", "a-red-cat-7.png", "a-green-cat-3.png"]
    assert read_metadata(images[2]["path"])["prompt_sr"] == "green"
    assert (sheet["x"], sheet["y"], sheet["columns"], sheet["rows"]) == ("prompt_sr", ["cfg"], ["red", "green", "dark, blue"],
                                                                          ["cfg 3", "cfg 7"])
    assert Path(sheet["grid"]).is_file()


def test_prompt_sr_needs_its_first_word_in_the_prompt(cli, tiny_model):
    result = cli("txt2img", "a red cat", "--model", tiny_model, "--prompt-sr", "purple,green", *FAST)
    assert result.exit_code == 2 and "--prompt-sr: 'purple' is not in the prompt" in result.stderr
    assert not Path("outputs").exists()


# ---------------------------------------------------------------- loading line


@pytest.mark.parametrize("quiet", [False, True])
def test_model_loading_is_reported(cli, tiny_model, monkeypatch, quiet):
    from diffcli import pipeline

    monkeypatch.setattr(pipeline, "_CACHE", {})  # a fresh process: the model really loads
    result = cli("txt2img", "a", "--model", tiny_model, *FAST, *(["--quiet"] if quiet else []))
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    if quiet:
        assert result.stderr == ""
    else:
        loading = lines.index(f"loading model {tiny_model}...")
        assert lines[loading + 1].startswith("loaded in ") and lines[loading + 1].endswith("s")
    cached = cli("txt2img", "a", "--model", tiny_model, *FAST)  # loaded already: nothing to report
    assert "loading model" not in cached.stderr


@pytest.mark.parametrize(("modes", "message"), [
    ((1,), "control_mode 1 is not available"),
    (("My prompt is more important",), "is not available"),
    ((0, 2), "control_mode must be the same for every unit"),
])
def test_controlnet_control_modes_diffusers_cannot_honour_are_refused(modes, message):
    from diffcli.errors import UsageError
    from diffcli.server.a1111 import controlnet_units

    body = {"alwayson_scripts": {"controlnet": {"args": [
        {"module": "canny", "model": "cn", "image": "x", "control_mode": mode} for mode in modes]}}}
    with pytest.raises(UsageError, match=message):
        controlnet_units(body)


def test_controlnet_guess_mode_for_every_unit_is_taken():
    from diffcli.server.a1111 import controlnet_units

    body = {"alwayson_scripts": {"controlnet": {"args": [
        {"module": "canny", "model": "cn", "image": "x", "control_mode": "ControlNet is more important"},
        {"module": "none", "model": "cn", "image": "x", "control_mode": 2}]}}}
    assert [unit.get("guess") for unit in controlnet_units(body)] == [True, True]
