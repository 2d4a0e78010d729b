"""Hostile input found at plan time: one line on stderr, exit 2, no model loaded (security issue, item 12)."""

from __future__ import annotations

import io
import json
import os
import struct
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffcli import checkpoints, weights
from diffcli.errors import ModelError

LONG = "A" * 300  # one path component over the 255 bytes every common file system allows


@pytest.fixture(autouse=True)
def no_run(monkeypatch):
    """Planning only: a job that gets past planning is recorded here, never run (no model loads)."""
    from diffcli import run as generate

    runs = []
    monkeypatch.setattr(generate, "run_plans", lambda plans, *args, **kwargs: runs.extend(plans))
    return runs


@pytest.fixture
def picture(tmp_path) -> str:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    return "in.png"


def refused(result, *names: str) -> None:
    """Exit 2 with one `diffcli: error:` line naming each of `names`, and no traceback in disguise."""
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("diffcli: error:")]
    assert len(error) == 1, result.stderr
    for name in names:
        assert name in error[0], (name, error[0])


# -- file names the OS refuses ------------------------------------------------------------------------

@pytest.mark.parametrize("args, flag", [
    (["txt2img", "a", "-o", f"{LONG}.png"], "--out"),
    (["txt2img", "a", "-o", f"{LONG}/x.png"], "--out"),
    (["img2img", f"{LONG}.png", "a"], "INPUT"),
    (["inpaint", "in.png", "a", "--mask", f"{LONG}.png"], "--mask"),
    (["txt2img", "a", "--model", f"{LONG}.safetensors"], "--model"),
    (["txt2img", "a", "--model", f"./{LONG}"], "--model"),
    (["txt2img", "a", "--lora", f"{LONG}.safetensors"], "--lora"),
    (["txt2img", "a", "--embedding", f"{LONG}.safetensors"], "--embedding"),
    (["txt2img", "a", "--embedding-dir", LONG], "--embedding-dir"),
    (["txt2img", "a <lora:x>", "--lora-dir", LONG], "--lora-dir"),
    (["txt2img", "a", "--refiner", f"./{LONG}"], "--refiner"),
    (["batch", f"{LONG}.txt", "--dry-run"], LONG[:20]),
    (["batch", "p.txt", "--manifest", f"{LONG}.jsonl"], "--manifest"),
    (["batch", "p.txt", "--wildcards", LONG, "--dry-run"], "--wildcards"),
    (["batch", "p.txt", "-o", f"{LONG}/", "--dry-run"], "--out"),
])
def test_file_name_too_long_names_the_flag(cli, picture, args, flag):
    Path("p.txt").write_text("a {x|y}\n")
    refused(cli(*args), flag)


@pytest.mark.parametrize("flag", ["-o", "--model", "--lora"])
def test_nul_in_a_path_names_the_flag(cli, flag):
    refused(cli("txt2img", "a", flag, "x\x00y.png"), flag if flag != "-o" else "--out")


# -- malformed safetensors headers -----------------------------------------------------------------------

def safetensors_bytes(header, payload: bytes = b"\0" * 16) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


F32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
MALFORMED = {
    "entry not an object": ({"w": 5}, "not an object"),
    "entry a list": ({"w": [0, 16]}, "not an object"),
    "no data_offsets": ({"w": {"dtype": "F32", "shape": [4]}}, "data_offsets"),
    "no dtype": ({"w": {"shape": [4], "data_offsets": [0, 16]}}, "dtype"),
    "negative offset": ({"w": dict(F32, data_offsets=[0, -16])}, "data_offsets"),
    "offsets reversed": ({"w": dict(F32, data_offsets=[16, 0])}, "data_offsets"),
    "offsets not numbers": ({"w": dict(F32, data_offsets=["0", "16"])}, "data_offsets"),
    "three offsets": ({"w": dict(F32, data_offsets=[0, 8, 16])}, "data_offsets"),
    "float offsets": ({"w": dict(F32, data_offsets=[0.0, 16.0])}, "data_offsets"),
    "bool offsets": ({"w": dict(F32, data_offsets=[False, True])}, "data_offsets"),
    "offset past the shape": ({"w": dict(F32, data_offsets=[0, 10**30])}, "data_offsets"),
    "data past the end": ({"w": dict(F32, shape=[2**40], data_offsets=[0, 2**42])}, "truncated"),
    "shape a string": ({"w": dict(F32, shape="4")}, "shape"),
    "shape an object": ({"w": dict(F32, shape={"a": 1})}, "shape"),
    "negative dimension": ({"w": dict(F32, shape=[-4])}, "shape"),
    "shape and offsets disagree": ({"w": dict(F32, shape=[2, 4])}, "shape"),
    "dtype not a string": ({"w": dict(F32, dtype=5)}, "dtype"),
    "metadata a list": ({"__metadata__": [1], "w": F32}, "__metadata__"),
    "metadata values not strings": ({"__metadata__": {"a": {"b": 1}}, "w": F32}, "__metadata__"),
    "deep nesting": (b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not a safetensors file"),
    "huge integer": (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 16]}}', "not a safetensors file"),
}


