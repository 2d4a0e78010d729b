"""examples/*.sh run for real against the tiny model (DIFFCLI_MODEL), with 2 steps."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each example starts several processes
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, tmp_path: Path, tiny_model: Path, **env) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)  # the venv's diffcli and accelerate
    environment = {**os.environ, "DIFFCLI_MODEL": str(tiny_model), "STEPS": "2", "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    result = subprocess.run(["bash", str(EXAMPLES / name)], capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_loop_and_its_rerun(tmp_path, tiny_model):
    run_example("loop.sh", tmp_path, tiny_model)
    assert pngs(tmp_path / "loop-out") == ["000.png", "001.png"]
    again = run_example("loop.sh", tmp_path, tiny_model)
    assert "made 0 new image(s)" in again.stderr


@pytest.mark.skipif(not (EXAMPLES.parent / ".venv" / "bin" / "diffcli").exists(), reason="needs the checkout's .venv")
def test_examples_run_without_the_venv_activated(tmp_path, tiny_model):
    venv = str(Path(sys.executable).parent)
    path = ":".join(p for p in os.environ["PATH"].split(":") if p != venv and not Path(p, "diffcli").exists())
    result = subprocess.run(["bash", str(EXAMPLES / "loop.sh")], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "DIFFCLI_MODEL": str(tiny_model), "STEPS": "2", "PATH": path})
    assert result.returncode == 0, result.stderr
    assert pngs(tmp_path / "loop-out") == ["000.png", "001.png"]


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq (apt-get install jq)")
def test_jsonl_pipeline_and_its_rerun(tmp_path, tiny_model):
    first = run_example("jsonl-pipeline.sh", tmp_path, tiny_model)
    rows = [line.split("\t") for line in first.stdout.splitlines()]
    assert [(seed, cfg) for seed, cfg, _ in rows] == [("100", "6.5"), ("101", "6.5")]
    assert all((tmp_path / path).is_file() for _, _, path in rows)
    again = run_example("jsonl-pipeline.sh", tmp_path, tiny_model)
    assert again.stdout == "" and len(pngs(tmp_path / "pipeline-out")) == 2  # resumed: nothing to make


def test_sweep_writes_a_grid_and_reruns(tmp_path, tiny_model):
    for _ in range(2):
        run_example("sweep.sh", tmp_path, tiny_model, CFGS="4,7.5", STEPS_LIST="1,2")
        assert pngs(tmp_path / "sweep-out") == ["cfg4-steps1.png", "cfg4-steps2.png", "cfg7.5-steps1.png",
                                                "cfg7.5-steps2.png", "grid-cfg4-steps1.png"]


def test_accelerate_launch_two_processes(tmp_path, tiny_model):
    result = run_example("accelerate.sh", tmp_path, tiny_model)
    assert len(result.stdout.splitlines()) == 2 and len(pngs(tmp_path / "accelerate-out")) == 2
    manifest = (tmp_path / "accelerate-out" / "diffcli-manifest.jsonl").read_text()
    assert '"rank": 0' in manifest and '"rank": 1' in manifest
