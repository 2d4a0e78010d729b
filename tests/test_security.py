"""Hostile weight files and jobs files: no file runs code, trust comes from the command line only,
a rerun never passes off an image made with other settings, prompt tags stay inside their folders."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from diffcli import weights
from diffcli.errors import ModelError
from diffcli.output import read_metadata

FAST = ("--steps", "2", "--quiet", "--seed", "3")
SUFFIXES = (".safetensors", ".SAFETENSORS", ".SafeTensors", ".ckpt", ".CKPT", ".pt", ".pth", ".bin", ".BIN")


class RunsCode:
    """Unpickling this creates a folder: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def hostile(path: Path, marker: Path, how: str) -> Path:
    """A pickle that runs code when unpickled freely: torch's zip format or a raw pickle."""
    import torch

    payload = {"emb_params": RunsCode(str(marker))}
    if how == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a weight file ran code"


# -- the one format decision --------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("how", ["zip", "raw"])
def test_format_comes_from_the_bytes_never_the_name(tmp_path, marker, suffix, how):
    path = hostile(tmp_path / f"w{suffix}", marker, how)
    assert weights.file_format(path) == weights.PICKLE
    with pytest.raises(ModelError, match="is a pickle file"):
        weights.check(path, "--lora", allow_pickle=False)
    with pytest.raises(ModelError, match="needs more than tensors"):
        weights.load_state_dict(path, "--lora", allow_pickle=True)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_safetensors_file_is_safetensors_under_any_name(tmp_path, suffix):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / f"w{suffix}"
    save_file({"x": torch.ones(2)}, str(path))
    assert weights.file_format(path) == weights.SAFETENSORS
    assert weights.load_state_dict(path, "--lora", allow_pickle=False)["x"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"GIF89a" + b"\0" * 40, "not a weight file"),
    (b"\x80", "not a weight file"),  # one byte: too short to be anything
    (b"\x80\x02", "cannot be read as a PyTorch checkpoint"),  # a pickle cut short
    (b"PK\x03\x04" + b"\0" * 40, "cannot be read as a PyTorch checkpoint"),  # a zip cut short
    (b"version https://git-lfs.github.com/spec/v1\noid x\n", "git-lfs pointer"),
    (b"\xff" * 8 + b"{" + b"\0" * 40, "not a safetensors file"),  # a header length past any limit
])
def test_unknown_or_broken_bytes_are_refused(tmp_path, content, message):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        weights.load_state_dict(path, "--lora", allow_pickle=True)


def test_a_pickle_of_tensors_loads_when_allowed(tmp_path):
    import torch

    path = tmp_path / "w.SAFETENSORS"
    torch.save({"x": torch.ones(3)}, path)
    assert weights.load_state_dict(path, "--lora", allow_pickle=True)["x"].sum() == 3
    with pytest.raises(ModelError, match="opens no weight file"), weights.no_payloads():
        weights.load_state_dict(path, "--lora", allow_pickle=True)


# -- every way in, through the CLI -------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".SAFETENSORS", ".safetensors", ".pt", ".Bin"])
@pytest.mark.parametrize("allow", [False, True])
def test_embedding_files_never_run_code(cli, tiny_model, tmp_path, marker, suffix, allow):
    folder = tmp_path / "embs"
    folder.mkdir()
    emb = hostile(folder / f"emb{suffix}", marker, "zip")
    trust = ["--allow-pickle"] if allow else []
    for args in (["--embedding", emb], ["--embedding-dir", folder]):
        result = cli("txt2img", "a emb cat", "--model", tiny_model, *FAST, *args, *trust, "-o", "x.png")
        assert result.exit_code == 2, result.stderr
        assert ("needs more than tensors" if allow else "is a pickle file") in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("allow", [False, True])
def test_lora_files_and_lora_dir_tags_never_run_code(cli, tiny_model, tmp_path, marker, allow):
    folder = tmp_path / "loras"
    folder.mkdir()
    lora = hostile(folder / "evil.SAFETENSORS", marker, "zip")
    trust = ["--allow-pickle"] if allow else []
    for prompt, args in (("a cat", ["--lora", lora]), ("a cat <lora:evil:1>", ["--lora-dir", folder])):
        result = cli("txt2img", prompt, "--model", tiny_model, *FAST, *args, *trust, "-o", "x.png")
        assert result.exit_code == 2, result.stderr
        assert ("needs more than tensors" if allow else "is a pickle file") in result.stderr


@pytest.mark.parametrize("suffix", [".safetensors", ".Safetensors", ".ckpt"])
@pytest.mark.parametrize("allow", [False, True])
def test_single_file_models_and_refiners_never_run_code(cli, tmp_path, marker, suffix, allow):
    model = hostile(tmp_path / f"model{suffix}", marker, "zip")
    trust = ["--allow-pickle"] if allow else []
    for args in (["--model", model], ["--refiner", model], ["--hires", "2", "--hires-upscaler", "x4",
                                                            "--hires-upscaler-model", model]):
        result = cli("txt2img", "a cat", *FAST, *args, *trust, "-o", "x.png")
        assert result.exit_code == 2, result.stderr
        assert ("needs more than tensors" if allow else "is a pickle file") in result.stderr
    from PIL import Image

    Image.new("RGB", (32, 32)).save("in.png")
    upscaled = cli("upscale", "in.png", "--model", model, *trust)
    assert upscaled.exit_code == 2 and ("needs more than tensors" if allow else "is a pickle file") in upscaled.stderr


