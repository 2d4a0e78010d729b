"""`diffcli bench` runs and reports every figure (timings themselves are not asserted)."""

import json

import pytest


def test_bench_reports_plain_and_diffcli(cli, tiny_model):
    result = cli("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1,2",
                 "--repeats", "1", "--compare", "plain", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for path in ("plain", "diffcli"):
        assert set(report[path]) >= {"first_image_s", "ms_per_step", "s_per_image_end_to_end", "images_per_s_latents"}
        assert set(report[path]["images_per_s_latents"]) == {"1", "2"}
    assert report["speedup_ms_per_step"] > 0 and report["optimizations"][0].startswith("cpu threads")


@pytest.mark.slow  # starts a competing process
def test_bench_contended_reports_idle_and_contended_times_and_stops_its_competitor(cli, tiny_model, monkeypatch):
    import subprocess

    from diffcli import bench

    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(bench.subprocess, "Popen", Recorded)
    result = cli("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1",
                 "--repeats", "1", "--threads", "1", "--contended", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for path in ("diffcli", "contended"):
        assert set(report[path]) >= {"first_image_s", "ms_per_step", "s_per_image_end_to_end", "cpu_threads"}
    contention = report["contention"]
    assert set(contention) == {"competitor", "idle_s_per_image", "contended_s_per_image", "ratio", "idle_cpu_threads",
                               "contended_cpu_threads"}
    assert contention["idle_s_per_image"] == report["diffcli"]["s_per_image_end_to_end"] and contention["ratio"] > 0
    assert contention["idle_cpu_threads"] == contention["contended_cpu_threads"] == 1  # --threads wins under load too
    competitors = [process for process in started if bench.COMPETITOR in process.args]  # (not platform's `uname -p`)
    assert len(competitors) == 1 and competitors[0].poll() is not None  # the competitor was stopped
    table = cli("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1", "--repeats", "1",
                "--contended")
    assert table.exit_code == 0 and "contended:" in table.stdout and "x; cpu threads" in table.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--arch", "sd9"], "--arch must be one of"),
    (["--compare", "a1111"], "--compare takes a comma list of plain, openvino, sdcpp, got 'a1111'"),
    (["--compare", "plain,comfyui"], "got 'comfyui'"),
    (["--batch-sizes", "1,x"], "--batch-sizes must be a comma list"),
])
def test_bench_usage_errors(cli, args, message):
    result = cli("bench", *args)
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.gpu
def test_fast_path_matches_plain_on_cuda(tiny_model):
    """The compiled fp16 path gives nearly the same image as plain eager for the same seed (PSNR)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from diffcli.speed import optimize_cuda

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, torch_dtype=torch.float16).to("cuda")
    kwargs = dict(prompt="a cat", num_inference_steps=4, output_type="np")
    plain = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    optimize_cuda(pipe)
    fast = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    mse = float(np.mean((plain - fast) ** 2))
    psnr = 10 * np.log10(1 / max(mse, 1e-12))
    print(f"fast path PSNR vs plain: {psnr:.1f} dB")
    assert psnr > 30


def test_bench_reports_deep_cache_speed_and_psnr(cli, tiny_model):
    result = cli("bench", "--model", tiny_model, "--device", "cpu", "--steps", "4", "--batch-sizes", "1",
                 "--repeats", "1", "--deep-cache", "2", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    cache = report["deep_cache"]
    assert cache["interval"] == 2 and 0 < cache["psnr_vs_uncached_db"] < float("inf")  # it changed the image
    assert report["deep_cache_speedup_ms_per_step"] > 0 and "plain" in report


def test_bench_compare_openvino_says_when_it_cannot_run(cli, tiny_model, tmp_path, monkeypatch):
    """Without optimum-intel here the OpenVINO peer is reported as skipped (how to get it), and a Python that fails
    gives its last error line; plain and diffcli still run, with diffcli's PSNR against plain's seed-0 image."""
    import importlib.util

    if importlib.util.find_spec("optimum") is not None:
        pytest.skip("optimum is installed here")
    args = ("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1", "--repeats", "1",
            "--compare", "plain,openvino")
    monkeypatch.delenv("DIFFCLI_OPENVINO_PYTHON", raising=False)
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert "optimum-intel is not installed" in report["openvino"]["skipped"]
    assert report["diffcli"]["psnr_vs_plain_db"] > 40  # the same fp32 path as plain for this tiny model
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named optimum' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("DIFFCLI_OPENVINO_PYTHON", str(broken))
    table = cli(*args)
    assert table.exit_code == 0 and "openvino: ModuleNotFoundError: No module named optimum" in table.stdout


def test_the_openvino_peer_alternates_with_diffcli_image_by_image(cli, tiny_model, tmp_path, monkeypatch):
    """The OpenVINO peer's process stays after its own timings and makes one image per request, in turn with diffcli's
    path: the report has both medians and their ratio. Here a stand-in peer (this Python, the protocol of
    bench_openvino.py: one JSON result, then one JSON time per "image" line; other lines ignored) answers 0.25 s."""
    import sys

    served = tmp_path / "served.txt"
    fake = tmp_path / "peer.py"
    fake.write_text(
        "import json, sys\nimport numpy as np\nsettings = json.loads(sys.argv[3])\n"
        "np.save(settings['image'], np.zeros((settings['size'], settings['size'], 3), np.float32))\n"
        "print('a library says hello')\n"
        "print(json.dumps({'first_image_s': 1.0, 's_per_image_end_to_end': 0.5, 'load_s': 2.0, 'precision': "
        "settings['precision'], 'openvino': 'fake'}), flush=True)\n"
        "for line in sys.stdin:\n"
        f"    open({str(served)!r}, 'a').write(line)\n"
        "    print(json.dumps({'s': 0.25}), flush=True)\n")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setenv("DIFFCLI_OPENVINO_PYTHON", str(python))
    result = cli("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1", "--repeats",
                 "2", "--compare", "openvino", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["openvino"]["s_per_image_end_to_end"] == 0.5 and report["openvino"]["psnr_vs_plain_db"] < 20
    both = report["openvino_interleaved"]
    assert both["rounds"] == 5 and both["peer_s_per_image"] == 0.25 and both["diffcli_s_per_image"] > 0
    assert abs(both["ratio"] - 0.25 / both["diffcli_s_per_image"]) < 0.01 * both["ratio"]  # (from unrounded medians)
    assert served.read_text() == "image\n" * 5  # one request per round, then its stdin closed
    table = cli("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1", "--repeats",
                "1", "--compare", "openvino")
    assert "diffcli vs openvino, alternating image by image (5 rounds):" in table.stdout, table.stdout


@pytest.mark.parametrize("backend", ["torch", pytest.param("openvino", marks=pytest.mark.slow)])
def test_peers_run_while_the_benchs_weights_are_on_disk_when_two_copies_do_not_fit(cli, tiny_model, tmp_path,
                                                                                     monkeypatch, backend):
    """SDXL in fp32 twice is more than a 24 GiB machine holds: the bench writes its weights to disk and frees them
    while the peer runs, reads them back for diffcli's path (the same image as plain's), and says it did. When
    diffcli's path is OpenVINO, its IR is exported before the weights go, the peer exports alone (the "export_to"
    call) and then runs from its export, kept to alternate with diffcli's path."""
    import sys

    if backend == "openvino":
        pytest.importorskip("openvino")
    fake = tmp_path / "peer.py"
    fake.write_text(
        "import json, sys, pathlib\nimport numpy as np\nsettings = json.loads(sys.argv[3])\n"
        "folder = pathlib.Path(sys.argv[2])\n"
        "if settings.get('export_to'):\n"
        "    assert (folder / 'model_index.json').is_file()\n"
        "    (pathlib.Path(settings['export_to']) / 'unet').mkdir(parents=True)\n"
        "    (pathlib.Path(settings['export_to']) / 'unet' / 'openvino_model.xml').write_text('ir')\n"
        "    print(json.dumps({'export_s': 7.5}))\n"
        "    sys.exit()\n"
        "exported = (folder / 'unet' / 'openvino_model.xml').is_file()\n"
        "assert exported or (folder / 'model_index.json').is_file()\n"
        "np.save(settings['image'], np.zeros((settings['size'], settings['size'], 3), np.float32))\n"
        "print(json.dumps({'first_image_s': 1.0, 's_per_image_end_to_end': 0.5, 'load_s': 2.0, 'precision': "
        "settings['precision'], 'openvino': 'fake', 'serve': settings['serve'], 'exported': exported}), flush=True)\n"
        "for line in sys.stdin if settings['serve'] else ():\n"
        "    print(json.dumps({'s': 0.25}), flush=True)\n")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setenv("DIFFCLI_OPENVINO_PYTHON", str(python))
    monkeypatch.setattr("diffcli.bench.PEER_COPIES", 1e12)
    args = ("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1", "--repeats", "1",
            "--compare", "plain,openvino", "--backend", backend)
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    separate = backend == "openvino"
    assert report["peers_alone"]["alternated"] is separate and report["peers_alone"]["free"].endswith("GiB")
    assert report["openvino"]["serve"] is separate and report["openvino"]["exported"] is separate
    assert ("openvino_interleaved" in report) is separate and (report["openvino"].get("export_s") == 7.5) is separate
    assert report["diffcli"]["psnr_vs_plain_db"] > 35  # the weights read back (or exported) are the weights plain ran
    if separate:
        assert report["openvino_export_s"] > 0 and report["optimizations"][-1].startswith("openvino f32")
    table = cli(*args).stdout
    assert ("OpenVINO's export alone, then its compiled model beside diffcli's" in table) is separate, table
    assert ("export 7.5 s alone, compile 2.0 s" in table) is separate, table
    from diffcli.hashes import cache_dir

    assert not list(cache_dir().glob(".bench-stash-*"))


