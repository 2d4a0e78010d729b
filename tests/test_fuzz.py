"""Fuzzing the flag parser and the jobs-file reader: hostile values never end in a traceback (security issue, item 12).

Every command's flags come from the Typer app itself (a new flag is fuzzed without touching this file); values are
hostile (huge integers, nan/inf, NUL, escapes, unicode, '../', empty). Nothing runs a model: the run step is a stand-in
that writes a small PNG per planned path, so everything up to and after the run (planning, names, `-o -`, --grid) is
the real code. The documented exit codes of an in-process run are 0, 1 and 2; an `unexpected X` line is a traceback in
disguise. Budget: about 15 s on 2 cores (a fixed set of examples; see DIFFCLI_FUZZ_EXAMPLES for longer searches).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffcli.errors import RuntimeFailure

COMMANDS = ("txt2img", "img2img", "inpaint", "outpaint", "upscale", "batch")
NOT_FUZZED = {"--processes"}  # starts processes: covered by test_batch
DOCUMENTED_EXITS = {0, 1, 2}  # 130/143 come from signals, which no in-process run receives
# CI runs the same examples every time (about 15 s in all on 2 cores); DIFFCLI_FUZZ_EXAMPLES=10000 searches longer,
# with fresh random examples each run.
EXAMPLES = os.environ.get("DIFFCLI_FUZZ_EXAMPLES")


def fuzz(examples: int):
    return settings(max_examples=int(EXAMPLES or examples), deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=EXAMPLES is None, database=None)


# Hostile values by the kind of value an option takes, so that each is met by the code that must refuse it.
HUGE = [str(2**31), str(2**63 - 1), str(2**63), str(2**64), "99999999999999999999", "9" * 4000, "-" + "9" * 30]
INTS = HUGE + ["-1", "0", "1e3", "1.5", "nan", "", "\u0663"]
FLOATS = ["nan", "inf", "-inf", "1e400", "-1e400", "1e-320", "-1", "0", "1e308", "", str(2**64), "9" * 400]
SWEEPS = ["1,2,3", ",", "1,,2", "nan,1", "1e400", "-1", str(2**63), ",".join(["1"] * 50), "euler,euler", "ddim,nope"]
PATHS = ["", ".", "..", "../", "../../x.png", "/", "-", "--x", "\x00", "a\x00b.png", "\ud800.png", "A" * 300,
         "a" * 300 + ".png", f"{'d' * 250}/{'e' * 250}/x.png", "x.gif", "o/", "{index}", "{nope}.png", "{seed:>99999}.png",
         "{prompt}{prompt}.png", "{", "x.png/y.png", "in.png/x.png", "nope.safetensors", "bad.safetensors",
         "bad.safetensors:inf", "lora.safetensors:nan", "lora.safetensors:1e400", "mask.png", "alpha.png", "in.png"]
TEXTS = ["", " ", "\x00", "a\x00b", "\x1b[31mred", "\\(", "(" * 60 + "x", f"(x:{'9' * 400})", "[" * 60 + "x",
         "\U0001F600" * 70, "\u202e", "\ud800", "<lora:x:nan>", "<lora:../../x>", "<lora:lora:1e400>", "<hypernet:x>",
         "__w__", "{a|b}", "a" * 5000, "BREAK " * 30, "all=99999999", "all=9000", "left=" + "9" * 50, "left=-1", "cuda:99",
         "DPM++ 2M Karras", "none", "tiny-shapes-x4", "tiny-shapes-refiner", "x4", "latent"]
KIND_HOSTILE = {int: INTS, float: FLOATS, "sweep": SWEEPS + INTS[:5] + FLOATS[:5], "path": PATHS, str: TEXTS + PATHS[:12]}
PATH_OPTIONS = {"out", "model", "model_config", "lora", "lora_dir", "embedding", "embedding_dir", "mask", "manifest",
                "wildcards", "refiner", "hires_upscaler_model", "input", "file"}
# Values each option takes when used well: two draws in three use one, so that planning goes deep and the hostile
# value among them is what it meets (a hostile value in every flag would stop every run at the parser).
PLAUSIBLE = {
    "negative": ["blurry", ""], "cfg": ["7", "3,5"], "steps": ["2", "2,3"], "seed": ["1", "1,2"], "width": ["64"],
    "height": ["64"], "num_images": ["2"], "batch_size": ["2"], "scheduler": ["euler", "ddim,lcm"],
    "model": ["tiny-shapes"], "device": ["cpu"], "dtype": ["fp32"], "out": ["o/", "o/{seed}-{index}.png", "x.png", "-"],
    "threads": ["1"], "clip_skip": ["2"], "variation_seed": ["3"], "variation_strength": ["0.5"],
    "lora": ["lora.safetensors:0.5"], "lora_dir": ["."], "embedding": ["emb.safetensors"], "embedding_dir": ["."],
    "hires": ["1.5"], "hires_steps": ["2"], "hires_strength": ["0.5"], "hires_upscaler": ["latent", "lanczos", "x4"],
    "hires_upscaler_model": ["tiny-shapes-x4"], "refiner": ["none", "tiny-shapes-refiner"], "refiner_start": ["0.5"],
    "deep_cache": ["2"], "strength": ["0.5"], "resize": ["crop"], "mask": ["mask.png"], "mask_blur": ["2"],
    "padding": ["8"], "extend": ["left=8", "all=16"], "feather": ["4"], "scale": ["4"], "method": ["x4"],
    "noise_level": ["20"], "tile": ["32"], "tile_overlap": ["4"], "fmt": ["jsonl"], "command": ["txt2img"],
    "wildcards": ["."], "random": ["2"], "manifest": ["m.jsonl"], "fill": ["original"], "prompt_sr": ["a,b"],
}
HOSTILE = st.one_of(st.sampled_from(INTS + FLOATS + SWEEPS + PATHS + TEXTS), st.text(max_size=12))


def kind(param):
    """The kind of value a parameter takes, for its hostile values: int, float, a sweep list, a path, or text."""
    from diffcli.sweep import Values

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", str)
    if param.name in PATH_OPTIONS:
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, Values):
        return "sweep"
    return annotation if annotation in (int, float) else str


def value_for(name: str, of_kind) -> st.SearchStrategy:
    """Two draws in three a value the option takes, else a hostile one of its kind (now and then any hostile one)."""
    hostile = st.one_of(*[st.sampled_from(KIND_HOSTILE[of_kind])] * 4, HOSTILE)
    good = PLAUSIBLE.get(name)
    return st.one_of(*[st.sampled_from(good)] * 2, hostile) if good else hostile


SMALL_SAFETENSORS = b"\x40\0\0\0\0\0\0\0" + b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'.ljust(64) + b"\0" * 4


def png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "gray").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def sandbox(isolated, monkeypatch, capsys):
    """Inputs in the test's folder, and a run step that writes a small PNG per planned path (inside this folder, or
    `-o -`'s temporary one) instead of loading a model."""
    import typer.main
    from PIL import Image

    from diffcli import cli as cli_module
    from diffcli import run

    Image.new("RGB", (64, 64), "red").save("in.png")
    Image.new("L", (64, 64), 255).save("mask.png")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save("alpha.png")
    Path("bad.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{\"w\": 5}        ")
    Path("jobs.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "command": "img2img", "input": "in.png"}\n')
    Path("lora.safetensors").write_bytes(SMALL_SAFETENSORS)
    Path("emb.safetensors").write_bytes(SMALL_SAFETENSORS)
    data, home = png(), Path.cwd().resolve()

    def run_plans(plans, on_image, progress_bar=False, notify=lambda message: None):
        for plan in plans:
            for index, (seed, path) in enumerate(zip(plan.seeds, plan.paths)):
                where = Path(path).resolve()
                if not (where.is_relative_to(home) or "diffcli-stdout-" in str(where)):
                    raise RuntimeFailure(f"fuzz: not writing {path} outside the test folder")
                where.parent.mkdir(parents=True, exist_ok=True)
                stdout = "diffcli-stdout-" in str(where)  # `-o -`: no PNG bytes into pytest's text capture
                where.write_bytes(b"" if stdout else data)
                on_image({"path": str(path), "seed": seed, "index": index, "prompt": plan.job.prompt.text,
                          "cfg": plan.cfg, "steps": plan.job.sampling.steps, "scheduler": plan.scheduler or "default", "device": "cpu",
                          "dtype": "float32", "width": plan.width, "height": plan.height})

    monkeypatch.setattr(run, "run_plans", run_plans)
    monkeypatch.delenv("DIFFCLI_DEBUG", raising=False)
    # Typer rebuilds its click commands from the signatures on every call (70 ms); build them once, so that the
    # budget goes to examples. Typer's own __call__ only adds its exception hook around the same click command.
    group = typer.main.get_command(cli_module.app)
    monkeypatch.setattr(cli_module, "app", group)
    return home


def flags_of(command: str) -> list[tuple[str, bool, str, object]]:
    """(flag, takes a value, parameter name, kind) for every option of a command, as the app declares them."""
    import typer
    import typer.main

    from diffcli import cli

    group = typer.main.get_command(cli.app) if isinstance(cli.app, typer.Typer) else cli.app
    params = group.commands[command].params
    return [(opt, not getattr(p, "is_flag", False), p.name, kind(p)) for p in params if p.param_type_name == "option"
            for opt in [*p.opts, *getattr(p, "secondary_opts", [])] if opt not in NOT_FUZZED]


def task_flags() -> list[tuple[str, bool, str, object]]:
    """Every task's flags: batch passes the ones it does not know on to each line's command."""
    return sorted({flag for command in COMMANDS for flag in flags_of(command)}, key=str)


@st.composite
def argv(draw) -> list[str]:
    command = draw(st.sampled_from(COMMANDS))
    flags = task_flags() if command == "batch" else flags_of(command)
    positional = {"txt2img": ["a cat"], "batch": ["jobs.jsonl"]}.get(command, ["in.png", "a cat"])
    positional = [draw(st.one_of(*[st.just(p)] * 3, st.sampled_from(PATHS if p.endswith(("png", "jsonl")) else TEXTS)))
                  for p in positional]
    args = ["--mask", "mask.png"] if command == "inpaint" and draw(st.integers(0, 3)) else []
    for flag, takes_value, name, of_kind in draw(st.lists(st.sampled_from(flags), min_size=1, max_size=4)):
        args += [flag, draw(value_for(name, of_kind))] if takes_value else [flag]
    if draw(st.integers(0, 5)) == 5:  # one in six (not == 0: Hypothesis draws its simplest value often)
        args.append(draw(HOSTILE))  # a stray token
    if command == "batch":
        args.append("--dry-run")  # a real batch writes its manifest wherever --out says
    return [command, *positional, *args] if draw(st.booleans()) else [command, *args, "--", *positional]


def run(cli, *args: str):
    """cli(*args), with stderr as a real process has it: Python's stderr writes what it cannot encode escaped
    (argv may hold lone surrogates), pytest's capture stream would raise instead. stdout stays strict."""
    sys.stderr.reconfigure(errors="backslashreplace")
    return cli(*args)


def assert_clean(result, argv) -> None:
    assert result.exit_code in DOCUMENTED_EXITS, (argv, result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr, (argv, result.stderr)
    assert "error: unexpected " not in result.stderr, (argv, result.stderr)
    assert not [p for p in Path().rglob("*.part")], argv


@fuzz(400)
@given(args=argv())
def test_fuzzed_flags(cli, sandbox, args):
    assert_clean(run(cli, *args), args)


# -- jobs files ----------------------------------------------------------------------------------------------

KEYS = ["prompt", "negative", "cfg", "steps", "seed", "width", "height", "num_images", "num-images", "batch_size",
        "scheduler", "model", "out", "overwrite", "command", "task", "input", "mask", "strength", "extend", "feather",
        "lora", "embedding", "variation_seed", "variation_strength", "hires", "refiner", "method", "tile",
        "allow_pickle", "device", "dtype", "bogus", ""]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.sampled_from([2**63, 2**64, 10**30]), st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from(TEXTS + PATHS), st.text(max_size=10))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=6)
