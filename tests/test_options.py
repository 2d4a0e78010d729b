"""Validation of settings before any model loads."""

import pytest

from diffcli.errors import UsageError
from diffcli.jobs import build
from diffcli.plan import check_job as check
from diffcli.options import check_size_multiple


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "  "}, "PROMPT is empty"),
        ({"cfg": -1.0}, "--cfg must be between 0 and 100, got -1"),
        ({"steps": 0}, "--steps must be between 1 and 1000, got 0"),
        ({"width": 4}, "--width must be between 8 and 8192, got 4"),
        ({"height": 100000}, "--height must be between 8 and 8192, got 100000"),
        ({"num_images": 0}, "--num-images must be at least 1, got 0"),
        ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
        ({"seed": -5}, "--seed must be between 0"),
        ({"device": "gpu"}, "--device must be auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
        ({"dtype": "int8"}, "--dtype must be one of auto, fp16, bf16, fp32, got 'int8'"),
        ({"clip_skip": 40}, "--clip-skip must be between 1 and 12, got 40"),  # as a replayed A1111 image may say
    ],
)
def test_validate_names_flag_and_value(changes, message):
    [job] = build("txt2img", {"prompt": "a red circle", **changes})
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(job)


def test_validate_accepts_defaults_and_cuda_index():
    assert check(build("txt2img", dict(prompt="x", device="cuda:1", dtype="bf16", seed=0))[0]).model.device == "cuda:1"


def test_size_multiple_suggests_a_valid_size():
    with pytest.raises(UsageError, match="multiples of 8 .* got 500x512 \\(try 496x512\\)"):
        check_size_multiple(500, 512, 8)
    check_size_multiple(512, 768, 8)
