"""txt2img end to end through the real CLI on tiny real components."""

from pathlib import Path

import numpy as np
import pytest
from flow_models import tiny_flux  # noqa: F401 (a fixture)
from PIL import Image

from conftest import HUB_REPO, run_subprocess
from diffcli.output import read_metadata
from diffcli.pipeline import SCHEDULERS

FAST = ("--steps", "2", "--quiet")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_folder_model_writes_png_with_metadata(cli, tiny_model):
    result = cli("txt2img", "a red car", "-n", "blurry", "--model", tiny_model, "--seed", "7", "--cfg", "5", "--steps", "3")
    assert result.exit_code == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == Path("outputs/00000-7-a-red-car.png") and path.is_file()
    assert Image.open(path).size == (64, 64)
    meta = read_metadata(path)
    assert (meta["prompt"], meta["negative"], meta["seed"], meta["cfg"], meta["steps"]) == ("a red car", "blurry", 7, 5.0, 3)
    assert meta["model_hash"] and meta["generator_device"] == "cpu" and meta["dtype"] == "float32"
    assert "Seed: 7" in Image.open(path).info["parameters"]
    assert "seed 7" in result.stderr and "device cpu, dtype float32" in result.stderr


def test_same_seed_same_image_and_batch_equals_single(cli, tiny_model):
    batch = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "10", "-N", "3", "--batch-size", "3", "-o", "b-{seed}.png", *FAST)
    single = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "11", "-o", "single.png", *FAST)
    again = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "11", "-o", "again.png", *FAST)
    assert batch.exit_code == single.exit_code == again.exit_code == 0
    assert batch.stdout.split() == ["b-10.png", "b-11.png", "b-12.png"]
    assert np.array_equal(pixels("single.png"), pixels("again.png"))
    assert np.abs(pixels("b-11.png") - pixels("single.png")).max() <= 2  # batched kernels may differ in the last bit
    assert not np.array_equal(pixels("b-10.png"), pixels("b-11.png"))