JOB_PLAUSIBLE = {
    "prompt": ["a cat", "a {red|blue} car"], "negative": ["blurry"], "cfg": [7, "3,5"], "steps": [2], "seed": [3, "1,2"],
    "width": [64], "height": [64], "num_images": [2], "num-images": [2], "batch_size": [2], "scheduler": ["euler"],
    "model": ["tiny-shapes"], "out": ["o/{job}-{seed}.png"], "overwrite": [True],
    "command": ["txt2img", "img2img", "inpaint", "outpaint", "upscale"], "task": ["img2img"], "input": ["in.png"],
    "mask": ["mask.png"], "strength": [0.5], "extend": ["left=8"], "feather": [4], "lora": [["lora.safetensors:0.5"]],
    "embedding": [["emb.safetensors"]], "variation_seed": [2], "variation_strength": [0.5], "hires": [1.5],
    "refiner": ["none"], "method": ["x4"], "tile": [32], "device": ["cpu"], "dtype": ["fp32"],
}


@st.composite
def job_line(draw) -> dict:
    """A jobs-file object: keys a line may use (and a few it may not), three values in four ones the key takes."""
    line = {"prompt": "a"}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True)):
        good = JOB_PLAUSIBLE.get(key)
        line[key] = draw(st.one_of(*[st.sampled_from(good)] * 3, JSON_VALUES) if good else JSON_VALUES)
    return line


