"""Optional extras (pyproject.toml [project.optional-dependencies], diffcli/extras.py): without the package a flag
needs, that flag exits 2 with one line naming it and the pip command, before any model loads.

Absence is simulated with sys.modules[name] = None, which makes `import name` raise ImportError."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from diffcli import extras

ROOT = Path(__file__).resolve().parent.parent
FAST = ("--steps", "2", "--seed", "3")


def line(what: str, module: str) -> str:
    package, extra = extras.EXTRAS[module]
    return (f"diffcli: error: {what} needs the optional package {package}, which is not installed "
            f"(pip install 'diffcli[{extra}]')")


def refused_before_loading(cli, monkeypatch, module: str, *args):
    """Run diffcli with `module` absent; assert exit 2 and that no model was loaded; return its error lines (the last
    lines of stderr; notes such as `sweep: 2 combinations` may come before)."""
    from diffcli import pipeline

    def loaded():  # every (model, options) key and its tasks: from_pipe adds a task to an existing key
        return {key: set(tasks) for key, tasks in pipeline._CACHE.items()}

    monkeypatch.setitem(sys.modules, module, None)
    before = loaded()
    result = cli(*args)
    assert result.exit_code == 2, result.stderr
    assert loaded() == before and not Path("outputs").exists()
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [text for text in lines if text.startswith("diffcli: error")]
    assert errors and lines[-len(errors):] == errors, result.stderr
    return errors


def tiny_lora_file(folder: Path) -> Path:
    """A safetensors file that passes the plan's format checks (peft is never reached)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 4), np.float32)}, folder / "shiny.safetensors")
    return folder / "shiny.safetensors"


def test_pyproject_declares_every_extra_and_dev_installs_them_all():
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    required = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    names = sorted(set(extra for _, extra in extras.EXTRAS.values()))
    for package, extra in extras.EXTRAS.values():
        assert [spec for spec in optional[extra] if spec.startswith(package)], f"[{extra}] should install {package}"
        assert package.lower() not in required.lower(), f"{package} is optional, not a dependency"
    assert optional["all"] == [f"diffcli[{','.join(sorted(names, key=list(optional).index))}]"]
    assert "diffcli[all]" in optional["dev"]


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_serve_without_the_server_extra(cli, monkeypatch, module):
    lines = refused_before_loading(cli, monkeypatch, module, "serve", "--port", "7999")
    assert lines == [line("diffcli serve", module)]


@pytest.mark.parametrize("command", ["txt2img", "img2img"])
def test_lora_without_peft(cli, monkeypatch, tiny_model, command):
    lora = tiny_lora_file(Path("loras"))
    Image.new("RGB", (64, 64), "red").save("in.png")
    inputs = ["in.png"] if command == "img2img" else []
    lines = refused_before_loading(cli, monkeypatch, "peft", command, *inputs, "a cat", "--model", tiny_model, *FAST,
                                   "--lora", lora)
    assert lines == [line("--lora", "peft")]


def test_prompt_lora_tag_without_peft(cli, monkeypatch, tiny_model):
    lora = tiny_lora_file(Path("loras"))
    lines = refused_before_loading(cli, monkeypatch, "peft", "txt2img", "a cat <lora:shiny:0.5>", "--model", tiny_model,
                                   *FAST, "--lora-dir", lora.parent)
    assert lines == [line("<lora:shiny> in the prompt", "peft")]


@pytest.mark.parametrize("name", ["DPM++ SDE Karras", "dpm++sde"])
def test_sde_scheduler_without_torchsde(cli, monkeypatch, tiny_model, name):
    lines = refused_before_loading(cli, monkeypatch, "torchsde", "txt2img", "a cat", "--model", tiny_model, *FAST,
                                   "--scheduler", f"euler,{name}")
    assert lines == [line(f"--scheduler {name}", "torchsde")]


def test_other_schedulers_do_not_need_torchsde(monkeypatch):
    from diffcli.pipeline import normalize_scheduler_name

    monkeypatch.setitem(sys.modules, "torchsde", None)
    assert normalize_scheduler_name("DPM++ 2M SDE Karras") == "dpm++2m-sde-karras"  # DPMSolverMultistep: no torchsde
    assert normalize_scheduler_name("Euler a") == "euler-a"


@pytest.mark.parametrize("command", ["txt2img", "img2img"])
def test_deep_cache_without_deepcache(cli, monkeypatch, tiny_model, command):
    Image.new("RGB", (64, 64), "red").save("in.png")
    inputs = ["in.png"] if command == "img2img" else []
    lines = refused_before_loading(cli, monkeypatch, "DeepCache", command, *inputs, "a cat", "--model", tiny_model,
                                   *FAST, "--deep-cache", "3")
    assert lines == [line("--deep-cache", "DeepCache")]


def test_bench_deep_cache_without_deepcache(cli, monkeypatch, tiny_model):
    from diffcli import pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("bench loaded a model")

    monkeypatch.setattr(pipeline, "_load_weights", no_loading)
    lines = refused_before_loading(cli, monkeypatch, "DeepCache", "bench", "--model", tiny_model, "--device", "cpu",
                                   "--steps", "3", "--deep-cache", "2")
    assert lines == [line("--deep-cache", "DeepCache")]


@pytest.mark.parametrize("prompt", ["a {red|blue} cat", "a __colour__ cat"])
def test_batch_templates_without_dynamicprompts(cli, monkeypatch, tiny_model, prompt):
    Path("wc").mkdir()
    Path("wc/colour.txt").write_text("red\nblue\n")
    Path("jobs.txt").write_text(f"a plain cat\n{prompt}\n")
    lines = refused_before_loading(cli, monkeypatch, "dynamicprompts", "batch", "jobs.txt", "--model", tiny_model, *FAST,
                                   "--wildcards", "wc")
    assert lines == [line("line 2: the prompt template ({a|b} or __name__)", "dynamicprompts")]


def test_plain_batch_lines_do_not_need_dynamicprompts(cli, monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "dynamicprompts", None)
    Path("jobs.txt").write_text("a plain cat\n")
    result = cli("batch", "jobs.txt", "--model", tiny_model, *FAST, "--dry-run")
    assert result.exit_code == 0, result.stderr
