"""Small CPU evaluation of the bundled tiny-shapes model against regression floors.

Measured on 100 held-out one-object prompts at the defaults (euler-a, 12 steps, cfg 4; docs/bundled-model.md):
background 1.00, colour 1.00, position 1.00, size 0.99, shape 0.93, all-right 0.92 (these 24: shape and all-right
0.875, the rest 1.00). Floors sit about 0.15-0.2 below (24 prompts are noisy); the issue's targets (0.95 per
attribute, 0.97 all-right) are not all reached yet, see the doc.
"""

from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[1] / "diffcli" / "bundled" / "tiny-shapes"
FLOORS = {"background": 0.85, "colour": 0.85, "position": 0.85, "size": 0.8, "shape": 0.7, "exact": 0.65}


@pytest.mark.skipif(not (MODEL / "unet").exists(), reason="bundled model absent")
def test_bundled_model_one_object_prompts():
    import torch

    from diffcli.shapes.evaluate import evaluate

    torch.set_num_threads(2)
    res = evaluate(MODEL, n=24, seed=0, device="cpu", two_object=False, batch_size=24)
    acc = res["accuracy"]
    low = {k: acc[f"one.{k}"] for k, floor in FLOORS.items() if acc[f"one.{k}"] < floor}
    assert not low, (low, acc)


@pytest.mark.skipif(not (MODEL / "unet").exists(), reason="bundled model absent")
def test_eval_command_reports_accuracy_json(cli):
    import json

    result = cli("eval", "--n", "4", "--device", "cpu", "--steps", "4")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 4 and {"one.exact", "two.exact", "two.relation"} <= set(report["accuracy"])


def test_eval_refuses_models_without_a_judge(cli, tiny_model):
    result = cli("eval", "--model", tiny_model, "--n", "2")
    assert result.exit_code == 2 and "not a shapes model" in result.stderr


X4 = MODEL.parent / "tiny-shapes-x4"
# Measured 30.77 dB on these 8 scenes (bicubic 32.3, the x4 VAE's own round trip about 31); the weights before the
# zero-terminal-SNR retrain scored 12 dB (wrong colours).
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
