"""`diffcli edit`: instruction editing with FLUX.1 Kontext and Qwen-Image-Edit on tiny real components, through the CLI:
equal to the plain diffusers pipeline, the output at the input's size, the metadata, a batch line, a replay, and what
cannot edit (or takes one image) refused with exit 2 before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flow_models import FAST, SIZE, TOLERANCE, qwen_vl_without_torchvision, tiny_flux, tiny_flux_kontext, tiny_qwen_image, tiny_qwen_image_edit, tiny_qwen_image_edit_plus  # noqa: F401 (fixtures)
from PIL import Image
from task_inputs import pixels, write_photo

from diffcli.output import read_metadata

KONTEXT = {"guidance_scale": 2.5}  # its registry default --cfg (distilled guidance)


def edit_image(class_name: str, folder, prompt: str, seed: int = 1, **kwargs) -> np.ndarray:
    """The plain diffusers edit pipeline's image as 8-bit values, with the CLI's generator and 2 steps (the edit
    pipelines take the image first, so the prompt goes by name)."""
    import diffusers
    import torch

    pipe = getattr(diffusers, class_name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=prompt, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="np", **kwargs).images[0]
    return np.round(image * 255)


def kontext_image(folder, photo, prompt: str, seed: int = 1, size=SIZE, **kwargs) -> np.ndarray:
    """Diffusers' FluxKontextPipeline at the input's size: max_area is the size's area and the input is not moved to a
    trained resolution, as diffcli calls it."""
    return edit_image("FluxKontextPipeline", folder, prompt, seed=seed, image=Image.open(photo), width=size[0],
                      height=size[1], max_area=size[0] * size[1], _auto_resize=False, **{**KONTEXT, **kwargs})


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights load (plan-time refusals)."""
    monkeypatch.setattr("diffcli.pipeline._load_weights", lambda *a, **k: pytest.fail("a model was loaded"))


def test_kontext_folder_resolves_to_its_family_and_defaults(tiny_flux_kontext):
    from diffcli.models import resolve_model

    spec = resolve_model(str(tiny_flux_kontext))
    assert (spec.family, spec.guidance, spec.defaults, spec.size_multiple) == ("flux-kontext", "distilled",
                                                                               {"steps": 28, "cfg": 2.5}, 16)