JOB = job_line()
RAW_LINE = st.sampled_from(["{", "[]", "5", '"x"', "null", "{}", "# comment", "", "{\"prompt\": 1e999}",
                            "{\"prompt\": \"a\", \"seed\": " + "9" * 5000 + "}", "[" * 5000 + "]" * 5000,
                            "\ufeff{\"prompt\": \"bom\"}", "{\"prompt\": \"a\"} trailing", "\x00"])


def jsonl(jobs: list, raw: list) -> str:
    return "\n".join([json.dumps(job) for job in jobs] + raw) + "\n"


def csv_text(rows: list) -> str:
    keys = sorted({key for row in rows for key in row}) or ["prompt"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: value if isinstance(value, str) else json.dumps(value) for key, value in row.items()})
    return buffer.getvalue()


JOBS_FILES = st.one_of(
    st.tuples(st.just("jobs.jsonl"), st.builds(jsonl, st.lists(JOB, max_size=4), st.lists(RAW_LINE, max_size=2))),
    st.tuples(st.just("jobs.csv"), st.lists(JOB, max_size=4).map(csv_text)),
    st.tuples(st.just("jobs.txt"), st.lists(st.sampled_from(TEXTS) | st.text(max_size=20), max_size=5).map("\n".join)),
    st.tuples(st.sampled_from(["jobs.csv", "jobs.txt", "jobs"]), st.text(max_size=200)),
)
GOOD_BATCH_FLAGS = [["--format", "jsonl"], ["--format", "csv"], ["--format", "text"], ["--random", "2"], ["--wildcards", "."],
                    ["--seed", "7"], ["--seed", str(2**63 - 1)], ["--command", "img2img"], ["--command", "upscale"],
                    ["-o", "o/"], ["-o", "o/{job}-{line}-{seed}.png"], ["--manifest", "m.jsonl"], ["-N", "2"],
                    ["--strength", "0.5"], ["--force"], ["--overwrite"], ["--negative", "blurry"], ["--cfg", "4"]]
