"""--threads / $DIFFCLI_THREADS, and the default CPU threads and OpenMP wait policy (diffcli/speed.py)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from diffcli import speed

FAST = ("--steps", "2")
BAD = "--threads must be between 1 and 256, got 0"


@pytest.fixture(autouse=True)
def torch_threads():
    """torch has one thread pool per process: put its size back after each test."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("args", [["txt2img", "a"], ["bench"], ["eval"], ["batch", "p.txt"]])
def test_bad_threads_exit_2_with_one_line_naming_the_flag(cli, args):
    Path("p.txt").write_text("a red car\n")
    result = cli(*args, "--threads", "0", "--device", "cpu")
    assert result.exit_code == 2 and result.stderr.strip() == f"diffcli: error: {BAD}"


def test_threads_from_the_environment_are_checked_too(cli, monkeypatch):
    monkeypatch.setenv("DIFFCLI_THREADS", "257")
    result = cli("txt2img", "a", "--device", "cpu")
    assert result.exit_code == 2 and "--threads must be between 1 and 256, got 257" in result.stderr


def test_threads_are_set_and_recorded_in_the_metadata(cli, tiny_model):
    import torch

    result = cli("txt2img", "a", "--model", tiny_model, "--device", "cpu", "--threads", "1", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["optimizations"][0] == "cpu threads 1" and torch.get_num_threads() == 1


def test_batch_threads_reach_every_line(cli, tiny_model):
    Path("p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "command": "txt2img"}\n')
    result = cli("batch", "p.jsonl", "--model", tiny_model, "--threads", "1", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.stderr
    records = result.json_lines()
    assert len(records) == 2 and all(r["optimizations"][0] == "cpu threads 1" for r in records)


def test_a_jobs_file_line_cannot_set_threads(cli, tiny_model):
    Path("p.jsonl").write_text('{"prompt": "a cat", "threads": 1}\n')
    result = cli("batch", "p.jsonl", "--model", tiny_model, "--dry-run")
    assert result.exit_code == 2 and "line 1: unknown key 'threads'" in result.stderr


def test_batch_processes_pass_threads_to_every_child(cli, tiny_model, monkeypatch):
    started = []

    class Child:
        def __init__(self, argv, env, **kwargs):
            started.append((argv, env))

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    Path("p.txt").write_text("a red car\na blue boat\n")
    result = cli("batch", "p.txt", "--model", tiny_model, "--processes", "2", "--threads", "1", "-q", *FAST)
    assert result.exit_code == 0, result.stderr
    assert len(started) == 2
    for argv, env in started:
        assert "--threads=1" in argv and env["OMP_NUM_THREADS"] == "1"


def test_explicit_threads_win_then_omp_num_threads_then_the_load(monkeypatch):
    calls = []
    monkeypatch.setattr("torch.set_num_threads", calls.append)
    monkeypatch.setattr(speed, "default_threads", lambda: 7)
    monkeypatch.setattr(speed, "_DEFAULT", [])
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    speed.configure_cpu_threads(2)
    speed.configure_cpu_threads()  # OMP_NUM_THREADS: torch already read it
    monkeypatch.delenv("OMP_NUM_THREADS")
    speed.configure_cpu_threads()
    speed.configure_cpu_threads()  # chosen once per process
    assert calls == [2, 7, 7]


@pytest.mark.parametrize(("cores", "busy", "threads"), [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 3.5, 1), (2, None, 2), (8, 2.2, 6)])
def test_default_threads_leave_the_busy_cores_alone(monkeypatch, cores, busy, threads):
    monkeypatch.setattr(speed, "cpu_cores", lambda: cores)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(speed, "busy_cores", lambda: busy)
    assert speed.default_threads() == threads


def test_busy_cores_reads_the_machine_load():
    busy = speed.busy_cores(0.05)
    assert busy is None or 0 <= busy <= os.cpu_count()


@pytest.mark.parametrize(("given", "expected"), [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                                 ({"GOMP_SPINCOUNT": "300000"}, None), ({"KMP_BLOCKTIME": "200"}, None)])
def test_passive_wait_only_when_the_user_chose_no_wait_policy(monkeypatch, given, expected):
    environ = {k: v for k, v in os.environ.items() if k not in speed.WAIT_SETTINGS} | given
    monkeypatch.setattr(os, "environ", environ)
    speed.set_passive_wait()
    assert environ.get("OMP_WAIT_POLICY") == expected
    assert json.dumps(speed.cpu_settings(2)).startswith('["cpu threads 2"')
