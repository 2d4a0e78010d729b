"""diffcli batch through the real CLI: formats, defaults, validation, templates, resume, signals, ranks."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffcli.batch import MANIFEST_NAME
from diffcli.output import read_metadata

FAST = ("--steps", "2")


def manifest_ids(folder="outputs") -> list[str]:
    lines = (Path(folder) / MANIFEST_NAME).read_text().splitlines()
    return [record["id"] for record in map(json.loads, lines) if "id" in record]


def images(folder="outputs") -> list[str]:
    return sorted(p.name for p in Path(folder).glob("*") if p.suffix == ".png")


def test_prompts_file_runs_once_then_resumes_to_nothing(cli, tiny_model):
    Path("p.txt").write_text("a red car\n# a comment\n\na blue boat\n")
    first = cli("batch", "p.txt", "--model", tiny_model, "--seed", "5", "--json", *FAST)
    assert first.exit_code == 0, first.stderr
    records = first.json_lines()
    assert [(r["prompt"], r["seed"], r["line"], r["job"]) for r in records] == [("a red car", 5, 1, 0), ("a blue boat", 6, 4, 1)]
    assert [Path(r["path"]).name for r in records] == ["00000-5-a-red-car.png", "00001-6-a-blue-boat.png"]
    assert manifest_ids() == [r["id"] for r in records]
    again = cli("batch", "p.txt", "--model", tiny_model, "--json", *FAST)  # no --seed: the recorded base seed
    assert again.exit_code == 0 and again.stdout == "" and "2 already made" in again.stderr
    assert images() == ["00000-5-a-red-car.png", "00001-6-a-blue-boat.png"] and len(manifest_ids()) == 2


def test_a_removed_line_never_leaves_another_lines_image_in_place(cli, tiny_model):
    """The lines after a removed one move onto their neighbours' paths: an id counts as made at its own path only, so
    the rerun refuses to keep (or silently pass off) an image made with other settings."""
    lines = ['{"prompt": "a cat", "seed": 5, "cfg": %d}' % cfg for cfg in (5, 7, 9)]
    Path("j.jsonl").write_text("\n".join(lines) + "\n")
    first = cli("batch", "j.jsonl", "--model", tiny_model, *FAST)
    assert first.exit_code == 0, first.stderr
    Path("j.jsonl").write_text("\n".join(lines[1:]) + "\n")
    again = cli("batch", "j.jsonl", "--model", tiny_model, *FAST)
    assert again.exit_code == 2 and "was made with other settings than this run's" in again.stderr, again.stderr
    forced = cli("batch", "j.jsonl", "--model", tiny_model, "--force", *FAST)
    assert forced.exit_code == 0, forced.stderr
    assert [read_metadata(Path("outputs") / name)["cfg"] for name in images()[:2]] == [7, 9]


def test_force_remakes_our_images_only_never_a_foreign_file_beside_them(cli, tiny_model):
    Path("j.jsonl").write_text('{"prompt": "a cat", "seed": 5, "cfg": 5}\n')
    assert cli("batch", "j.jsonl", "--model", tiny_model, *FAST).exit_code == 0
    Image.new("RGB", (8, 8)).save("outputs/00000-6-a-cat.png")  # not ours: no manifest record, no diffcli id
    Path("j.jsonl").write_text('{"prompt": "a cat", "seed": 5, "cfg": 7, "num-images": 2}\n')
    forced = cli("batch", "j.jsonl", "--model", tiny_model, "--force", *FAST)
    assert forced.exit_code == 2 and "00000-6-a-cat.png already exists and is not in the manifest" in forced.stderr
    assert Image.open("outputs/00000-6-a-cat.png").size == (8, 8)


def test_jsonl_lines_override_batch_defaults(cli, tiny_model):
    Path("j.jsonl").write_text(
        '{"prompt": "a cat", "cfg": 3, "seed": 9}\n'
        '{"prompt": "a dog", "num-images": 2, "out": "dogs/{seed}.png", "negative": "blurry"}\n'
        '{"prompt": "a fox", "command": "txt2img", "width": 32, "overwrite": false}\n'
    )
    result = cli("batch", "j.jsonl", "--model", tiny_model, "--cfg", "6", "--seed", "100", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.stderr
    got = [(r["prompt"], r["cfg"], r["seed"], r["negative"], r["width"], r["path"]) for r in result.json_lines()]
    assert got == [
        ("a cat", 3.0, 9, "", 64, "outputs/00000-9-a-cat.png"),  # seeds count images: 1 + 2 before the fox
        ("a dog", 6.0, 101, "blurry", 64, "dogs/101.png"),
        ("a dog", 6.0, 102, "blurry", 64, "dogs/102.png"),
        ("a fox", 6.0, 103, "", 32, "outputs/00002-103-a-fox.png"),
    ]
    assert Image.open("outputs/00002-103-a-fox.png").size == (32, 64)


def test_csv_and_stdin_formats_in_a_dry_run(cli, tiny_model, monkeypatch):
    import io

    Path("c.csv").write_text('prompt,cfg,seed\n"a, b",3,\nc,,5\n')
    csv_run = cli("batch", "c.csv", "--model", tiny_model, "--seed", "1", "--dry-run", "-o", "runs/")
    assert csv_run.exit_code == 0, csv_run.stderr
    assert [(r["prompt"], r["cfg"], r["seeds"], r["paths"]) for r in csv_run.json_lines()] == [
        ("a, b", 3.0, [1], ["runs/00000-1-a-b.png"]), ("c", 7.5, [5], ["runs/00001-5-c.png"])]
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "from stdin"}\n'))
    piped = cli("batch", "-", "--model", tiny_model, "--seed", "4", "--dry-run")
    assert [(r["prompt"], r["seeds"]) for r in piped.json_lines()] == [("from stdin", [4])]
    assert not Path("runs").exists() and not Path("outputs").exists()


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ('{"prompt": "ok"}\n{"prompt": "x", "cfgg": 2}\n', [], "line 2: unknown key 'cfgg' (did you mean 'cfg'?)"),
        ('{"prompt": "ok"}\n\n{"prompt": "x", "cfg": 200}\n', [], "line 3: --cfg must be between 0 and 100, got 200"),
        ('{"prompt": "x", "steps": "many"}\n', [], "line 1: Invalid value for '--steps'"),
        ('{"prompt": "x"\n', [], "line 1: not valid JSON"),
        ('["x"]\n', [], "line 1: expected a JSON object"),
        ('{"prompt": "x", "command": "paint"}\n', [], "line 1: command 'paint' cannot run in a batch"),
        ('{"prompt": ""}\n', [], "line 1: PROMPT is empty"),
        ('{"prompt": "x", "overwrite": "maybe"}\n', [], "line 1: --overwrite must be true or false, got 'maybe'"),
        ('{"prompt": "a", "out": "same.png"}\n{"prompt": "b", "out": "same.png"}\n', [], "line 2: writes same.png, as line 1 does"),
        ('{"prompt": "x", "scheduler": "nope"}\n', [], "line 1: --scheduler 'nope' is unknown"),
        ('{"prompt": "x"}\n', ["-o", "one.png"], "batch --out 'one.png' names one file"),
        ('{"prompt": "a __colour__"}\n', [], "line 1: __colour__ needs --wildcards DIR"),
    ],
)
def test_bad_lines_exit_2_naming_the_line_before_any_model_loads(cli, tiny_model, content, args, message):
    from diffcli import pipeline

    Path("bad.jsonl").write_text(content)
    loaded = dict(pipeline._CACHE)
    result = cli("batch", "bad.jsonl", "--model", tiny_model, *args, *FAST)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert pipeline._CACHE == loaded and not Path("outputs").exists()


def test_templates_and_wildcards_expand_into_stable_jobs(cli, tiny_model):
    Path("wc").mkdir()
    Path("wc/colour.txt").write_text("red\nblue\n")
    Path("t.txt").write_text("a __colour__ {cat|dog}\n50% off, # not a comment\n")
    args = ("batch", "t.txt", "--model", tiny_model, "--wildcards", "wc", "--seed", "0", "--dry-run")
    combos = cli(*args).json_lines()
    assert [(r["prompt"], r["seeds"][0], r["line"]) for r in combos] == [
        ("a blue cat", 0, 1), ("a blue dog", 1, 1), ("a red cat", 2, 1), ("a red dog", 3, 1), ("50% off, # not a comment", 4, 2)]
    drawn = cli(*args, "--random", "3").json_lines()
    assert len(drawn) == 4 and cli(*args, "--random", "3").json_lines() == drawn  # seeded by the base seed: rerun-stable
    Path("t.txt").write_text("a __nope__\n")
    missing = cli(*args)
    assert missing.exit_code == 2 and "line 1: wildcard __nope__ not found in wc" in missing.stderr


@pytest.mark.parametrize("model", ["tiny", "bundled"])  # the bundled model also checks the prompt's words
@pytest.mark.slow  # starts a process
def test_dry_run_loads_no_heavy_library(tiny_model, tmp_path, model):
    Path("p.txt").write_text("a red sports car\n")
    chosen = ["--model", str(tiny_model)] if model == "tiny" else []
    code = (
        "import sys\nfrom diffcli.cli import main\n"
        f"assert main(['batch', 'p.txt', *{chosen!r}, '--dry-run', '-q', '--seed', '1']) == 0\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["paths"][0].startswith("outputs/00000-1-")


def test_saved_but_unrecorded_image_is_adopted_and_force_redoes(cli, tiny_model):
    Path("p.txt").write_text("a cat\na dog\n")
    run = ("batch", "p.txt", "--model", tiny_model, "--seed", "3", "-q", *FAST)
    assert cli(*run).exit_code == 0
    manifest = Path("outputs") / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # as if killed between saving and recording
    adopted = cli(*run)
    assert adopted.exit_code == 0 and adopted.stdout == "" and len(manifest_ids()) == 2
    Path("outputs/stranger.png").write_bytes(b"")
    forced = cli(*run, "--force")
    assert forced.exit_code == 0 and len(forced.stdout.split()) == 2 and len(manifest_ids()) == 4
    Path("p.txt").write_text("a cat\na dog\na new line\n")  # appending keeps earlier jobs' ids
    more = cli(*run)
    assert more.stdout.split() == ["outputs/00002-5-a-new-line.png"]


@pytest.mark.slow  # starts a process
def test_dash_out_writes_png_bytes_to_stdout(cli, tiny_model, tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffcli", "txt2img", "a cat", "--model", str(tiny_model), "--seed", "1",
                             *FAST, "-o", "-"], capture_output=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"\x89PNG\r\n\x1a\n") and b"seed 1" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    many = cli("txt2img", "a cat", "--model", tiny_model, "-N", "2", "-o", "-", *FAST)
    assert many.exit_code == 2 and "writes one image to stdout" in many.stderr


@pytest.mark.slow  # starts a process
def test_sigint_stops_cleanly_and_rerun_finishes_without_duplicates(tiny_model, tmp_path):
    Path("p.txt").write_text("".join(f"prompt {i}\n" for i in range(4)))
    command = [sys.executable, "-m", "diffcli", "batch", "p.txt", "--model", str(tiny_model), "--seed", "1", "--json", *FAST]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    first = json.loads(process.stdout.readline())
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    made = [first] + [json.loads(line) for line in rest.splitlines()]
    assert len(made) < 4 and "run the same command again" in stderr
    assert images() == sorted(Path(r["path"]).name for r in made) and manifest_ids() == [r["id"] for r in made]
    assert not list(tmp_path.rglob("*.part"))
    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    ids = manifest_ids()
    assert len(ids) == len(set(ids)) == 4 and len(images()) == 4
    assert {r["seed"] for r in made + [json.loads(line) for line in second.stdout.splitlines()]} == set(range(1, 5))


@pytest.mark.slow  # starts a process
def test_two_processes_share_the_jobs_exactly_once(cli, tiny_model, tmp_path):
    Path("p.txt").write_text("".join(f"prompt {i}\n" for i in range(5)))
    result = subprocess.run([sys.executable, "-m", "diffcli", "batch", "p.txt", "--model", str(tiny_model), "--processes", "2",
                             "--json", "-o", "out/", *FAST], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["job"] for r in records) == [0, 1, 2, 3, 4]
    ranks = {json.loads(line)["id"]: json.loads(line)["rank"] for line in (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()
             if "id" in line}
    assert len(ranks) == 5 and sorted(ranks.values()) == [0, 0, 0, 1, 1]  # job i on rank i % 2
    assert len(images("out")) == 5 and "rank 1/2" in result.stderr
    rerun = cli("batch", "p.txt", "--model", tiny_model, "-o", "out/", "--dry-run", *FAST)
    assert all(r["done"] == [True] for r in rerun.json_lines())  # same base seed (recorded), same ids


def test_jobs_with_the_same_settings_share_pipeline_calls(cli, tiny_model, monkeypatch):
    """--batch-size N batches images of different jobs (prompts) together; each image is the one it would be alone."""
    import numpy as np

    from diffcli import run as generate

    calls = []
    real = generate._generate_batch

    def spy(pipe, plan, items, *args):
        calls.append([each.job.prompt.text for _, each in items])
        return real(pipe, plan, items, *args)

    monkeypatch.setattr(generate, "_generate_batch", spy)
    Path("j.jsonl").write_text(
        '{"prompt": "a red car"}\n'
        '{"prompt": "a blue boat", "negative": "fog"}\n'
        '{"prompt": "a cat", "cfg": 3}\n'  # other settings: calls of its own
        '{"prompt": "' + "a very long prompt, " * 20 + '"}\n'  # two 75-token chunks: not mixed with one-chunk prompts
        '{"prompt": "a green tree", "num-images": 2}\n'
    )
    result = cli("batch", "j.jsonl", "--model", tiny_model, "--seed", "1", "--batch-size", "4", "-o", "together", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.stderr
    long = "a very long prompt, " * 20
    assert calls == [["a red car", "a blue boat", "a green tree", "a green tree"], [long], ["a cat"]]
    records = result.json_lines()
    assert [(r["job"], r["seed"], r["negative"]) for r in records[:4]] == [(0, 1, ""), (1, 2, "fog"), (4, 5, ""), (4, 6, "")]

    calls.clear()
    alone = cli("batch", "j.jsonl", "--model", tiny_model, "--seed", "1", "-o", "alone", "--json", "-q", *FAST)
    assert alone.exit_code == 0 and len(calls) == 6
    for record in records:
        twin = Path("alone") / Path(record["path"]).name
        difference = np.abs(np.asarray(Image.open(record["path"]), dtype=int) - np.asarray(Image.open(twin), dtype=int))
        assert difference.max() <= 2, record["path"]


def test_sweep_cells_of_a_line_share_its_seed(cli, tiny_model):
    Path("s.jsonl").write_text('{"prompt": "a cat", "cfg": "3,5"}\n{"prompt": "a dog"}\n')
    result = cli("batch", "s.jsonl", "--model", tiny_model, "--seed", "7", "--dry-run", "-o", "sw/")
    assert result.exit_code == 0, result.stderr
    got = [(r["prompt"], r["cfg"], r["seeds"]) for r in result.json_lines()]
    assert got == [("a cat", 3.0, [7]), ("a cat", 5.0, [7]), ("a dog", 7.5, [8])]


def test_image_task_lines_run_and_report_their_resizing(cli, tiny_model, tmp_path):
    from task_inputs import write_mask, write_photo

    photo, mask = write_photo(tmp_path, (61, 51)), write_mask(tmp_path, (61, 51))  # the tiny model's multiple is 2
    Path("t.jsonl").write_text(
        json.dumps({"command": "img2img", "input": str(photo), "prompt": "a cat", "strength": 0.5}) + "\n"
        + json.dumps({"command": "inpaint", "input": str(photo), "mask": str(mask), "prompt": "a dog"}) + "\n"
    )
    result = cli("batch", "t.jsonl", "--model", tiny_model, "--seed", "3", "--steps", "4", "-o", "tasks/", "--json")
    assert result.exit_code == 0, result.stderr
    records = result.json_lines()
    assert [(r["task"], r["line"], r["input"]) for r in records] == [("img2img", 1, str(photo)), ("inpaint", 2, str(photo))]
    assert Image.open(records[0]["path"]).size == (60, 50) and Image.open(records[1]["path"]).size == (61, 51)
    assert "line 1: input resized from 61x51 to 60x50" in result.stderr


def test_ctrl_c_while_an_image_is_written_stops_before_the_next_image(cli, tiny_model, tmp_path, monkeypatch):
    from diffcli import output

    real_write = output._write_atomic

    def write_then_ctrl_c(*args):
        os.kill(os.getpid(), signal.SIGINT)  # held until the image is written and recorded
        real_write(*args)

    monkeypatch.setattr(output, "_write_atomic", write_then_ctrl_c)
    Path("p.txt").write_text("a cat\n")
    result = cli("batch", "p.txt", "--model", tiny_model, "--seed", "1", "-N", "3", *FAST)  # one job, three calls
    assert result.exit_code == 130 and "interrupted: 1 image(s) made" in result.stderr
    assert result.stdout.split() == ["outputs/00000-1-a-cat.png"] and len(images()) == 1 and len(manifest_ids()) == 1


def test_dry_run_without_a_seed_says_the_seed_is_drawn_at_run_time(cli, tiny_model):
    Path("p.txt").write_text("a cat\na dog\n")
    dry = cli("batch", "p.txt", "--model", tiny_model, "--dry-run", *FAST)
    assert dry.exit_code == 0 and "drawn at run time" in dry.stderr
    assert all(r["seeds"] is None and r["ids"] is None and r["paths"] is None and r["seed"] == "drawn at run time"
               for r in dry.json_lines())
    fixed = cli("batch", "p.txt", "--model", tiny_model, "--dry-run", "--seed", "4", *FAST).json_lines()
    assert [r["seeds"] for r in fixed] == [[4], [5]] and all(r["paths"] and r["ids"] for r in fixed)
    assert not Path("outputs").exists()


def test_batch_grid_is_refused_not_ignored(cli, tiny_model):
    Path("p.txt").write_text("a cat\n")
    result = cli("batch", "p.txt", "--model", tiny_model, "--grid", *FAST)
    assert result.exit_code == 2 and "contact sheets" in result.stderr