@pytest.mark.parametrize("header, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_is_a_model_error(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header))
    with pytest.raises(ModelError, match=message):
        weights.read_safetensors_header(path)


def test_well_formed_header_passes(tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(safetensors_bytes({"__metadata__": {"k": "v"}, "w": F32, "b": {"dtype": "BF16", "shape": [], "data_offsets": [16, 18]}}, b"\0" * 18))
    assert weights.read_safetensors_header(path)["w"]["shape"] == [4]


@pytest.mark.parametrize("flag", ["--model", "--lora", "--embedding"])
@pytest.mark.parametrize("header", [MALFORMED["entry not an object"][0], MALFORMED["no data_offsets"][0],
                                    MALFORMED["shape a string"][0], MALFORMED["negative offset"][0]])
def test_malformed_weight_file_is_refused_at_plan_time(cli, no_run, flag, header):
    Path("bad.safetensors").write_bytes(safetensors_bytes(header))
    refused(cli("txt2img", "a", flag, "bad.safetensors"), "bad.safetensors")
    assert not no_run


def test_checkpoint_with_short_shapes_is_refused(cli, tmp_path):
    """A well-formed header whose UNet tensors have too few dimensions is a ModelError, not an IndexError."""
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x", "first_stage_model.x",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    header = {key: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, key in enumerate(keys)}
    Path("short.safetensors").write_bytes(safetensors_bytes(header))
    refused(cli("txt2img", "a", "--model", "short.safetensors"), "--model")


# -- seeds and sizes out of range -------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--variation-seed", str(2**64), "--variation-strength", "0.5"], "--variation-seed must be between 0 and"),
    (["--variation-seed", str(2**63 - 1), "--variation-strength", "0.5", "-N", "2"], "--variation-seed must be between 0 and"),
    (["--variation-seed", "1", "--variation-strength", "nan"], "--variation-strength"),
    (["--seed", str(2**64)], "--seed must be between 0 and"),
    (["-N", "99999999999999999999"], "--num-images must be at most 100000"),
    (["-N", "100001"], "--num-images"),
])
def test_seed_like_values_out_of_range_give_the_range(cli, args, message):
    refused(cli("txt2img", "a", *args), message)


def test_eval_seed_out_of_range(cli):
    refused(cli("eval", "--seed", str(2**64)), "--seed")


def test_outpaint_extend_is_checked_against_the_size_cap_before_allocating(cli, picture, monkeypatch):
    import numpy as np

    def no_pad(*args, **kwargs):
        raise AssertionError("np.pad ran before the size check")

    monkeypatch.setattr(np, "pad", no_pad)
    for extend in ("all=99999999", "all=9000", "left=8200", "right=" + "9" * 5000):
        result = cli("outpaint", picture, "a", "--extend", extend)
        refused(result, "--extend", "8192")
        assert "--width" not in result.stderr


@pytest.mark.parametrize("feather", [str(2**63), "99999999999999999999", "-1"])
def test_outpaint_feather_out_of_range(cli, picture, feather):
    refused(cli("outpaint", picture, "a", "--feather", feather), "--feather")


# -- NUL characters in prompts -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, name", [(["a\x00b"], "PROMPT"), (["a", "--negative", "x\x00"], "--negative")])
def test_nul_in_a_command_line_prompt(cli, args, name):
    refused(cli("txt2img", *args), name, "NUL")


def test_nul_in_a_jobs_file_prompt(cli):
    Path("j.jsonl").write_text('{"prompt": "a\\u0000b"}\n')
    refused(cli("batch", "j.jsonl", "--dry-run"), "line 1", "NUL")


# -- the manifest and stdin ----------------------------------------------------------------------------------

def test_manifest_naming_a_folder(cli, no_run):
    Path("p.txt").write_text("a\n")
    Path("records").mkdir()
    refused(cli("batch", "p.txt", "--manifest", "records"), "--manifest", "folder")
    assert not no_run


def test_manifest_in_a_read_only_place(cli, no_run, monkeypatch):
    Path("p.txt").write_text("a\n")
    Path("notes.txt").write_text("")
    refused(cli("batch", "p.txt", "--manifest", "notes.txt/m.jsonl"), "--manifest")
    Path("locked").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if "locked" in str(path) else real(path, mode, **kw))
    refused(cli("batch", "p.txt", "--manifest", "locked/m.jsonl"), "--manifest", "not writable")
    Path("locked/m.jsonl").write_text("")
    refused(cli("batch", "p.txt", "--manifest", "locked/m.jsonl"), "--manifest", "not writable")
    assert not no_run