def test_kontext_edit_equals_diffusers_in_one_call(cli, tiny_flux_kontext, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    result = cli("edit", photo, "make it blue", "--model", tiny_flux_kontext, *FAST, "--num-images", "2",
                 "--batch-size", "2", "-o", "e-{seed}.png", "--json")
    assert result.exit_code == 0, result.stderr
    records = result.json_lines()
    assert [r["path"] for r in records] == ["e-1.png", "e-2.png"]
    for seed in (1, 2):  # one call of two: each image as its seed alone
        assert Image.open(f"e-{seed}.png").size == SIZE  # the input's size, not 1 MP
        assert np.abs(pixels(f"e-{seed}.png") - kontext_image(tiny_flux_kontext, photo, "make it blue", seed)).max() <= TOLERANCE
    meta = read_metadata("e-1.png")
    assert (meta["task"], meta["model_family"], meta["guidance"], meta["cfg"], meta["steps"], meta["input"]) == (
        "edit", "flux-kontext", "distilled", 2.5, 2, str(photo))
    assert "images" not in meta and meta["warnings"] == []
    parameters = Image.open("e-1.png").info["parameters"]
    assert parameters.startswith("make it blue\n") and "Distilled CFG Scale: 2.5, Seed: 1" in parameters


def test_kontext_edit_takes_width_and_height(cli, tiny_flux_kontext, tmp_path):
    photo = write_photo(tmp_path, (70, 50))  # 64x48 when rounded down to the multiple of 16
    result = cli("edit", photo, "make it blue", "--model", tiny_flux_kontext, "--width", "32", "--height", "32",
                 "--resize", "stretch", "--cfg", "3", *FAST, "-o", "s.png")
    assert result.exit_code == 0, result.stderr
    assert Image.open("s.png").size == (32, 32)
    stretched = tmp_path / "stretched.png"
    Image.open(photo).resize((32, 32)).save(stretched)
    expected = kontext_image(tiny_flux_kontext, stretched, "make it blue", size=(32, 32), guidance_scale=3.0)
    assert np.abs(pixels("s.png") - expected).max() <= TOLERANCE
    result = cli("edit", photo, "make it blue", "--model", tiny_flux_kontext, *FAST, "-o", "r.png")
    assert result.exit_code == 0 and Image.open("r.png").size == (64, 48), result.stderr


def test_a_batch_line_edits(cli, tiny_flux_kontext, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    line = {"command": "edit", "input": str(photo), "prompt": "make it blue", "model": str(tiny_flux_kontext),
            "steps": 2, "seed": 1}
    Path("jobs.jsonl").write_text(json.dumps(line) + "\n")
    result = cli("batch", "jobs.jsonl", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["task"], record["model_family"], record["cfg"]) == ("edit", "flux-kontext", 2.5)
    assert np.abs(pixels(record["path"]) - kontext_image(tiny_flux_kontext, photo, "make it blue")).max() <= TOLERANCE


def test_replay_makes_an_edit_again(cli, tiny_flux_kontext, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    made = cli("edit", photo, "make it blue", "--model", tiny_flux_kontext, "--cfg", "4", *FAST, "-o", "r.png")
    assert made.exit_code == 0, made.stderr
    result = cli("replay", "r.png", "--verify", "-o", "again.png")
    assert result.exit_code == 0 and "verify: identical to r.png" in result.stderr, result.stderr


@pytest.mark.parametrize("model, args, message", [
    ("tiny_model", [], "edit: '{model}' (sd1) cannot edit from an instruction (edit runs FLUX.1 Kontext and "
                       "Qwen-Image-Edit models"),
    (None, [], "edit: 'tiny-shapes' (sd1) cannot edit from an instruction"),  # the bundled model
    ("tiny_flux", [], "edit: '{model}' (flux) cannot edit from an instruction"),  # FLUX.1 dev without Kontext
    ("tiny_flux_kontext", ["--image", "{photo}"], "--image: '{model}' (flux-kontext) edits one image, got 1 reference"),
    ("tiny_flux_kontext", ["--deep-cache", "3"], "--deep-cache: works with U-Net models"),
    ("tiny_flux_kontext", ["--scheduler", "dpm++2m"], "is a flow-matching model (flux-kontext) and takes flow-euler"),
], ids=["sd1", "bundled", "flux-dev", "one-image", "deep-cache", "scheduler"])
def test_what_cannot_edit_is_refused_before_loading(cli, request, no_loading, tmp_path, model, args, message):
    photo = write_photo(tmp_path, SIZE)
    folder = request.getfixturevalue(model) if model else None
    model_args = ["--model", folder] if folder else []
    args = [a.format(photo=photo) for a in args]
    result = cli("edit", photo, "make it blue", *model_args, *args)
    assert result.exit_code == 2 and message.format(model=folder) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_inputs_are_refused_before_loading(cli, tiny_flux_kontext, no_loading, tmp_path):
    result = cli("edit", tmp_path / "missing.png", "make it blue", "--model", tiny_flux_kontext)
    assert result.exit_code == 2 and "missing.png" in result.stderr, result.stderr
    (tmp_path / "not-an-image.png").write_text("hello")
    result = cli("edit", tmp_path / "not-an-image.png", "make it blue", "--model", tiny_flux_kontext)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = cli("txt2img", "a cat", "--model", tiny_flux_kontext)
    assert result.exit_code == 2 and "edits an image from an instruction (diffcli edit IMAGE PROMPT)" in result.stderr


def test_edit_through_the_server_equals_a_local_edit(cli, tiny_flux_kontext, tmp_path):
    """`diffcli edit --server URL` sends IMAGE in the request (never a path the server would read) and writes the
    image and metadata here as a local edit does; a request's `image` must be base64 images, not paths."""
    pytest.importorskip("fastapi")
    from test_server import post, serving

    photo = write_photo(tmp_path, SIZE)
    local = cli("edit", photo, "make it blue", "--model", tiny_flux_kontext, *FAST, "-o", "local.png")
    assert local.exit_code == 0, local.stderr
    with serving(model=str(tiny_flux_kontext)) as (url, app):
        remote = cli("edit", photo, "make it blue", "--model", Path(tiny_flux_kontext).name, *FAST, "--server", url,
                     "-o", "remote.png", "--json")
        assert remote.exit_code == 0, remote.stderr
        assert np.array_equal(pixels("remote.png"), pixels("local.png"))
        meta = read_metadata("remote.png")
        assert (meta["task"], meta["input"], meta["model_family"]) == ("edit", str(photo), "flux-kontext")
        status, answer = post(url, "/diffcli/v1/plan", {"command": "edit", "prompt": "x", "image": "/etc/passwd"})
        assert status == 422 and "expected a list of base64 images" in json.dumps(answer)


# --- Qwen-Image-Edit: transformers' Qwen2-VL processor needs torchvision (its video processor) to be built or loaded


def _as_edit_folder(source: Path, folder: Path, class_name: str) -> Path:
    """A Qwen-Image folder relabelled as an edit pipeline's (configs only: what resolving and planning read)."""
    import shutil

    shutil.copytree(source, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name=class_name, processor=["transformers", "Qwen2VLProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def qwen_edit_configs(tiny_qwen_image, tmp_path) -> dict:
    return {name: _as_edit_folder(tiny_qwen_image, tmp_path / name, cls) for name, cls in
            (("edit", "QwenImageEditPipeline"), ("plus", "QwenImageEditPlusPipeline"))}


def test_qwen_edit_folders_resolve_to_their_families_and_defaults(qwen_edit_configs):
    from diffcli.models import resolve_model

    edit, plus = resolve_model(str(qwen_edit_configs["edit"])), resolve_model(str(qwen_edit_configs["plus"]))
    assert (edit.family, edit.guidance, edit.defaults, edit.size_multiple) == ("qwen-image-edit", "cfg",
                                                                               {"steps": 50, "cfg": 4.0}, 16)
    assert (plus.family, plus.defaults) == ("qwen-image-edit-plus", {"steps": 40, "cfg": 4.0})


def test_qwen_edit_without_torchvision_is_refused_before_loading(cli, qwen_edit_configs, no_loading, monkeypatch,
                                                                 tmp_path):
    import diffcli.extras

    monkeypatch.setattr(diffcli.extras, "available", lambda module: module != "torchvision")
    result = cli("edit", write_photo(tmp_path, SIZE), "make it blue", "--model", qwen_edit_configs["edit"])
    assert result.exit_code == 2 and "needs the package torchvision, which is not installed" in result.stderr


@pytest.mark.slow  # the edit pipelines encode the input at about 1 MP whatever its size (~20 s a call on a CPU)
def test_qwen_edit_equals_diffusers_one_image_per_call(cli, tiny_qwen_image_edit, tmp_path):
    photo = write_photo(tmp_path, SIZE)
    result = cli("edit", photo, "make it blue", "--model", tiny_qwen_image_edit, "-n", "blurry", "--cfg", "3", *FAST,
                 "--num-images", "2", "--batch-size", "2", "-o", "q-{seed}.png", "--json")
    assert result.exit_code == 0, result.stderr
    for seed in (1, 2):  # --batch-size 2 runs one image per call: its processor reads one input image per prompt
        expected = edit_image("QwenImageEditPipeline", tiny_qwen_image_edit, "make it blue", seed=seed,
                                   image=Image.open(photo), width=SIZE[0], height=SIZE[1], negative_prompt="blurry",
                                   true_cfg_scale=3.0)
        assert np.abs(pixels(f"q-{seed}.png") - expected).max() <= TOLERANCE
    meta = read_metadata("q-1.png")
    assert (meta["task"], meta["model_family"], meta["cfg"]) == ("edit", "qwen-image-edit", 3.0)


@pytest.mark.slow
def test_qwen_edit_plus_takes_reference_images(cli, tiny_qwen_image_edit_plus, tmp_path):
    photo, reference = write_photo(tmp_path, SIZE), write_photo(tmp_path, (32, 48), name="ref.png")
    result = cli("edit", photo, "put picture 2 on the left", "--image", reference, "--model", tiny_qwen_image_edit_plus,
                 *FAST, "-o", "p.png")
    assert result.exit_code == 0, result.stderr
    expected = edit_image("QwenImageEditPlusPipeline", tiny_qwen_image_edit_plus, "put picture 2 on the left",
                               image=[Image.open(photo), Image.open(reference)], width=SIZE[0], height=SIZE[1],
                               negative_prompt="", true_cfg_scale=4.0)
    assert np.abs(pixels("p.png") - expected).max() <= TOLERANCE
    meta = read_metadata("p.png")
    assert (meta["model_family"], meta["images"], meta["steps"]) == ("qwen-image-edit-plus", [str(reference)], 2)
    result = cli("edit", photo, "make it blue", "--image", tmp_path / "nope.png", "--model", tiny_qwen_image_edit_plus)
    assert result.exit_code == 2 and "--image" in result.stderr and "nope.png" in result.stderr, result.stderr


def test_a_kontext_transformer_file_with_its_base_edits(cli, tiny_flux_kontext, tmp_path):
    """A Kontext transformer file (GGUF or .safetensors) has FLUX.1 dev's layout: the Kontext base says the pipeline."""
    import shutil

    photo = write_photo(tmp_path, SIZE)
    path = tmp_path / "flux1-kontext-tiny.safetensors"
    shutil.copy(next((tiny_flux_kontext / "transformer").glob("*.safetensors")), path)
    from_file = cli("edit", photo, "make it blue", "--model", path, "--base", tiny_flux_kontext, "--cfg", "4", *FAST,
                    "-o", "file.png", "--json")
    folder = cli("edit", photo, "make it blue", "--model", tiny_flux_kontext, "--cfg", "4", *FAST, "-o", "folder.png")
    assert from_file.exit_code == folder.exit_code == 0, from_file.stderr
    assert from_file.json_lines()[0]["model_family"] == "flux-kontext"
    assert np.abs(pixels("file.png") - pixels("folder.png")).max() <= TOLERANCE