BAD_BATCH_FLAGS = [["--format", "yaml"], ["--random", "0"], ["--command", "eval"], ["-o", "x.png"], ["--manifest", "."],
                   ["--seed", str(2**64)], ["--wildcards", "nowhere"]]
BATCH_FLAGS = st.builds(lambda good, bad: good + bad, st.lists(st.sampled_from(GOOD_BATCH_FLAGS), max_size=3),
                        st.lists(st.sampled_from(BAD_BATCH_FLAGS), max_size=1))  # at most one refused batch flag


@fuzz(300)
@given(jobs=JOBS_FILES, flags=BATCH_FLAGS)
def test_fuzzed_jobs_files(cli, sandbox, jobs, flags):
    name, text = jobs
    Path(name).write_text(text, encoding="utf-8", errors="surrogatepass")
    args = ["batch", name, *[token for flag in flags for token in flag], "--dry-run"]
    result = run(cli, *args)
    assert_clean(result, (args, text[:500]))
    if result.exit_code == 0:  # what a dry run prints is one JSON object per job
        assert all(isinstance(json.loads(line), dict) for line in result.stdout.splitlines())


@fuzz(200)
@given(data=st.binary(max_size=400), how=st.sampled_from(["stdin", "jsonl", "csv", "txt"]))
def test_fuzzed_jobs_bytes(cli, sandbox, monkeypatch, data, how):
    """Bytes that need not be text at all, from a file or from stdin."""
    if how == "stdin":
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        args = ["batch", "-", "--dry-run"]
    else:
        Path(f"raw.{how}").write_bytes(data)
        args = ["batch", f"raw.{how}", "--dry-run"]
    assert_clean(run(cli, *args), (args, data))
