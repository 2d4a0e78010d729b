"""Where images land: field values never make folders or escapes, stdout only for one image, no lost work, modes.

Runs use the bundled model at 2 steps (no fixture to build); `--quiet` keeps stderr for errors only.
"""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffcli import batch, output

RUN = ("--steps", "2", "--seed", "1", "--quiet")


def tree(root: Path) -> set[str]:
    """Every file and folder under root (relative), the diffcli home left out."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".diffcli-home" not in p.parts}


# ---------------------------------------------------------------- 5: field values stay inside the output folder


@pytest.mark.parametrize("prompt", ["../../escaped", "/etc/cron.d/x", "a\\b/../c", "..", ".hidden cat"])
def test_prompt_field_never_leaves_the_output_folder(cli, isolated, prompt):
    result = cli("txt2img", prompt, *RUN, "-o", "out/sub/{prompt}.png")
    assert result.exit_code == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == Path("out/sub")  # the template's own folders, none from the value
    assert not path.name.startswith(".")
    assert tree(isolated) == {"out", "out/sub", f"out/sub/{path.name}"}


def test_escape_and_control_characters_never_reach_a_name_or_stdout(cli, isolated):
    result = cli("txt2img", "red\x1b[31m car\x07\x9b2J\u202eevil", *RUN, "-o", "out/{prompt}-{slug}.png")
    if result.exit_code == 2:  # the prompt itself refused is fine too, as long as nothing was written
        assert result.stderr.startswith("diffcli: error:") and len(result.stderr.splitlines()) == 1
        assert tree(isolated) == set()
        return
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout[:-1].isprintable()  # no escapes for the terminal
    path = Path(result.stdout.strip())
    assert path.parent == Path("out") and "\x1b" not in path.name and "\u202e" not in path.name


def test_template_with_control_characters_is_refused(cli, isolated):
    result = cli("txt2img", "a cat", *RUN, "-o", "out/\x1b[2J{seed}.png")
    assert result.exit_code == 2
    assert result.stderr.startswith("diffcli: error: --out") and "control characters" in result.stderr
    assert tree(isolated) == set()


def test_long_prompt_is_cut_to_a_name_that_fits(cli, isolated):
    result = cli("txt2img", "\U0001f697" * 80, *RUN, "-o", "out/{prompt}.png")  # 320 bytes of prompt[:80]
    assert result.exit_code == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.is_file() and len(os.fsencode(path.name)) <= output.NAME_MAX - output.PART_EXTRA


def test_name_over_the_filesystem_limit_is_a_usage_error_before_the_model(cli, isolated):
    result = cli("txt2img", "a" * 80, *RUN, "-o", "out/{prompt}{prompt}{prompt}{prompt}.png")
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and "bytes, over" in result.stderr
    assert tree(isolated) == set()


def test_batch_fields_are_made_safe_too(cli, isolated):
    lines = [{"prompt": "../../up"}, {"prompt": "/abs/x"}, {"prompt": "..."}]
    Path("jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = cli("batch", "jobs.jsonl", "--dry-run", "-o", "out/{job}-{prompt}.png")
    assert result.exit_code == 0, result.stderr
    paths = [Path(p) for record in result.json_lines() for p in record["paths"]]
    assert len(paths) == 3 and all(p.parent == Path("out") for p in paths), paths
    assert tree(isolated) == {"jobs.jsonl"}


# ---------------------------------------------------------------- 6: stdout takes one image only


def test_stdout_with_a_sweep_is_refused(cli, isolated):
    result = cli("txt2img", "a cat", *RUN, "--cfg", "3,5", "-o", "-")
    assert result.exit_code == 2
    assert result.stderr.startswith("diffcli: error: --out - writes one image to stdout, got a sweep of 2")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert tree(isolated) == set()  # no folder named '-'


@pytest.mark.parametrize("how", ["flag", "env"])
def test_stdout_for_a_batch_is_refused(cli, isolated, monkeypatch, how):
    Path("jobs.txt").write_text("a cat\n")
    if how == "env":
        monkeypatch.setenv("DIFFCLI_OUTPUT", "-")
    result = cli("batch", "jobs.txt", "--steps", "2", *(["-o", "-"] if how == "flag" else []))
    assert result.exit_code == 2
    assert result.stderr.startswith("diffcli: error: batch --out - (stdout") and len(result.stderr.splitlines()) == 1
    assert tree(isolated) == {"jobs.txt"}


# ---------------------------------------------------------------- 7: stdin jobs for --processes


def test_stdin_jobs_for_processes_go_to_a_new_file_of_their_own(cli, isolated, monkeypatch):
    Path("outputs").mkdir()
    for name in ("diffcli-stdin-jobs.txt", "keep.txt"):
        Path("outputs", name).write_text("someone else's file\n")
    seen = {}

    def fake_spawn(processes, argv, threads=None):  # the children would read the file named last
        source = Path(argv[-1])
        seen.update(source=source, text=source.read_text(), others=sorted(p.name for p in source.parent.iterdir()))
        return 0

    monkeypatch.setattr(batch, "spawn", fake_spawn)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat\na dog\n"))
    result = cli("batch", "-", "--processes", "2", "--steps", "2", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert seen["text"] == "a cat\na dog\n" and seen["source"].parent == Path("outputs")
    assert seen["source"].name.startswith("diffcli-stdin-jobs-") and seen["source"].suffix == ".txt"
    assert Path("outputs/diffcli-stdin-jobs.txt").read_text() == "someone else's file\n"
    assert not seen["source"].exists()  # removed once the children are done
    assert not [name for name in seen["others"] if name.endswith(".part")]


@pytest.mark.slow  # starts a process
def test_dry_run_of_stdin_jobs_with_processes_writes_nothing(isolated):
    from conftest import run_subprocess

    result = run_subprocess("batch", "-", "--processes", "2", "--dry-run", input="a cat\na dog\n", cwd=isolated)
    assert result.returncode == 0, result.stderr
    assert [record["prompt"] for record in map(json.loads, result.stdout.splitlines())] == ["a cat", "a dog"]
    assert tree(isolated) == set()


# ---------------------------------------------------------------- 8: a name taken meanwhile


def squat_planned_names(monkeypatch, taken: list[Path]):
    """Another run writes each planned name just before ours does (between plan and save)."""
    real = output.encode_image

    def encode_after_another_run(image, path, meta):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the other run's image")
        taken.append(path)
        return real(image, path, meta)

    monkeypatch.setattr(output, "encode_image", encode_after_another_run)


def test_index_name_taken_meanwhile_moves_to_the_next_free_number(cli, isolated, monkeypatch):
    taken = []
    squat_planned_names(monkeypatch, taken)
    result = cli("txt2img", "a cat", "--steps", "2", "--seed", "1", "-N", "2", "-o", "out/")
    assert result.exit_code == 0, result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    assert taken == [Path("out/00000-1-a-cat.png"), Path("out/00001-2-a-cat.png")]
    assert written == [Path("out/00001-1-a-cat.png"), Path("out/00002-2-a-cat.png")]
    assert Path("out/00000-1-a-cat.png").read_bytes() == b"the other run's image"
    assert output.read_metadata(written[1])["seed"] == 2 and "taken meanwhile" in result.stderr
    assert not [p for p in tree(isolated) if p.endswith(".part")]


def test_fixed_name_taken_meanwhile_still_fails(cli, isolated, monkeypatch):
    squat_planned_names(monkeypatch, [])
    result = cli("txt2img", "a cat", *RUN, "-o", "out/fixed.png")
    assert result.exit_code == 2
    assert result.stderr.strip() == "diffcli: error: out/fixed.png already exists (pass --overwrite to replace it)"
    assert Path("out/fixed.png").read_bytes() == b"the other run's image"
    assert tree(isolated) == {"out", "out/fixed.png"}


# ---------------------------------------------------------------- 9: the user's umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_images_get_the_mode_the_umask_gives(cli, isolated, umask, mode):
    old = os.umask(umask)
    try:
        result = cli("txt2img", "a cat", *RUN, "-o", "car.png")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    assert Path("car.png").stat().st_mode & 0o777 == mode


# ---------------------------------------------------------------- 10: .part files of a killed run


def test_stale_part_files_of_the_name_are_removed_fresh_and_others_kept(cli, isolated):
    Path("out").mkdir()
    stale, fresh, other = Path("out/.car.png.k1ll3d_9.part"), Path("out/.car.png.0123abcd.part"), Path("out/.bus.png.k1ll3d_9.part")
    for part in (stale, fresh, other):
        part.write_bytes(b"half an image")
    hour_ago = time.time() - 3600
    for part in (stale, other):
        os.utime(part, (hour_ago, hour_ago))
    os.utime(fresh, (output.STARTED + 1, output.STARTED + 1))  # made after this process started: maybe in flight
    result = cli("txt2img", "a cat", *RUN, "-o", "out/car.png")
    assert result.exit_code == 0, result.stderr
    assert not stale.exists() and fresh.exists() and other.exists()
    assert Path("out/car.png").is_file()


# ---------------------------------------------------------------- 13: closed stdout, unreachable Hub


@pytest.mark.slow
@pytest.mark.slow  # starts a process
def test_stdout_closed_by_its_reader_is_one_line_and_exit_1(isolated):
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the image is ready
    try:
        result = subprocess.run([sys.executable, "-m", "diffcli", "txt2img", "x", *RUN, "-o", "-"], stdout=write,
                                stderr=subprocess.PIPE, text=True, cwd=isolated, timeout=300)
    finally:
        os.close(write)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffcli: error: stdout closed"), result.stderr


def hub_unreachable_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return dict(env, HF_ENDPOINT="http://127.0.0.1:9", **extra)  # port 9 (discard): nothing listens


@pytest.mark.slow  # starts a process
def test_hub_id_without_network_fails_fast_with_one_line(isolated):
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "diffcli", "txt2img", "x", "--model", "owner/name", *RUN],
                            capture_output=True, text=True, cwd=isolated, env=hub_unreachable_env(), timeout=120)
    took = time.monotonic() - began
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffcli: error: --model 'owner/name' is not in the Hugging Face cache")
    assert "cannot be reached" in lines[0]
    assert took < 15  # the library's own retries took ~24 s; the rest is Python and torch imports
    assert tree(isolated) == set()


@pytest.mark.slow
@pytest.mark.slow  # starts a process
def test_cached_hub_model_without_network_runs_from_the_cache(isolated, hf_cache):
    from conftest import HUB_REPO

    result = subprocess.run([sys.executable, "-m", "diffcli", "txt2img", "x", "--model", HUB_REPO, *RUN, "-o", "x.png"],
                            capture_output=True, text=True, cwd=isolated, timeout=300,
                            env=hub_unreachable_env(HF_HUB_CACHE=str(hf_cache)))
    assert result.returncode == 0, result.stderr
    assert Path(isolated, "x.png").is_file()


@pytest.mark.parametrize("name", ["owner/na--me", "owner/x..y", "o/" + "x" * 100, "owner/repo.git", "owner/name-"])
def test_names_the_hub_would_refuse_are_not_taken_for_hub_ids(cli, name):
    """huggingface_hub's validate_repo_id refuses these (an unexpected HFValidationError before): exit 2."""
    result = cli("txt2img", "a cat", "--model", name)
    assert result.exit_code == 2 and "is not a bundled model, a local path or a Hub id" in result.stderr, result.stderr