def test_model_folder_with_a_pickle_named_safetensors_is_refused(cli, tiny_model, tmp_path, marker):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    hostile(folder / "vae" / "diffusion_pytorch_model.safetensors", marker, "raw")
    result = cli("txt2img", "a cat", "--model", folder, *FAST)
    assert result.exit_code == 2 and "is a pickle file" in result.stderr


def test_a_jobs_file_cannot_grant_itself_trust(cli, tmp_path, marker):
    model = hostile(tmp_path / "x.ckpt", marker, "zip")
    for key in ("allow_pickle", "allow-pickle", "--allow-pickle"):
        Path("jobs.jsonl").write_text(json.dumps({"prompt": "a", "model": str(model), key: True}) + "\n")
        for dry in ([], ["--dry-run"]):
            result = cli("batch", "jobs.jsonl", "--seed", "1", *dry)
            assert result.exit_code == 2 and "command line only" in result.stderr, result.stderr
    Path("jobs.csv").write_text(f"prompt,model,allow_pickle\na,{model},true\n")
    assert "command line only" in cli("batch", "jobs.csv", "--seed", "1", "--dry-run").stderr


def test_dry_run_opens_no_pickle_even_when_trusted(cli, tmp_path, marker):
    model = hostile(tmp_path / "x.ckpt", marker, "zip")
    Path("jobs.jsonl").write_text(json.dumps({"prompt": "a", "model": str(model)}) + "\n")
    result = cli("batch", "jobs.jsonl", "--seed", "1", "--dry-run", "--allow-pickle")
    assert result.exit_code == 2 and "--dry-run opens no weight file" in result.stderr


def test_an_allowed_pickle_of_tensors_works_end_to_end(cli, tiny_model, tiny_embedding, tmp_path):
    import torch
    from safetensors.torch import load_file

    emb = tmp_path / "mystyle.pt"
    torch.save(load_file(tiny_embedding), emb)
    base = ("a mystyle cat", "--model", tiny_model, *FAST)
    assert "is a pickle file" in cli("txt2img", *base, "--embedding", emb, "-o", "a.png").stderr
    result = cli("txt2img", *base, "--embedding", emb, "--allow-pickle", "-o", "b.png")
    assert result.exit_code == 0, result.stderr
    assert read_metadata("b.png")["embedding"] == "mystyle"


@pytest.mark.parametrize("name", ["../outside", "../loras2/other", "/etc/passwd", "sub/../../outside"])
def test_prompt_tags_stay_inside_the_lora_dir(cli, tiny_model, tiny_lora, tmp_path, name):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(tiny_lora, tmp_path / "outside.safetensors")
    (tmp_path / "loras2").mkdir()
    shutil.copy(tiny_lora, tmp_path / "loras2" / "other.safetensors")
    result = cli("txt2img", f"a cat <lora:{name}:1>", "--model", tiny_model, *FAST, "--lora-dir", folder)
    assert result.exit_code == 2 and "outside --lora-dir" in result.stderr, result.stderr


# -- identity: a rerun never passes off an image made with other settings ----------------------------

def test_a_rerun_with_other_settings_does_not_adopt_the_old_images(cli, tiny_model):
    Path("p.txt").write_text("a red cat\na blue dog\n")
    base = ("batch", "p.txt", "--model", tiny_model, "--seed", "5", "-o", "runs/", "--quiet")
    first = cli(*base, "--steps", "2", "--json")
    assert first.exit_code == 0, first.stderr
    records = first.json_lines()
    assert all(read_metadata(r["path"])["id"] == r["id"] for r in records)
    Path("runs/diffcli-manifest.jsonl").unlink()  # as if a run had saved them, then died before recording
    other = cli(*base, "--steps", "3", "--scheduler", "ddim")
    assert other.exit_code == 2 and "made with other settings" in other.stderr, other.stderr
    same = cli(*base, "--steps", "2")
    assert same.exit_code == 0 and same.stdout == ""  # adopted: the files' own ids match these settings
    again = cli(*base, "--steps", "3", "--scheduler", "ddim")
    assert again.exit_code == 2 and "made with other settings" in again.stderr
    forced = cli(*base, "--steps", "3", "--scheduler", "ddim", "--force", "--json")
    assert forced.exit_code == 0, forced.stderr
    made = forced.json_lines()
    assert len(made) == 2 and {r["id"] for r in made}.isdisjoint({r["id"] for r in records})
    assert all(read_metadata(r["path"])["steps"] == 3 for r in made)


@pytest.mark.parametrize("change", [["--cfg", "4"], ["--negative", "x"], ["--width", "48"], ["--dtype", "bf16"],
                                    ["--lora", "{lora}:0.5"], ["--clip-skip", "2"]])
def test_the_id_covers_every_setting_that_changes_pixels(cli, tiny_model, tiny_lora, change):
    Path("p.txt").write_text("a red cat\n")
    base = ("batch", "p.txt", "--model", tiny_model, "--seed", "5", "--steps", "2", "--dry-run")
    plain = cli(*base).json_lines()[0]["ids"]
    changed = cli(*base, *[c.format(lora=tiny_lora) for c in change]).json_lines()
    assert changed and changed[0]["ids"] != plain


def test_the_id_covers_the_model_weights(cli, tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    Path("p.txt").write_text("a red cat\n")
    base = ("batch", "p.txt", "--model", copy, "--seed", "5", "--steps", "2", "--dry-run")
    before = cli(*base).json_lines()[0]["ids"]
    unet = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(unet.read_bytes())
    data[-1] ^= 1
    unet.write_bytes(bytes(data))
    assert cli(*base).json_lines()[0]["ids"] != before
