"""What the lab's tests share with tests/conftest.py: no network, each test in its own folder and diffcli home, and
`cli` (diffcli's real entry point in-process). tests/conftest.py does not reach lab/tests, so the few they need are
here."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "HF_HUB_CACHE" not in os.environ or not os.environ["HF_HUB_CACHE"].startswith(tempfile.gettempdir()):
    os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="diffcli-lab-hf-empty-")  # never the user's cache
    atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], True)
os.environ.pop("DIFFCLI_MODEL", None)
os.environ.pop("DIFFCLI_OUTPUT", None)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own diffcli home."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFCLI_HOME", str(tmp_path / ".diffcli-home"))
    return tmp_path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys):
    """Run diffcli's real entry point in-process; returns exit code, stdout and stderr."""
    from diffcli.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
