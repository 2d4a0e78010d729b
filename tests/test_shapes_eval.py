"""Small CPU evaluation of the bundled tiny-shapes model (with its refiner, tiny-shapes-refiner, as diffcli runs it)
against the issue's targets minus a stated margin.

Measured on 500 held-out prompts of each kind (`diffcli eval --n 200`, seeds 0-4) at the defaults (euler-a, 14
steps, cfg 3, refiner from half the schedule; docs/bundled-model.md): one object all-right 0.972, shape 0.972, the
rest 1.00; two objects all-right 0.920. On the prompts here: one-object all-right 0.958 (shape 0.958, the rest 1.00;
24 prompts), two-object all-right 0.917 (24 prompts). Targets: 0.95 per
attribute, 0.97 all right, 0.80 for two objects; the floors are 0.10 below them (24 prompts are noisy: one prompt is
0.04).
"""

from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[1] / "diffcli" / "bundled" / "tiny-shapes"
MARGIN = 0.10
FLOORS = {**{k: 0.95 - MARGIN for k in ("background", "colour", "position", "size", "shape")}, "exact": 0.97 - MARGIN}


@pytest.mark.skipif(not (MODEL / "unet").exists(), reason="bundled model absent")
@pytest.mark.slow  # a quality eval: minutes on 2 cores
def test_bundled_model_one_object_prompts():
    import torch

    from diffcli.shapes.evaluate import evaluate

    torch.set_num_threads(2)
    res = evaluate(MODEL, n=24, seed=0, device="cpu", two_object=False, batch_size=24)
    acc = res["accuracy"]
    low = {k: acc[f"one.{k}"] for k, floor in FLOORS.items() if acc[f"one.{k}"] < floor}
    assert not low, (low, acc)


@pytest.mark.skipif(not (MODEL / "unet").exists(), reason="bundled model absent")
@pytest.mark.slow  # a quality eval: minutes on 2 cores
def test_bundled_model_two_object_prompts():
    import torch

    from diffcli.shapes.evaluate import evaluate

    torch.set_num_threads(2)
    res = evaluate(MODEL, n=48, seed=0, device="cpu", batch_size=24)
    assert res["refiner"] == "tiny-shapes-refiner" and res["accuracy"]["two.exact"] >= 0.80 - MARGIN, res["accuracy"]


def test_bundle_fits_the_size_limit():
    """The issue's limit: the whole bundle (every bundled folder) at most 60 MB."""
    size = sum(p.stat().st_size for p in MODEL.parent.rglob("*") if p.is_file())
    assert size <= 60e6, size


@pytest.mark.skipif(not (MODEL / "unet").exists(), reason="bundled model absent")
def test_eval_command_reports_accuracy_json(cli):
    import json

    result = cli("eval", "--n", "4", "--device", "cpu", "--steps", "4")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 4 and {"one.exact", "two.exact", "two.relation"} <= set(report["accuracy"])
    assert (report["refiner"], report["refiner_start"]) == ("tiny-shapes-refiner", 0.5)
    result = cli("eval", "--n", "2", "--device", "cpu", "--steps", "2", "--refiner", "none")
    assert result.exit_code == 0 and json.loads(result.stdout)["refiner"] is None, result.stderr
    result = cli("eval", "--n", "2", "--refiner-start", "1.5")
    assert result.exit_code == 2 and "--refiner-start must be between 0 and 1" in result.stderr


def test_eval_refuses_models_without_a_judge(cli, tiny_model):
    result = cli("eval", "--model", tiny_model, "--n", "2")
    assert result.exit_code == 2 and "not a shapes model" in result.stderr


X4 = MODEL.parent / "tiny-shapes-x4"
# Measured 29.31 dB on these 8 scenes (bicubic 32.3; 30.77 before the retrain for 128 px inputs, which gave up some
# of the 32 px case, docs/bundled-model.md); the weights before the zero-terminal-SNR retrain scored 12 dB.
X4_FLOOR_DB = 27.0


@pytest.mark.skipif(not (X4 / "unet").exists(), reason="bundled upscaler absent")
def test_bundled_upscaler_restores_the_scene(cli):
    import json

    result = cli("eval", "--model", "tiny-shapes-x4", "--n", "8", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["psnr_db"] >= X4_FLOOR_DB, report
    assert report["bicubic_psnr_db"] > 25, report  # the comparison itself is sound


def test_upscaler_eval_refuses_cfg(cli):
    result = cli("eval", "--model", "tiny-shapes-x4", "--cfg", "4")
    assert result.exit_code == 2 and "--cfg does not apply" in result.stderr