def test_txt2img_equals_plain_diffusers_sd(cli, tiny_model):
    """Same seed, steps, cfg and size: diffcli's SD 1.x image is plain StableDiffusionPipeline's, with and without a
    negative prompt (SD encodes an empty negative as "" either way), within 2/255 (measured: 0)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    for seed, negative in ((1, ""), (2, "blurry")):
        result = cli("txt2img", "a red cat", "-n", negative, "--model", tiny_model, "--seed", seed, "--steps", "4",
                     "--cfg", "7.5", "--width", "64", "--height", "64", "--quiet", "-o", f"s{seed}.png")
        assert result.exit_code == 0, result.stderr
        expected = pipe("a red cat", negative_prompt=negative or None, num_inference_steps=4, guidance_scale=7.5, width=64,
                        height=64, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
        assert np.abs(pixels(f"s{seed}.png") - np.round(expected * 255)).max() <= 2, seed


@pytest.mark.parametrize("name", sorted(name for name, entry in SCHEDULERS.items() if not entry.flow_match))
def test_every_scheduler_runs(cli, tiny_model, name):
    result = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "1", "--scheduler", name, "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    (record,) = result.json_lines()
    assert record["scheduler"] == name and record["sampler"] == SCHEDULERS[name].label


def test_a1111_scheduler_names_are_accepted(cli, tiny_model):
    result = cli("txt2img", "a", "--model", tiny_model, "--scheduler", "DPM++ 2M Karras", "--json", *FAST)
    assert result.json_lines()[0]["scheduler"] == "dpm++2m-karras"


def test_sizes_and_size_errors(cli, tiny_model):
    result = cli("txt2img", "a", "--model", tiny_model, "--width", "48", "--height", "32", "-o", "s.png", *FAST)
    assert result.exit_code == 0 and Image.open("s.png").size == (48, 32)
    bad = cli("txt2img", "a", "--model", tiny_model, "--width", "33", *FAST)
    assert bad.exit_code == 2 and "multiples of 2" in bad.stderr


def test_json_output_has_path_seed_settings_timings(cli, tiny_model):
    result = cli("txt2img", "a dog", "--model", tiny_model, "--seed", "3", "-N", "2", "--json", *FAST)
    records = result.json_lines()
    assert [r["seed"] for r in records] == [3, 4] and [r["index"] for r in records] == [0, 1]
    assert all(Path(r["path"]).is_file() and set(r["timings"]) == {"load_s", "generate_s", "save_s", "peak_memory_gib"} for r in records)
    assert records[0]["versions"]["diffusers"] and records[0]["width"] == 64


def test_random_seed_is_reported(cli, tiny_model):
    result = cli("txt2img", "a dog", "--model", tiny_model, "--steps", "2", "--json")
    seed = result.json_lines()[0]["seed"]
    assert f"seed {seed}," in result.stderr


def test_no_overwrite_without_flag(cli, tiny_model):
    assert cli("txt2img", "a", "--model", tiny_model, "-o", "x.png", "--seed", "1", *FAST).exit_code == 0
    before = Path("x.png").read_bytes()
    refused = cli("txt2img", "a", "--model", tiny_model, "-o", "x.png", "--seed", "2", *FAST)
    assert refused.exit_code == 2 and "x.png already exists" in refused.stderr
    assert Path("x.png").read_bytes() == before
    assert cli("txt2img", "a", "--model", tiny_model, "-o", "x.png", "--seed", "2", "--overwrite", *FAST).exit_code == 0
    assert Path("x.png").read_bytes() != before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cfg", "abc"], "Invalid value for '--cfg'"),
        (["--steps", "0"], "--steps must be between 1 and 1000, got 0"),
        (["--scheduler", "nope"], "--scheduler 'nope' is unknown"),
        (["--device", "cuda"], "--device cuda is not available"),
        (["--device", "cpu", "--dtype", "fp16"], "--dtype fp16 is not supported on the CPU"),
        (["--model", "no/such-repo"], "not in the Hugging Face cache"),
        (["--model", "./missing.safetensors"], "no such file or folder"),
        (["--model", "justaword"], "is not a bundled model"),
        (["-o", "x.bmp"], "unsupported image type '.bmp'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(cli, tiny_model, args, message):
    model = [] if "--model" in args else ["--model", str(tiny_model)]
    result = cli("txt2img", "a cat", "--steps", "1", *model, *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not Path("outputs").exists()


def test_interrupt_exits_130_and_keeps_finished_images(cli, tiny_model, monkeypatch):
    from diffcli import run as generate

    real = generate._generate_batch
    calls = []

    def interrupt_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "_generate_batch", interrupt_second_batch)
    result = cli("txt2img", "a", "--model", tiny_model, "-N", "3", "--seed", "1", "-o", "i-{seed}.png", *FAST)
    assert result.exit_code == 130 and result.stdout.split() == ["i-1.png"]
    assert sorted(p.name for p in Path().iterdir() if not p.name.startswith(".diffcli")) == ["i-1.png"]


def test_non_finite_latents_fail_without_saving(tiny_model):
    from diffcli.errors import RuntimeFailure
    from diffcli import run
    from diffcli.jobs import build
    from diffcli.plan import plan_job

    plan = plan_job(build("txt2img", dict(prompt="a", model=str(tiny_model), steps=2, seed=1, out="nan.png"))[0])
    real_caller = run._caller

    def caller(pipe, rows, one, steps, cfg, on_step_end, *rest):
        def poisoned(pipeline, step, timestep, tensors):
            tensors["latents"].fill_(float("nan"))
            return on_step_end(pipeline, step, timestep, tensors)

        return real_caller(pipe, rows, one, steps, cfg, poisoned, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "_caller", caller)
        with pytest.raises(RuntimeFailure, match="NaN/Inf"):
            run.run_plan(plan, lambda record: None)
    assert not Path("nan.png").exists()


def test_single_file_checkpoint_matches_the_folder(cli, tiny_model, tiny_checkpoint):
    common = ("txt2img", "a cat", "--seed", "5", *FAST)
    single = cli(*common, "--model", tiny_checkpoint, "--model-config", tiny_model, "-o", "single.png", "--json")
    folder = cli(*common, "--model", tiny_model, "-o", "folder.png")
    assert single.exit_code == folder.exit_code == 0, single.stderr
    assert single.json_lines()[0]["model"] == str(tiny_checkpoint)
    assert np.array_equal(pixels("single.png"), pixels("folder.png"))
    assert read_metadata("single.png")["model_config"] == str(tiny_model)  # replay needs it: the file alone fails
    again = cli("replay", "single.png", "--verify", "-o", "again.png")
    assert again.exit_code == 0 and "verify: identical to single.png" in again.stderr, again.stderr


def test_non_standard_single_file_needs_model_config(cli, tiny_checkpoint):
    result = cli("txt2img", "a cat", "--model", tiny_checkpoint, *FAST)
    assert result.exit_code == 2 and "tiny.safetensors" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # starts a process
def test_hub_id_from_prefilled_cache_offline(hf_cache, tmp_path):
    result = run_subprocess("txt2img", "a cat", "--model", HUB_REPO, "--seed", "1", "--steps", "2", "-o", "hub.png",
                            env={"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_metadata(tmp_path / "hub.png")["model"] == HUB_REPO


def test_hub_configs_are_fetched_once_per_process(tiny_model, monkeypatch):
    import huggingface_hub

    from diffcli.models import resolve_model

    fetched = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: fetched.append(name) or str(tiny_model / name))
    first, again = resolve_model("diffcli-test/fetch-once"), resolve_model("diffcli-test/fetch-once")
    assert first == again and first.source == "hub" and first.location == "diffcli-test/fetch-once"
    assert sorted(fetched) == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"]


@pytest.mark.slow  # starts a process
def test_help_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from diffcli.cli import main\n"
        "for command in ('txt2img', 'img2img', 'inpaint', 'outpaint', 'upscale', 'batch', 'bench', 'eval', 'schedulers', 'info',\n"
        "                'serve', 'preprocess'):\n"
        "    assert main([command, '--help']) == 0, command\n"
        "for args in (['--help'], ['--version']):\n"
        "    assert main(args) == 0, args\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'fastapi', 'uvicorn', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_speed_and_memory_switches_are_accepted_on_the_cpu(cli, tiny_model):
    """--no-optimize and --low-vram only change CUDA runs; on the CPU they must still parse and run."""
    result = cli("txt2img", "a", "--model", tiny_model, "--no-optimize", "--low-vram", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["optimizations"][0].startswith("cpu threads")


def test_schedulers_and_info_commands(cli):
    listing = cli("schedulers")
    assert listing.exit_code == 0 and "dpm++2m-karras" in listing.stdout and "Euler a" in listing.stdout
    info = cli("info", "--json")
    assert info.exit_code == 0 and '"cpu_threads"' in info.stdout


@pytest.mark.gpu
def test_cuda_fp16_matches_cpu_seed(cli, tiny_model):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "4", "--device", "cuda", "-o", "gpu.png", "--json", *FAST)
    cpu = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "4", "--device", "cpu", "-o", "cpu.png", *FAST)
    assert gpu.exit_code == cpu.exit_code == 0, gpu.stderr
    assert gpu.json_lines()[0]["dtype"] == "float16"
    assert np.abs(pixels("gpu.png") - pixels("cpu.png")).mean() < 8  # same noise from the CPU generator


def test_deep_cache_reuses_features_between_full_steps_only(cli, tiny_model):
    """Step 1 always runs the whole U-Net, so one step is identical; later cached steps change the image."""
    import numpy as np
    from PIL import Image

    from diffcli.output import read_metadata

    def run(name, *args):
        result = cli("txt2img", "a cat", "--model", tiny_model, "--seed", "2", "--quiet", "-o", name, *args)
        assert result.exit_code == 0, result.stderr
        return np.asarray(Image.open(name), dtype=int)

    assert np.array_equal(run("one.png", "--steps", "1"), run("one-cached.png", "--steps", "1", "--deep-cache", "3"))
    assert np.abs(run("four.png", "--steps", "4") - run("four-cached.png", "--steps", "4", "--deep-cache", "3")).max() > 0
    assert read_metadata("four-cached.png")["deep_cache"] == 3

    from diffcli import pipeline  # the hooks are gone after the run: the cached pipeline is plain again

    for loaded in pipeline._CACHE.values():
        for pipe in loaded.values():  # (the U-Net ones: SD3/FLUX.1 pipelines other tests loaded have none)
            assert getattr(pipe, "unet", None) is None or "forward" not in vars(pipe.unet.mid_block)


def test_schedulers_of_a_model_lists_what_its_family_takes(cli):
    sd = cli("schedulers", "--model", "tiny-shapes")
    assert sd.exit_code == 0 and "flow-euler" not in sd.stdout
    assert [line.split()[0] for line in sd.stdout.splitlines() if "*" in line] == ["euler-a"]  # its diffcli.json's
    everything = cli("schedulers")
    assert "flow-euler" in everything.stdout and "ddim" in everything.stdout
    bad = cli("schedulers", "--model", "./nowhere")
    assert bad.exit_code == 2


def test_schedulers_of_a_flow_model(cli, tiny_flux):
    result = cli("schedulers", "--model", tiny_flux)
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["flow-euler"] and "*" in result.stdout


@pytest.mark.parametrize("aspect, width, height, expected", [
    ("16:9", None, None, (168, 96)), ("2:3", None, None, (104, 160)), ("1.5", None, None, (160, 104)),
    ("16:9", 256, None, (256, 144)), ("1:2", None, 64, (32, 64)),
])
def test_aspect_picks_a_size_of_about_the_native_area(aspect, width, height, expected):
    from diffcli.plan import size_for_aspect

    assert size_for_aspect(aspect, width, height, 128, 8) == expected


def test_aspect_through_the_cli_and_its_errors(cli, isolated):
    made = cli("txt2img", "a red circle", "--aspect", "16:9", *FAST, "--json", "-o", "wide.png")
    assert made.exit_code == 0, made.stderr
    assert Image.open("wide.png").size == (168, 96)
    assert made.json_lines()[0]["timings"]["peak_memory_gib"] > 0  # the process's resident peak on the CPU
    for args, message in ((("--aspect", "0:1"), "--aspect must be"), (("--aspect", "wide"), "--aspect must be"),
                          (("--aspect", "16:9", "--width", "128", "--height", "64"), "one of the three"),
                          (("--aspect", "1:10", "--width", "8192"), "makes the image 8192x81920, over the 8192 px limit"),
                          (("--aspect", "10", "--height", "1024"), "over the 8192 px limit")):
        result = cli("txt2img", "a red circle", *args, *FAST)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