class BrokenStdin(io.StringIO):
    def read(self, *args):
        raise OSError(9, "Bad file descriptor")


@pytest.mark.parametrize("stdin", [None, BrokenStdin(), io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8")])
def test_batch_with_stdin_closed_or_unreadable(cli, monkeypatch, stdin):
    monkeypatch.setattr(sys, "stdin", stdin)
    refused(cli("batch", "-", "--dry-run"), "stdin")


@pytest.mark.slow  # starts a process
def test_batch_dash_with_stdin_closed_in_a_real_process(tmp_path):
    """`diffcli batch - <&-`: Python starts with sys.stdin None."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", "import os, sys; os.close(0); os.execv(sys.executable, "
                             "[sys.executable, '-m', 'diffcli', 'batch', '-', '--dry-run'])"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "no jobs on stdin" in result.stderr and "unexpected" not in result.stderr, result.stderr


# -- non-finite weights and scales ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, name", [
    ([f"(x:{'9' * 400})"], "PROMPT"),  # a weight is digits (A1111's grammar); 400 of them overflow to inf
    ([f"((x:{'9' * 300}):{'9' * 300})"], "PROMPT"),
    (["(" * 8000 + "x"], "PROMPT"),  # 1.1 ** 8000
    (["a", "--negative", f"(x:{'9' * 400})"], "--negative"),
    (["a <lora:style:nan>", "--lora-dir", "."], "<lora:style:nan>"),
    (["a <lora:style:inf>", "--lora-dir", "."], "<lora:style:inf>"),
    (["a <lora:style:1e400>", "--lora-dir", "."], "<lora:style:1e400>"),
    (["a", "--lora", "style.safetensors:inf"], "--lora"),
    (["a", "--lora", "style.safetensors:nan"], "--lora"),
    (["a", "--lora", "style.safetensors:-1e999"], "--lora"),
])
def test_non_finite_weight_or_scale(cli, no_run, args, name):
    Path("style.safetensors").write_bytes(safetensors_bytes({"w": F32}))
    refused(cli("txt2img", *args), name, "finite")
    assert not no_run


@pytest.mark.parametrize("token", ["a b", "x\ty", "\u202e", "t" * 101])
def test_embedding_token_must_be_one_word(cli, no_run, token):
    Path("emb.safetensors").write_bytes(safetensors_bytes({"w": F32}))
    refused(cli("txt2img", "a", "--embedding", f"emb.safetensors:{token}"), "--embedding", "one printable word")
    assert not no_run


def test_embedding_takes_no_scale(cli, no_run):
    """FILE[:TOKEN]: `:inf` names the token `inf`, it scales nothing."""
    Path("emb.safetensors").write_bytes(safetensors_bytes({"w": F32}))
    assert cli("txt2img", "inf", "--embedding", "emb.safetensors:inf", "-q").exit_code == 0
    assert no_run[0].adapters.embeddings == (("emb.safetensors", "inf"),)


@pytest.mark.parametrize("prompt", ["(x:nan)", "(x:inf)", "(x:1e400)"])
def test_weights_in_other_spellings_are_text(cli, no_run, prompt):
    """A weight is digits in A1111's grammar: `(x:nan)` or `(x:1e400)` is the text `x:nan` weighted 1.1, no error."""
    from diffcli.prompts import parse_weights

    assert parse_weights(prompt) == [(prompt[1:-1], pytest.approx(1.1))]
    assert cli("txt2img", prompt, "-q").exit_code == 0 and len(no_run) == 1


# -- jobs-file values of the wrong type ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('{"prompt": {"a": 1}}', "line 1: prompt must be a string"),
    ('{"prompt": ["a", "b"]}', "line 1: prompt must be a string"),
    ('{"prompt": 5}', "line 1: prompt must be a string"),
    ('{"prompt": true}', "line 1: prompt must be a string"),
    ('{"prompt": "a", "negative": {"x": 1}}', "line 1: negative must be a string"),
    ('{"prompt": "a", "negative": 7}', "line 1: negative must be a string"),
    ('{"prompt": "a", "lora": {"x": 1}}', "line 1: lora must be a string"),
    ('{"prompt": "a", "lora": [["x"]]}', "line 1: lora must be a string"),
    ('{"prompt": "a", "out": ["x.png"]}', "line 1: out must be a string"),
])
def test_jsonl_values_of_the_wrong_type(cli, line, message):
    Path("j.jsonl").write_text(line + "\n")
    refused(cli("batch", "j.jsonl", "--dry-run"), message)


