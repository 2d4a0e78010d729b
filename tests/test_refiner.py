"""The SD 1.x/2.x refiner: the refiner's UNet takes over inside the base pipeline's loop (the SDXL refiner is tested
in test_sdxl.py)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from task_inputs import write_photo

FAST = ("--steps", "4", "--quiet", "--seed", "3", "--scheduler", "euler-a")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def without_text_encoder(folder, out):
    """A copy of a model folder whose model_index names no text encoder or tokenizer (an sd-refiner)."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    index = json.loads((out / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None])
    (out / "model_index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_model):
    """The tiny model with other UNet weights and a zero-terminal-SNR v-prediction schedule."""
    import torch
    from diffusers import UNet2DConditionModel

    out = tmp_path_factory.mktemp("other") / "other-sd"
    shutil.copytree(tiny_model, out)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(out / "unet")
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    return out


def test_clean_and_noise_remake_the_sample_under_the_target_schedule():
    import torch

    from diffcli.refiner import clean_and_noise

    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    own, target = torch.tensor(0.6), torch.tensor(0.55)
    sample = own.sqrt() * x0 + (1 - own).sqrt() * eps
    for pred, v in ((eps, False), (own.sqrt() * eps - (1 - own).sqrt() * x0, True)):
        clean, noise = clean_and_noise(pred, sample, own, v, target)
        assert torch.allclose(clean, x0, atol=1e-5)
        assert torch.allclose(target.sqrt() * clean + (1 - target).sqrt() * noise, sample, atol=1e-5)


def test_stand_in_gives_the_refiners_clean_estimate_in_the_base_schedule(tiny_model, other_model):
    """An epsilon refiner under a v-prediction zero-SNR base: the v it returns means, under the base's alphas, the
    clean latents the refiner's epsilon means under its own, at the timestep whose alphas_cumprod is nearest."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel

    from diffcli.refiner import _converted_unet, alphas_cumprod

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    own = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    base = EulerAncestralDiscreteScheduler.from_pretrained(other_model / "scheduler")
    states = torch.randn(1, 77, 32)
    stand_in = _converted_unet(unet, own, base, unet.config, None)
    x = torch.randn(1, 4, 32, 32)
    a, own_alphas = alphas_cumprod(dict(base.config)), alphas_cumprod(own)
    with torch.no_grad():
        for t in (100, 400):
            v = stand_in(x, torch.tensor(float(t)), encoder_hidden_states=states, return_dict=False)[0]
            k = int((own_alphas - a[t]).abs().argmin())
            eps = unet(x, k, states).sample
            want = (x - (1 - own_alphas[k]).sqrt() * eps) / own_alphas[k].sqrt()
            assert torch.allclose(a[t].sqrt() * x - (1 - a[t]).sqrt() * v, want, atol=1e-4)
    assert stand_in.config is unet.config  # the pipeline reads its UNet's config while the stand-in runs


def test_model_refined_by_itself_is_the_model_alone(cli, tiny_model, tmp_path):
    assert cli("txt2img", "a cat", "--model", tiny_model, *FAST, "-o", "plain.png").exit_code == 0
    result = cli("txt2img", "a cat", "--model", tiny_model, *FAST, "--refiner", tiny_model, "--refiner-start", "0.5",
                 "-o", "self.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert (result.json_lines()[0]["refiner"], result.json_lines()[0]["refiner_start"]) == (str(tiny_model), 0.5)
    shared = without_text_encoder(tiny_model, tmp_path / "shared")  # reads the base's prompt embeddings
    result = cli("txt2img", "a cat", "--model", tiny_model, *FAST, "--refiner", shared, "--refiner-start", "0.5",
                 "-o", "shared.png")
    assert result.exit_code == 0, result.stderr
    for name in ("self.png", "shared.png"):
        assert np.abs(pixels(name) - pixels("plain.png")).max() <= 1, name


def test_refiner_takes_over_at_the_cut(cli, tiny_model, other_model):
    """A zero-SNR v-prediction base and an epsilon refiner: the image depends on where the refiner takes over, and
    differs from either model alone."""
    images = {}
    for name, args in (("base", ()), ("late", ("--refiner-start", "0.75")), ("early", ("--refiner-start", "0.25"))):
        refined = ("--refiner", tiny_model) if args else ()
        result = cli("txt2img", "a cat", "--model", other_model, *FAST, *refined, *args, "-o", f"{name}.png")
        assert result.exit_code == 0, result.stderr
        images[name] = pixels(f"{name}.png")
    assert cli("txt2img", "a cat", "--model", tiny_model, *FAST, "-o", "refiner.png").exit_code == 0
    images["refiner"] = pixels("refiner.png")
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(images[a] - images[b]).max() > 8, (a, b)


def test_model_default_refiner_and_refiner_none(cli, tiny_model, other_model, tmp_path):
    model = tmp_path / "with-refiner"
    shutil.copytree(other_model, model)
    (model / "diffcli.json").write_text(json.dumps({"refiner": str(tiny_model), "refiner_start": 0.5}))
    result = cli("txt2img", "a cat", "--model", model, *FAST, "-o", "default.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert (result.json_lines()[0]["refiner"], result.json_lines()[0]["refiner_start"]) == (str(tiny_model), 0.5)
    result = cli("txt2img", "a cat", "--model", model, *FAST, "--refiner-start", "0.75", "-o", "late.png", "--json")
    assert result.json_lines()[0]["refiner_start"] == 0.75
    result = cli("txt2img", "a cat", "--model", model, *FAST, "--refiner", "none", "-o", "none.png", "--json")
    assert result.exit_code == 0 and result.json_lines()[0]["refiner"] is None
    assert cli("txt2img", "a cat", "--model", other_model, *FAST, "-o", "plain.png").exit_code == 0
    assert np.abs(pixels("none.png") - pixels("plain.png")).max() <= 1
    assert np.abs(pixels("default.png") - pixels("plain.png")).max() > 8
    result = cli("txt2img", "a cat", "--model", other_model, *FAST, "--refiner-start", "0.5")
    assert result.exit_code == 2 and "--refiner-start needs a refiner" in result.stderr
    result = cli("txt2img", "a cat", "--model", model, *FAST, "--hires", "1.5", "--hires-upscaler", "lanczos",
                 "-o", "hires.png", "--json")  # --hires is not combined with a refiner yet: the model runs alone
    assert result.exit_code == 0 and "refiner" not in result.json_lines()[0], result.stderr
    photo = write_photo(tmp_path, (64, 64))  # img2img keeps the model alone
    result = cli("img2img", photo, "a dog", "--model", model, *FAST, "-o", "i2i.png", "--json")
    assert result.exit_code == 0 and "refiner" not in result.json_lines()[0]


def test_refiner_folder_without_text_encoder_runs_only_as_a_refiner(cli, tiny_model, tmp_path):
    shared = without_text_encoder(tiny_model, tmp_path / "shared")
    result = cli("txt2img", "a cat", "--model", shared, *FAST)
    assert result.exit_code == 2 and "sd-refiner model" in result.stderr and "use it as --refiner" in result.stderr


def test_refiner_must_match_the_base_family(cli, tiny_model, tiny_sdxl, tiny_sdxl_refiner, tiny_x4_upscaler):
    result = cli("txt2img", "a cat", "--model", tiny_model, "--refiner", tiny_sdxl_refiner, "--quiet")
    assert result.exit_code == 2 and "is a sdxl-refiner model, not an SD 1.x/2.x text-to-image model" in result.stderr
    result = cli("txt2img", "a cat", "--model", tiny_sdxl, "--refiner", tiny_model, "--quiet")
    assert result.exit_code == 2 and "is a sd1 model, not an SDXL refiner or SDXL model" in result.stderr
    result = cli("txt2img", "a cat", "--model", tiny_model, "--refiner", tiny_x4_upscaler, "--quiet")
    assert result.exit_code == 2 and "sd-x4-upscaler model" in result.stderr


def test_batch_jobs_with_an_sd_refiner_share_calls_and_match_their_images_alone(cli, tiny_model, other_model,
                                                                                 tmp_path, monkeypatch):
    """The refiner's own text encoder reads every job's prompt of a shared call, row by row."""
    from diffcli import run as generate

    model = tmp_path / "with-refiner"
    shutil.copytree(other_model, model)
    (model / "diffcli.json").write_text(json.dumps({"refiner": str(tiny_model), "refiner_start": 0.5}))
    calls, real = [], generate._generate_batch
    monkeypatch.setattr(generate, "_generate_batch", lambda pipe, plan, items, *args: (
        calls.append(len(items)), real(pipe, plan, items, *args))[1])
    (tmp_path / "j.txt").write_text("a red car\na blue boat\n")
    result = cli("batch", tmp_path / "j.txt", "--model", model, "--seed", "1", "--batch-size", "2", "-o", "together",
                 "--json", "-q", "--steps", "4")
    assert result.exit_code == 0 and calls == [2], result.stderr
    for record in result.json_lines():
        assert record["refiner"] == str(tiny_model)
        alone = cli("txt2img", record["prompt"], "--model", model, "--seed", record["seed"], "--steps", "4", "-q",
                    "-o", "alone.png", "--overwrite")
        assert alone.exit_code == 0
        assert np.abs(pixels(record["path"]) - pixels("alone.png")).max() <= 2, record["prompt"]


def test_sd2_refiner_with_its_own_text_encoder_runs_and_one_without_must_read_the_bases_width(cli, tiny_model, tiny_sd2,
                                                                                              tmp_path):
    result = cli("txt2img", "a cat", "--model", tiny_model, *FAST, "--refiner", tiny_sd2, "-o", "sd2.png", "--json")
    assert result.exit_code == 0 and result.json_lines()[0]["refiner"] == str(tiny_sd2), result.stderr
    shared = without_text_encoder(tiny_sd2, tmp_path / "sd2-unet")
    result = cli("txt2img", "a cat", "--model", tiny_model, *FAST, "--refiner", shared)
    assert result.exit_code == 2 and "reads 1024-wide prompt embeddings" in result.stderr and "are 32 wide" in result.stderr
