"""`diffcli serve` and `--server URL`: A1111's API through a real A1111 client (webuiapi), the diffcli client for every
command, limits, auth, hostile requests, a bounded load test and SIGTERM. The server runs in-process on a free
loopback port (uvicorn in a thread) with the bundled model; the SIGTERM test starts a real process."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("fastapi")

FAST = {"steps": 3, "cfg_scale": 3, "width": 128, "height": 128, "sampler_name": "Euler a"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(**options):
    """A diffcli server in this process; yields (url, app)."""
    import uvicorn

    from diffcli.server.start import ServeOptions, build, check

    settings = ServeOptions(port=free_port(), preload=False, **options)
    app, broker = build(settings, check(settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield url, app
    finally:
        broker.drain()
        server.should_exit = True
        thread.join(30)
        broker.stop()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_model, folder / "tiny-sd")
    (folder / "notes.txt").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def server(models_dir):
    with serving(models_dir=str(models_dir), queue=8) as (url, app):
        yield url


def api_of(url: str, **auth):
    port = int(url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, **auth)


def post(url: str, route: str, body, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON or text) of a POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + route, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read(), exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- A1111's API through webuiapi ---------------------------------------------------------------------------------

def test_webuiapi_txt2img_matches_a_local_run(server, cli, isolated):
    result = api_of(server).txt2img(prompt="a red circle on a blue background", seed=7, **FAST)
    assert result.image.size == (128, 128)
    assert result.info["all_seeds"] == [7]
    text = result.image.info["parameters"]
    assert "Seed: 7" in text and "Steps: 3" in text and "Sampler: Euler a" in text and "Model: tiny-shapes" in text
    local = cli("txt2img", "a red circle on a blue background", "--seed", "7", "--steps", "3", "--cfg", "3",
                "--scheduler", "euler-a", "-o", "local.png", "-q")
    assert local.exit_code == 0, local.stderr
    # same process, same code path, same threads: the same pixels
    assert np.array_equal(np.asarray(result.image.convert("RGB"), dtype=np.int16), pixels("local.png"))


def test_webuiapi_img2img_with_mask_inpaints_and_keeps_the_rest(server):
    api = api_of(server)
    source = Image.new("RGB", (128, 128), (200, 40, 40))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    result = api.img2img(images=[source], mask_image=mask, prompt="a blue square", seed=3, denoising_strength=0.9,
                         inpainting_fill=1, mask_blur=0, **FAST)
    out = np.asarray(result.image.convert("RGB"), dtype=np.int16)
    assert out.shape == (128, 128, 3)
    assert np.array_equal(out[:16, :16], np.asarray(source, dtype=np.int16)[:16, :16])  # outside the mask: exact
    assert "Denoising strength: 0.9" in result.info["infotexts"][0]
    plain = api.img2img(images=[source], prompt="a blue square", seed=3, denoising_strength=0.5, **FAST)
    assert plain.image.size == (128, 128)


def test_options_switch_the_model_and_sd_models_lists_the_folder(server):
    api = api_of(server)
    titles = [model["title"] for model in api.get_sd_models()]
    assert any(title.startswith("tiny-sd [") for title in titles)
    assert not any("notes" in title for title in titles)
    api.set_options({"sd_model_checkpoint": "tiny-sd"})
    try:
        assert api.get_options()["sd_model_checkpoint"].startswith("tiny-sd [")
        result = api.txt2img(prompt="a cat", seed=1, steps=2, width=64, height=64)
        assert result.info["sd_model_name"] == "tiny-sd"
    finally:
        api.set_options({"sd_model_checkpoint": "tiny-shapes"})
    override = api.txt2img(prompt="a cat", seed=1, steps=2, width=64, height=64,
                           override_settings={"sd_model_checkpoint": "tiny-sd"})
    assert override.info["sd_model_name"] == "tiny-sd"
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny-shapes [")


def test_png_info_reads_back_the_parameters(server):
    api = api_of(server)
    made = api.txt2img(prompt="a green star", seed=11, **FAST)
    info = api.png_info(made.image)
    assert info.parameters["Seed"] == "11" and info.parameters["Prompt"] == "a green star"
    assert json.loads(info.json["items"]["diffcli"])["seed"] == 11


def test_lists_and_extras(server):
    api = api_of(server)
    assert {"name": "Euler a", "aliases": ["euler-a"], "options": {}} in api.get_samplers()
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    source = Image.new("RGB", (32, 32), (10, 200, 10))
    assert api.extra_single_image(image=source, upscaler_1="Lanczos", upscaling_resize=2).image.size == (64, 64)
    assert api.extra_single_image(image=source, upscaler_1="SD x4", upscaling_resize=4).image.size == (128, 128)
    status, body = post(server, "/sdapi/v1/extra-single-image", {"image": b64(source), "upscaler_1": "R-ESRGAN 4x+"})
    assert status == 422 and "upscaler_1" in body["detail"]


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "steps": "many"}, "steps"),
    ({"prompt": "x", "sampler_name": "Nope"}, "sampler_name"),
    ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "sd_model_checkpoint"),
    ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "sd_model_checkpoint"),
    ({"prompt": "x", "restore_faces": True}, "restore_faces"),
    ({"prompt": "x", "steps": 500}, "steps"),
    ({"prompt": "x", "width": 4096, "height": 4096}, "pixels"),
    ({"prompt": "x", "batch_size": 8, "n_iter": 8}, "images"),
])
def test_bad_requests_are_422_naming_the_field(server, body, field):
    status, answer = post(server, "/sdapi/v1/txt2img", body)
    assert status == 422, answer
    assert field in answer["detail"]


def test_unknown_fields_are_ignored_as_a1111_does(server):
    status, answer = post(server, "/sdapi/v1/txt2img", {"prompt": "a circle", "seed": 1, "steps": 2, "width": 64,
                                                         "height": 64, "some_future_field": {"x": 1}})
    assert status == 200 and len(answer["images"]) == 1


def test_hostile_images_and_bodies(server):
    status, answer = post(server, "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["not base64 !!"]})
    assert status == 422 and "base64" in answer["detail"]
    status, answer = post(server, "/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"GIF89a broken").decode()]})
    assert status == 422 and "diffcli-request" not in answer["detail"]  # no server paths in messages
    status, answer = post(server, "/sdapi/v1/txt2img", None, raw=b"{not json")
    assert status == 422
    port = int(server.rsplit(":", 1)[1])
    for headers, body in ((f"Content-Length: {65 * 2**20}\r\n", b""),  # declared too large: refused before reading
                          ("Transfer-Encoding: chunked\r\n", b"".join(  # chunked: counted while it arrives
                              b"100000\r\n" + b"x" * 2**20 + b"\r\n" for _ in range(66)) + b"0\r\n\r\n")):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.sendall(f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
            try:
                connection.sendall(body)
            except OSError:  # the server may answer and close before all of it is sent
                pass
            assert connection.recv(200).startswith(b"HTTP/1.1 413")


def test_native_requests_refuse_trust_files_and_paths(server):
    for body in ({"prompt": "x", "allow_pickle": True}, {"prompt": "x", "model": "/etc/passwd"}, {"prompt": "x", "base": "/"},
                 {"prompt": "x", "vae": "/etc/passwd"}, {"prompt": "x", "out": "/tmp/x.png"},
                 {"prompt": "x", "lora": ["/etc/passwd"]}, {"command": "batch", "prompt": "x"}):
        status, answer = post(server, "/diffcli/v1/plan", body)
        assert status == 422, (body, answer)
    status, answer = post(server, "/diffcli/v1/plan", {"prompt": "a <lora:../../etc/passwd:1> cat"})
    assert status == 422


def test_a_failed_job_answers_with_an_error_and_the_server_keeps_serving(server, monkeypatch):
    from diffcli import run
    from diffcli.errors import RuntimeFailure

    real = run.images

    def failing(*args, **kwargs):
        raise RuntimeFailure("the model produced NaN/Inf values; no image was saved")
        yield  # a generator, as run.images

    monkeypatch.setattr(run, "images", failing)
    status, answer = post(server, "/sdapi/v1/txt2img", {"prompt": "a circle", "seed": 1, "steps": 2})
    assert status == 500 and "NaN" in answer["detail"]
    monkeypatch.setattr(run, "images", real)
    status, answer = post(server, "/sdapi/v1/txt2img", {"prompt": "a circle", "seed": 1, "steps": 2})
    assert status == 200


def in_background(url: str, body: dict):
    """POST body to txt2img in a thread; (thread, results): results["r"] is (status, answer) once it ends."""
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("r", post(url, "/sdapi/v1/txt2img", body)))
    worker.start()
    return worker, results


def progress_when(api, ready) -> dict | None:
    """The first /progress answer `ready` accepts, polled for up to 30 s (None: never)."""
    for _ in range(600):
        state = api.get_progress()
        if ready(state["state"]):
            return state
        time.sleep(0.05)
    return None


@pytest.mark.slow  # waits on a running job
def test_progress_preview_and_interrupt(server):
    api = api_of(server)
    worker, results = in_background(server, {"prompt": "a circle", "seed": 1, "steps": 120, "n_iter": 3, "width": 128,
                                             "height": 128})
    seen = progress_when(api, lambda state: state["sampling_step"] > 1)
    assert seen is not None and 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 120
    assert seen["current_image"] is not None and Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).size == (16, 16)
    api.interrupt()
    worker.join(60)
    status, answer = results["r"]
    assert status == 200 and len(answer["images"]) < 3  # stopped early; what was finished is kept


# --- the diffcli client --------------------------------------------------------------------------------------------

def test_client_txt2img_names_writes_and_matches_local(server, cli, isolated):
    remote = cli("txt2img", "a red circle", "--seed", "5", "--steps", "3", "-N", "2", "--server", server, "--json", "-q")
    assert remote.exit_code == 0, remote.stderr
    records = remote.json_lines()
    assert [Path(r["path"]).name for r in records] == ["00000-5-a-red-circle.png", "00001-6-a-red-circle.png"]
    local = cli("txt2img", "a red circle", "--seed", "5", "--steps", "3", "-N", "2", "-o", "local/", "--json", "-q")
    for mine, theirs in zip(records, local.json_lines()):
        assert np.array_equal(pixels(mine["path"]), pixels(theirs["path"]))
        assert mine["id"] == theirs["id"]
        assert json.loads(Image.open(mine["path"]).info["diffcli"])["seed"] == mine["seed"]
    again = cli("txt2img", "a red circle", "--seed", "5", "--steps", "3", "-o", records[0]["path"], "--server", server)
    assert again.exit_code == 2 and "already exists" in again.stderr
    sweep = cli("txt2img", "a red circle", "--seed", "5", "--steps", "2,3", "-o", "sweep/{steps}.png", "--server", server,
                "--grid")
    assert sweep.exit_code == 0, sweep.stderr
    lines = sweep.stdout.split()
    assert lines[:2] == ["sweep/2.png", "sweep/3.png"] and Path(lines[2]).is_file()  # the images, then the grid


def test_client_every_image_command(server, cli, isolated):
    Image.new("RGB", (64, 64), (200, 40, 40)).save("in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save("mask.png")
    runs = {
        "img2img": ("img2img", "in.png", "a blue square", "--strength", "0.6"),
        "inpaint": ("inpaint", "in.png", "a blue square", "--mask", "mask.png"),
        "outpaint": ("outpaint", "in.png", "more", "--extend", "all=32"),
        "upscale": ("upscale", "in.png", "--steps", "2"),
    }
    for name, args in runs.items():
        steps = () if name == "upscale" else ("--steps", "3")
        remote = cli(*args, *steps, "--seed", "2", "-o", f"{name}.png", "--server", server, "--json", "-q")
        assert remote.exit_code == 0, (name, remote.stderr)
        record = remote.json_lines()[0]
        assert record["task"] == ("inpaint" if name == "outpaint" else name) and record["input"] == "in.png"
        local = cli(*args, *steps, "--seed", "2", "-o", f"local-{name}.png", "--json", "-q")
        assert local.exit_code == 0, local.stderr
        assert np.array_equal(pixels(f"{name}.png"), pixels(f"local-{name}.png")), name
        assert record["id"] == local.json_lines()[0]["id"]


def test_client_batch_names_ids_and_resume_like_a_local_batch(server, cli, isolated):
    Path("jobs.jsonl").write_text('{"prompt": "a red circle", "steps": 2, "model": "tiny-shapes"}\n'
                                  '{"prompt": "a blue square", "steps": 2, "num_images": 2}\n'
                                  '{"prompt": "a green star", "cfg": "3,4", "steps": 2}\n')
    dry = cli("batch", "jobs.jsonl", "--seed", "10", "-o", "b/", "--dry-run")
    expected = {path: image for job in dry.json_lines() for path, image in zip(job["paths"], job["ids"])}
    first = cli("batch", "jobs.jsonl", "--seed", "10", "-o", "b/", "--server", server, "--json", "-q")
    assert first.exit_code == 0, first.stderr
    assert {r["path"]: r["id"] for r in first.json_lines()} == expected  # same names, same ids as a local batch
    manifest = [json.loads(line) for line in Path("b/diffcli-manifest.jsonl").read_text().splitlines()]
    assert {r["path"]: r["id"] for r in manifest if "id" in r} == expected
    again = cli("batch", "jobs.jsonl", "--seed", "10", "-o", "b/", "--server", server)
    assert again.exit_code == 0 and again.stdout == "" and "0 to make" in again.stderr
    gone = sorted(expected)[1]
    Path(gone).unlink()
    resumed = cli("batch", "jobs.jsonl", "--seed", "10", "-o", "b/", "--server", server)
    assert resumed.exit_code == 0 and resumed.stdout.split() == [gone]
    refused = cli("batch", "jobs.jsonl", "--server", server, "--processes", "2")
    assert refused.exit_code == 2


@pytest.mark.slow  # waits on a running job
def test_skip_moves_on_to_the_next_image(server):
    api = api_of(server)
    worker, results = in_background(server, {"prompt": "a circle", "seed": 1, "steps": 30, "n_iter": 2, "width": 128,
                                             "height": 128})
    assert progress_when(api, lambda state: state["sampling_step"] > 1 and state["job_no"] == 0)
    api.skip()
    worker.join(120)
    status, answer = results["r"]
    assert status == 200 and json.loads(answer["info"])["all_seeds"] == [2]  # the first image skipped, the second made


def test_client_refusals_and_errors(server, cli, isolated, tiny_model):
    bad = cli("txt2img", "a cat", "--vae", str(tiny_model / "vae"), "--server", server)
    assert bad.exit_code == 2 and "--vae" in bad.stderr
    missing = cli("img2img", "nope.png", "a cat", "--server", server)
    assert missing.exit_code == 2 and "nope.png" in missing.stderr
    unknown = cli("txt2img", "a cat", "--model", "no-such-model", "--server", server)
    assert unknown.exit_code == 2 and "not one of this server's models" in unknown.stderr
    down = cli("txt2img", "a cat", "--server", f"http://127.0.0.1:{free_port()}")
    assert down.exit_code == 1 and "cannot reach the server" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
    not_url = cli("txt2img", "a cat", "--server", "ftp://x")
    assert not_url.exit_code == 2


def test_server_auto_runs_locally_when_no_server_answers(cli, isolated, monkeypatch):
    from diffcli.server import client

    monkeypatch.setattr(client, "AUTO_URL", f"http://127.0.0.1:{free_port()}")
    result = cli("txt2img", "a red circle", "--seed", "1", "--steps", "2", "--server", "auto", "-q")
    assert result.exit_code == 0 and Path(result.stdout.strip()).is_file()


@pytest.mark.slow  # starts processes
def test_client_imports_no_torch(server, isolated):
    import subprocess
    import sys

    code = ("import sys; from diffcli.cli import main; code = main(['txt2img', 'a circle', '--seed', '1', '--steps', '2', "
            f"'--server', '{server}', '-q']); assert code == 0, code; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'fastapi') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=isolated)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    piped = subprocess.run([sys.executable, "-m", "diffcli", "txt2img", "a circle", "--seed", "1", "--steps", "2",
                            "--server", server, "-o", "-", "-q"], capture_output=True, timeout=120, cwd=isolated)
    assert piped.returncode == 0, piped.stderr
    image = Image.open(io.BytesIO(piped.stdout))
    assert image.size == (128, 128) and json.loads(image.info["diffcli"])["seed"] == 1


# --- auth, limits, load --------------------------------------------------------------------------------------------

def test_auth(cli, isolated):
    with serving(api_auth="alice:secret") as (url, app):
        status, _ = post(url, "/sdapi/v1/txt2img", {"prompt": "x"})
        assert status == 401
        wrong = "Basic " + base64.b64encode(b"alice:nope").decode()
        assert post(url, "/sdapi/v1/options", {}, headers={"Authorization": wrong})[0] == 401
        api = api_of(url)
        api.set_auth("alice", "secret")
        assert api.get_options()["sd_model_checkpoint"].startswith("tiny-shapes")
        denied = cli("txt2img", "a cat", "--steps", "2", "--server", url)
        assert denied.exit_code == 2 and "password" in denied.stderr
        allowed = cli("txt2img", "a cat", "--steps", "2", "--server", url.replace("http://", "http://alice:secret@"), "-q")
        assert allowed.exit_code == 0, allowed.stderr
        assert "secret" not in allowed.stderr


def test_open_host_needs_auth(cli):
    result = cli("serve", "--host", "0.0.0.0")
    assert result.exit_code == 2 and "--api-auth" in result.stderr
    assert cli("serve", "--api-auth", "nocolon").exit_code == 2


@pytest.mark.slow
def test_load_four_clients_forty_requests_none_lost():
    """4 clients send 40 requests to a server with 2 queue places; a 503 is retried as its Retry-After asks (sooner
    here): every request ends with its own image, and the full queue did answer 503."""
    busy = []

    def one(i):
        while True:
            status, body = post(url, "/sdapi/v1/txt2img", {"prompt": "a circle", "seed": i, "steps": 4, "width": 64,
                                                         "height": 64})
            if status != 503:
                return status, body
            assert "queue is full" in body["detail"]
            busy.append(i)
            time.sleep(0.05)

    with serving(queue=2) as (url, app):
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(40)))
    assert [status for status, _ in answers] == [200] * 40
    assert [json.loads(body["info"])["all_seeds"] for _, body in answers] == [[i] for i in range(40)]
    assert busy  # 4 clients, one running and two waiting places: the fourth was told to come back


@pytest.mark.slow
def test_sigterm_finishes_the_running_job_and_exits_0(isolated):
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", "from diffcli.cli import entry; entry()", "serve", "--port", str(port)],
                               stderr=subprocess.DEVNULL, cwd=isolated, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/diffcli/v1/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        worker, results = in_background(url, {"prompt": "a circle", "seed": 1, "steps": 60, "width": 128, "height": 128})
        assert progress_when(api_of(url), lambda state: state["sampling_step"] > 0)
        process.send_signal(signal.SIGTERM)
        worker.join(120)
        assert process.wait(120) == 0
        status, answer = results["r"]
        assert status == 200 and len(answer["images"]) == 1
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/diffcli/v1/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()


def test_pickle_files_are_offered_and_trusted_only_with_the_servers_allow_pickle(tmp_path):
    """--allow-pickle of `diffcli serve` (its command line) lists a models folder's .ckpt files and lets requests
    load them; without it they are neither listed nor loadable; a request can never set it."""
    from diffcli.server import intake
    from diffcli.server.catalog import Catalog

    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04not really")
    (tmp_path / "new.safetensors").write_bytes(b"")
    link_target = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    link_target.write_bytes(b"")
    (tmp_path / "escape.safetensors").symlink_to(link_target)
    assert {"new.safetensors"} <= set(Catalog(None, str(tmp_path)).entries) and "old.ckpt" not in Catalog(None, str(tmp_path)).entries
    assert "escape.safetensors" not in Catalog(None, str(tmp_path)).entries  # a link out of the folder
    trusting = Catalog(None, str(tmp_path), allow_pickle=True)
    assert "old.ckpt" in trusting.entries
    for allow in (False, True):
        served = intake.Served(trusting, intake.Limits(), allow_pickle=allow)
        job = intake.build("txt2img", {"prompt": "x", "model": "old.ckpt"}, served, tmp_path)[0]
        assert job.model.allow_pickle is allow and job.model.name == str(tmp_path / "old.ckpt")


def test_controlnet_through_a1111_and_the_client(cli, isolated, tiny_model, tiny_controlnets, models_dir):
    """alwayson_scripts.controlnet (A1111's extension) and --control through --server run the server's ControlNets
    (by --controlnet-dir name) on the request's own control image; the same image as a local run."""
    from PIL import ImageDraw

    edges = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(edges).ellipse((12, 12, 52, 52), outline="black", width=3)
    edges.save("edges.png")
    with serving(models_dir=str(models_dir), controlnet_dir=str(tiny_controlnets[0].parent)) as (url, app):
        unit = {"enabled": True, "input_image": b64(edges), "module": "canny", "model": "tiny-cn-0 [abc]",
                "weight": 0.8, "threshold_a": 50, "threshold_b": 150, "guidance_end": 0.9, "resize_mode": "Crop and Resize"}
        body = {"prompt": "a circle", "seed": 3, "steps": 2, "width": 64, "height": 64,
                "override_settings": {"sd_model_checkpoint": "tiny-sd"}, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
        status, answer = post(url, "/sdapi/v1/txt2img", body)
        assert status == 200, answer
        assert 'ControlNet 0: "Module: canny, Model: tiny-cn-0, Weight: 0.8' in json.loads(answer["info"])["infotexts"][0]
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"), dtype=np.int16)
        text = f"canny:edges.png;model={tiny_controlnets[0]};weight=0.8;end=0.9;low=50;high=150"
        local = cli("txt2img", "a circle", "--model", tiny_model, "--seed", "3", "--steps", "2", "--width", "64",
                    "--height", "64", "--control", text, "-o", "local.png", "-q")
        assert local.exit_code == 0, local.stderr
        assert np.array_equal(served, pixels("local.png"))
        remote = cli("txt2img", "a circle", "--model", "tiny-sd", "--seed", "3", "--steps", "2", "--width", "64",
                     "--height", "64", "--control", "canny:edges.png;model=tiny-cn-0;weight=0.8;end=0.9;low=50;high=150",
                     "--server", url, "-o", "remote.png", "--json", "-q")
        assert remote.exit_code == 0, remote.stderr
        assert np.array_equal(pixels("remote.png"), pixels("local.png"))
        assert remote.json_lines()[0]["control"][0]["image"] == "edges.png"
        unit["model"] = "../../etc"
        status, answer = post(url, "/sdapi/v1/txt2img", body)
        assert status == 422 and "not one of this server's ControlNets" in answer["detail"]
        status, answer = post(url, "/diffcli/v1/plan", {"prompt": "x", "control": [f"canny:/etc/passwd;model={tiny_controlnets[0]}"]})
        assert status == 422  # raw --control texts name server files: refused
        bare = ("--control", "canny:edges.png", "--server", url, "--seed", "3", "--steps", "2", "-q")
        refused = cli("txt2img", "a circle", "--model", "tiny-sd", "--width", "64", "--height", "64", *bare, "-o", "n.png")
        assert refused.exit_code == 2 and "no ControlNet model" in refused.stderr, refused.stderr
        bundled = cli("txt2img", "a red circle", *bare, "-o", "b.png", "--json")  # its own ControlNet, unnamed
        assert bundled.exit_code == 0, bundled.stderr
        from diffcli.output import read_metadata

        assert read_metadata(Path("b.png"))["control"][0]["model"] == "tiny-shapes-control"


@pytest.mark.parametrize("unit, message", [
    ({"type": "canny", "params": {"model": "/any/folder"}}, "'model' is a unit field"),
    ({"type": "canny", "params": {" Model ": "someone/cn"}}, "is a unit field"),
    ({"type": "canny:/etc/passwd;model=/x", "params": {}}, "a preprocessor name"),
    ({"type": "canny", "params": {"low;model": "/x"}}, "values may not contain ';'"),
])
def test_a_request_cannot_name_a_controlnet_outside_the_servers_folder(tmp_path, unit, message):
    """Only the server's --controlnet-dir names a request's ControlNet: a `model` (or a unit text) smuggled through the
    type's parameters or its type name is refused."""
    import base64
    import io

    from PIL import Image

    from diffcli.errors import UsageError
    from diffcli.server import intake
    from diffcli.server.catalog import Catalog

    data = io.BytesIO()
    Image.new("RGB", (8, 8)).save(data, "PNG")
    served = intake.Served(Catalog(None, None), intake.Limits())
    unit = dict(unit, image=base64.b64encode(data.getvalue()).decode())
    with pytest.raises(UsageError, match=message):
        intake.control_texts([unit], served, tmp_path)


@pytest.mark.parametrize("word", ["", "dog, big", "dog"])
def test_a_batch_sweep_cell_is_sent_with_its_prompt_replaced_and_not_swept_again(word):
    """A jobs line's prompt_sr makes one job per word here; each goes to the server as its replaced prompt (an empty
    replacement, or one with a comma, was parsed again there: refused, or split into two jobs)."""
    from diffcli import jobs, sweep
    from diffcli.server.client import request_values

    [base] = jobs.build("txt2img", {"prompt": "a cat"})
    cells = sweep.expand(base, prompt_sr=sweep.Values(["cat", word]))
    body = request_values("txt2img", jobs.values_of(cells[1]), lambda message: None)
    assert body["prompt"] == f"a {word}" and "prompt_sr" not in body