def test_jsonl_numbers_for_number_keys_still_work(cli):
    Path("j.jsonl").write_text('{"prompt": "a", "cfg": 3, "steps": 4, "seed": 9, "width": 64}\n')
    result = cli("batch", "j.jsonl", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert [(r["cfg"], r["steps"], r["seeds"], r["width"]) for r in result.json_lines()] == [(3.0, 4, [9], 64)]


# -- sweeps get the size cap templates have ---------------------------------------------------------------------

def commas(n: int, start: int = 1) -> str:
    return ",".join(str(i) for i in range(start, start + n))


@pytest.mark.parametrize("args", [
    ["--seed", commas(400), "--cfg", commas(20), "--steps", commas(20)],  # 160 000 combinations
    ["--seed", commas(1000), "-N", "101"],
    ["--scheduler", ",".join(["euler"] * 11), "-N", "10000"],
])
def test_sweep_over_the_cap(cli, no_run, args):
    refused(cli("txt2img", "a", *args), "100000")
    assert not no_run


def test_sweep_at_the_cap_is_planned(cli, no_run, monkeypatch):
    from diffcli import sweep

    monkeypatch.setattr(sweep, "MAX_IMAGES", 12)
    assert cli("txt2img", "a", "--seed", "1,2,3", "--cfg", "1,2", "-N", "2", "-q").exit_code == 0
    assert len(no_run) == 6
    refused(cli("txt2img", "a", "--seed", "1,2,3", "--cfg", "1,2", "-N", "3"), "18", "12")


# -- output names ---------------------------------------------------------------------------------------------

def test_dangling_symlink_at_the_output_name(cli, no_run, tmp_path):
    os.symlink(tmp_path / "missing" / "target.png", "link.png")
    refused(cli("txt2img", "a", "-o", "link.png"), "link.png")
    assert not no_run
    assert cli("txt2img", "a", "-o", "link.png", "--overwrite", "-q").exit_code == 0 and len(no_run) == 1


def test_overwrite_replaces_a_dangling_symlink_instead_of_following_it(tmp_path):
    from diffcli.output import write_atomic

    target = tmp_path / "elsewhere.png"
    os.symlink(target, tmp_path / "link.png")
    write_atomic(tmp_path / "link.png", b"data", overwrite=True)
    assert not (tmp_path / "link.png").is_symlink() and (tmp_path / "link.png").read_bytes() == b"data"
    assert not target.exists()


# -- --strength against the model's default steps ----------------------------------------------------------------

@pytest.mark.parametrize("task", ["img2img", "inpaint", "outpaint"])
def test_strength_against_default_steps_at_plan_time(cli, no_run, picture, task):
    """tiny-shapes runs 14 steps by default: --strength 0.05 is 0.7 of a step."""
    extra = ["--mask", "mask.png"] if task == "inpaint" else []
    refused(cli(task, picture, "a", "--strength", "0.05", *extra), "--strength", "14")
    assert not no_run
    assert cli(task, picture, "a", "--strength", "0.05", "--steps", "20", "-q", *extra).exit_code == 0


def test_strength_against_the_schedulers_default_steps(cli, no_run, tiny_model, picture):
    """A model without recommendations runs its scheduler's default steps: DDIM 50, LCM 4."""
    refused(cli("img2img", picture, "a", "--model", tiny_model, "--strength", "0.01"), "--strength", "50")
    refused(cli("img2img", picture, "a", "--model", tiny_model, "--strength", "0.2", "--scheduler", "lcm"), "--strength", "4")
    assert not no_run
    assert cli("img2img", picture, "a", "--model", tiny_model, "--strength", "0.03", "-q").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--tile", str(2**64)], "--tile must be at most 8192"),  # a multiple of 8 whose tile/8 overlap no array holds
    (["--tile", "64", "--tile-overlap", str(2**64)], "--tile-overlap"),
])
def test_upscale_tile_out_of_range(cli, no_run, picture, args, message):
    refused(cli("upscale", picture, *args), message)
    assert not no_run


@pytest.mark.parametrize("args, message", [
    (["--hires", "2", "--hires-steps", str(2**64)], "--hires-steps must be between 1 and 1000"),
    (["--hires", "4", "--width", "4096"], "over the 8192 px size limit"),  # the second pass: 16384 px wide
])
def test_hires_out_of_range(cli, no_run, args, message):
    refused(cli("txt2img", "a", *args), message)
    assert not no_run


@pytest.mark.parametrize(("args", "flag"), [(["--refiner", "nope/x.safetensors"], "--refiner"),
                                           (["--hires", "2", "--hires-upscaler", "x4", "--hires-upscaler-model",
                                             "nope/x.safetensors"], "--hires-upscaler-model")])
def test_a_second_models_error_names_its_own_flag(cli, no_run, args, flag):
    refused(cli("txt2img", "a", *args), f"{flag} 'nope/x.safetensors': no such file or folder")