def test_bench_compare_sdcpp_says_when_it_cannot_run(cli, tiny_model, tmp_path, monkeypatch):
    """stable-diffusion.cpp's peer: skipped with how to get it when its bindings are missing; a Python that fails on
    the bench's single file gives its last error line (the tiny model is no SD version sd.cpp knows)."""
    import importlib.util

    args = ("bench", "--model", tiny_model, "--device", "cpu", "--steps", "3", "--batch-sizes", "1", "--repeats", "1",
            "--compare", "sdcpp", "--json")
    if importlib.util.find_spec("stable_diffusion_cpp") is None:
        monkeypatch.delenv("DIFFCLI_SDCPP_PYTHON", raising=False)
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
        assert "stable-diffusion-cpp-python is not installed" in json.loads(result.stdout)["sdcpp"]["skipped"]
    broken = tmp_path / "python"
    written = tmp_path / "given.txt"
    broken.write_text(f"#!/bin/sh\nhead -c 8 \"$2\" > /dev/null; ls -l \"$2\" > {written}\n"
                      "echo 'RuntimeError: unknown model version' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("DIFFCLI_SDCPP_PYTHON", str(broken))
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["sdcpp"] == {"failed": "RuntimeError: unknown model version"}
    assert "model.safetensors" in written.read_text()  # it was handed the original-layout single file


def test_the_peers_folder_has_the_hubs_text_encoder_layout(tiny_sdxl, tmp_path):
    """The folder handed to optimum-intel keeps the Hub's `text_model.` level (its older transformers would otherwise
    load random text encoders, and its PSNR would measure that); this transformers reads it back to the same weights."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from diffcli.bench import hub_layout_text_encoders

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.save_pretrained(tmp_path)
    hub_layout_text_encoders(tmp_path)
    for name in ("text_encoder", "text_encoder_2"):
        keys = list(load_file(next((tmp_path / name).glob("*.safetensors"))))
        assert keys and all(k.startswith(("text_model.", "text_projection.")) for k in keys), keys[:3]
        again = type(getattr(pipe, name)).from_pretrained(tmp_path / name)
        for (key, value), (_, read) in zip(getattr(pipe, name).state_dict().items(), again.state_dict().items()):
            assert torch.equal(value, read), key
