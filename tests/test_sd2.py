"""SD 2.x on tiny real components: detected from the 1024-wide text encoder, v-prediction kept by every scheduler."""

import pytest
from task_inputs import FAST, write_mask, write_photo

from diffcli.models import resolve_model


def test_sd2_is_detected_with_its_prediction_type(tiny_sd2):
    spec = resolve_model(str(tiny_sd2))
    assert (spec.family, spec.prediction_type) == ("sd2", "v_prediction")


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m-karras", "ddim"])
def test_every_scheduler_keeps_v_prediction(tiny_sd2, scheduler):
    import torch

    from diffcli.pipeline import build_scheduler, load_pipeline

    pipe = load_pipeline(resolve_model(str(tiny_sd2)), "txt2img", "cpu", torch.float32)
    assert build_scheduler(pipe.diffcli_scheduler, scheduler).config.prediction_type == "v_prediction"


def test_sd2_through_txt2img_img2img_and_inpaint(cli, tiny_sd2, tmp_path):
    photo, mask = write_photo(tmp_path, (64, 64)), write_mask(tmp_path, (64, 64))
    runs = [
        ("txt2img", "a cat"),
        ("img2img", photo, "a cat", "--strength", "0.6"),
        ("inpaint", photo, "a cat", "--mask", mask),
    ]
    for number, args in enumerate(runs):
        result = cli(*args, "--model", tiny_sd2, "--scheduler", "euler", *FAST, "-o", f"{number}.png", "--json")
        assert result.exit_code == 0, result.stderr
        assert result.json_lines()[0]["model_family"] == "sd2"
