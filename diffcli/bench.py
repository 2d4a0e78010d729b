"""`diffcli bench`: speed and memory of full-size architectures (random weights) or a given model.

Random weights cost exactly what real weights cost, so SD1.5, SD2.1 and SDXL are built from the
configs shipped in diffcli/configs with no download. Plain diffusers eager ("plain") and diffcli's
path ("diffcli") run with the same settings in the same process, plain first, so ratios are fair.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffcli.checkpoints import CONFIGS  # noqa: E402  (the packaged diffusers configs)
ARCHITECTURES = {  # name -> (config folder, pipeline class, native size)
    "sd15": ("sd15", "StableDiffusionPipeline", 512),
    "sd21": ("sd2-v", "StableDiffusionPipeline", 768),
    "sdxl": ("sdxl", "StableDiffusionXLPipeline", 1024),
}
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
# --contended: one CPU-bound process, a Python busy loop that also ends if the bench dies without stopping it; it runs
# in a session of its own, as a program started from another terminal would (Linux shares the CPU fairly between
# sessions, not only between threads: sched_autogroup)
COMPETITOR = "import os\nparent, n = os.getppid(), 0\nwhile n % 10_000_000 or os.getppid() == parent:\n    n += 1"
PEERS = ("plain", "openvino", "sdcpp")  # --compare: plain diffusers eager (same process), OpenVINO, stable-diffusion.cpp
# The peers run in a child process, each in its own venv if need be: script, the variable naming its Python, the
# module it imports, the package that has it. optimum-intel pins older transformers than diffcli's; the sd.cpp bindings
# compile from source.
CHILD_PEERS = {
    "openvino": ("bench_openvino.py", "DIFFCLI_OPENVINO_PYTHON", "optimum", "optimum-intel", "'optimum-intel[openvino]'"),
    "sdcpp": ("bench_sdcpp.py", "DIFFCLI_SDCPP_PYTHON", "stable_diffusion_cpp", "stable-diffusion-cpp-python",
              "stable-diffusion-cpp-python"),
}
COMPETITOR_START_S = 0.5  # the competitor is running before the threads are chosen again and the timing starts
WEIGHT_HEADROOM = 1.15  # a flow-matching family is built only where its weights and this much more fit (activations)


def random_pipeline(arch: str, device: str, dtype):
    """A full-size pipeline of `arch` with random weights, built on `device` from shipped configs (the flow-matching
    families: bench_families.py's)."""
    import diffusers
    import torch
    import transformers

    from diffcli import bench_families, checkpoints

    if arch in bench_families.FAMILIES:
        return bench_families.build(arch, device, dtype, PROMPT)
    folder, class_name, _ = ARCHITECTURES[arch]
    root = CONFIGS / folder
    index = diffusers.DiffusionPipeline.load_config(root)
    components = {}
    torch.manual_seed(0)
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        library, cls_name = value
        if name.startswith("tokenizer"):
            continue
        if name == "scheduler":
            components[name] = getattr(diffusers, cls_name).from_pretrained(root / name)
        elif library == "transformers":
            config = transformers.AutoConfig.from_pretrained(root / name)
            with torch.device(device):
                components[name] = getattr(transformers, cls_name)._from_config(config, torch_dtype=dtype)
        else:
            cls = getattr(diffusers, cls_name)
            with torch.device(device):
                components[name] = cls.from_config(cls.load_config(root / name)).to(dtype)
    components.update(checkpoints.packaged_tokenizers(folder))
    pipeline_cls = getattr(diffusers, class_name)
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} if arch != "sdxl" else {}
    return pipeline_cls(**components, **extra)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def prompt_inputs(pipe, batch: int, own: bool, cfg: float) -> dict:
    """The prompt and guidance arguments of a call for `batch` images: the text for diffusers to encode (plain's path),
    or, `own`, what diffcli's run passes: its own prompt embeddings (prompts.py, OpenVINO's text encoder there) where
    the family takes them, else the text. --cfg is the guidance scale, or the true CFG scale with an empty negative
    prompt where the family's CFG is that (Qwen-Image), on both paths."""
    from diffcli import families

    style = families.call_style(type(pipe).__name__)
    guidance = style.guidance(cfg)
    if style.true_cfg:  # the empty negative prompt that turns true CFG on, as run.py passes it
        guidance["negative_prompt"] = [""] * batch if batch > 1 else ""
    if not own or not style.prompt_embeds:
        return {"prompt": [PROMPT] * batch if batch > 1 else PROMPT, **guidance}
    from diffcli import jobs, prompts

    return {**prompts.pipeline_inputs(pipe, [jobs.Prompt(text=PROMPT)] * batch), **guidance}


def _time_call(pipe, device: str, cfg: float, own: bool = False, batch: int = 1, **kwargs) -> float:
    """Seconds for one pipeline call, prompt encoding included, synchronised."""
    _sync(device)
    start = time.perf_counter()
    pipe(**prompt_inputs(pipe, batch, own, cfg), **kwargs)
    _sync(device)
    return time.perf_counter() - start


def measure(pipe, device: str, size: int, steps: int, cfg: float, batch_sizes: list[int], repeats: int,
            own: bool = False) -> dict:
    """First-image latency, steady ms per step, end-to-end s per image, images/s per batch size, peak memory; `own`:
    prompts encoded as diffcli encodes them (prompt_inputs)."""
    import torch

    base = dict(num_inference_steps=steps, width=size, height=size)
    result = {}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    result["first_image_s"] = round(_time_call(pipe, device, cfg, own, **base), 3)
    stamps: list[float] = []

    def on_step(pipeline, step, timestep, tensors):
        _sync(device)
        stamps.append(time.perf_counter())
        return tensors

    per_step = []
    for _ in range(repeats):
        stamps.clear()
        pipe(**prompt_inputs(pipe, 1, own, cfg), **base, output_type="latent", callback_on_step_end=on_step)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        gaps = gaps[min(2, len(gaps) - 1):]  # skip the first steps (warm caches)
        per_step.append(statistics.mean(gaps) * 1000)  # mean, not median: DeepCache's steps are not alike
    result["ms_per_step"] = round(statistics.median(per_step), 2)
    end_to_end = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(repeats):
            _sync(device)
            start = time.perf_counter()
            image = pipe(**prompt_inputs(pipe, 1, own, cfg), **base).images[0]
            image.save(Path(folder) / f"{i}.png")
            end_to_end.append(time.perf_counter() - start)
    result["s_per_image_end_to_end"] = round(statistics.median(end_to_end), 3)
    if device.startswith("cuda"):
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    throughput = {}
    for batch in batch_sizes:
        kwargs = dict(base, output_type="latent")
        _time_call(pipe, device, cfg, own, batch, **kwargs)  # warm-up: a new shape may compile
        seconds = statistics.median(_time_call(pipe, device, cfg, own, batch, **kwargs) for _ in range(repeats))
        throughput[str(batch)] = round(batch / seconds, 3)
    result["images_per_s_latents"] = throughput
    return result


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two float images in [0, 1]."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else round(10 * np.log10(1.0 / mse), 2)


def measure_deep_cache(pipe, device: str, size: int, steps: int, cfg: float, repeats: int, interval: int) -> dict:
    """The eager path with DeepCache every `interval` steps: its timings, and the PSNR of a seeded image against
    the same image without the cache."""
    import torch

    from diffcli import speed

    def image():
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=cfg, width=size, height=size,
                    generator=generator, output_type="np").images[0]

    reference = image()
    with speed.deep_cache(pipe, interval):
        result = measure(pipe, device, size, steps, cfg, [1], repeats)
        result["psnr_vs_uncached_db"] = psnr(image(), reference)
    result["interval"] = interval
    return result


def measure_contended(pipe, device: str, size: int, steps: int, cfg: float, batch_sizes: list[int], repeats: int,
                      threads: int | None, own: bool = True) -> dict:
    """measure() while one CPU-bound process competes for the cores; on the CPU the threads are chosen again as a
    diffcli starting now would choose them (--threads and OMP_NUM_THREADS still win), and put back afterwards."""
    import torch

    from diffcli import speed

    idle_threads = torch.get_num_threads()
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(COMPETITOR_START_S)
        if device == "cpu" and threads is None and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(speed.default_threads())
        result = measure(pipe, device, size, steps, cfg, batch_sizes, repeats, own)
        result["cpu_threads"] = torch.get_num_threads()
    finally:
        competitor.kill()
        competitor.wait()
        torch.set_num_threads(idle_threads)
    return result


def parse_compare(text: str | None) -> tuple[str, ...]:
    """--compare's comma list of PEERS."""
    from diffcli.errors import UsageError

    names = tuple(name.strip() for name in text.split(",")) if text else ()
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise UsageError(f"--compare takes a comma list of {', '.join(PEERS)}, got {unknown[0]!r}")
    return names


def seeded_image(pipe, size: int, steps: int, cfg: float, own: bool = False):
    """The seed-0 image as floats in [0, 1] (plain's: the reference every path's PSNR is measured against)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(**prompt_inputs(pipe, 1, own, cfg), num_inference_steps=steps, width=size, height=size,
                generator=generator, output_type="np").images[0]


def json_line(stream) -> dict | None:
    """The next line of a child's output that is a JSON object (libraries may print other lines); None at its end."""
    import json

    for line in stream:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


class Peer:
    """A peer's child process kept after its own timings (OpenVINO's): each image() makes one more image there, timed
    as its repeats are, so that the bench can alternate it with diffcli's path (interleave)."""

    def __init__(self, process, folder: str):
        self.process, self.folder = process, folder

    def image(self) -> float:
        self.process.stdin.write("image\n")
        self.process.stdin.flush()
        answer = json_line(self.process.stdout)
        if answer is None:
            raise RuntimeError("the peer's process ended")
        return answer["s"]

    def close(self) -> None:
        import shutil

        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def peer_skipped(name: str, pipe) -> dict | None:
    """{"skipped": why} when the CHILD_PEERS peer cannot run on this pipeline here, else None."""
    import importlib.util

    _, variable, module, package, pip = CHILD_PEERS[name]
    python = os.environ.get(variable) or sys.executable
    if getattr(pipe, "unet", None) is None:
        return {"skipped": f"the bench runs {package} on SD 1.x/2.x/XL only"}
    if python == sys.executable and importlib.util.find_spec(module) is None:
        return {"skipped": f"{package} is not installed (pip install {pip}, or point {variable} at a Python that has it)"}
    return None


def peer_model(name: str, pipe, folder: Path) -> str | dict:
    """The CHILD_PEERS peer's copy of the bench's model written into `folder`: OpenVINO's a diffusers folder
    (optimum-intel exports from it), stable-diffusion.cpp's an original-layout fp16 single file; {"skipped": why}
    when the peer cannot run."""
    import torch

    skipped = peer_skipped(name, pipe)
    if skipped:
        return skipped
    folder.mkdir(parents=True, exist_ok=True)
    if name == "sdcpp":
        from diffcli.ldm_format import save_original_checkpoint

        return str(save_original_checkpoint(pipe, folder / "model.safetensors", dtype=torch.float16))
    pipe.save_pretrained(folder)
    hub_layout_text_encoders(folder)
    return str(folder)


def measure_peer(name: str, pipe, size: int, steps: int, cfg: float, repeats: int, precision: str, reference,
                 keep: bool = False, written: str | dict | None = None) -> tuple[dict, Peer | None]:
    """A CHILD_PEERS peer in a child process (its Python: its variable, else this one) on the bench's model (written
    here by peer_model, or already: `written`), same size, steps, cfg, threads and seed; PSNR against `reference`.
    `keep`: the child stays, returned as a Peer."""
    import json
    import shutil

    import numpy as np
    import torch

    script, variable = CHILD_PEERS[name][:2]
    python = os.environ.get(variable) or sys.executable
    folder = tempfile.mkdtemp(prefix=f"diffcli-bench-{name}-")
    try:
        model = written if written is not None else peer_model(name, pipe, Path(folder) / "model")
        if isinstance(model, dict):
            return model, None
        settings = {"size": size, "steps": steps, "cfg": cfg, "prompt": PROMPT, "repeats": repeats, "serve": keep,
                    "threads": torch.get_num_threads(), "precision": precision, "image": str(Path(folder) / "seed0.npy")}
        with open(Path(folder) / "stderr.txt", "w+") as errors:  # a file: a pipe could fill and stall the child
            process = subprocess.Popen([python, str(Path(__file__).with_name(script)), model, json.dumps(settings)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
            result = json_line(process.stdout)
            if result is None:
                process.wait()
                errors.seek(0)
                return {"failed": (errors.read().strip().splitlines() or ["no output"])[-1][:300]}, None
        result["psnr_vs_plain_db"] = psnr(np.load(settings["image"]), reference)
        if not keep:
            process.stdin.close()  # it is not asked for more images
            process.wait()
            return result, None
        peer, folder = Peer(process, folder), None  # the Peer removes the folder when it is closed
        return result, peer
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


PEER_COPIES = 2.5  # what a peer's child needs beside the bench's weights: its own copy, and its export's


def weight_bytes(pipe, itemsize: int | None = None) -> int:
    """Bytes of the pipeline's weights: as loaded, or at `itemsize` bytes each."""
    import torch

    return sum(p.numel() * (itemsize or p.element_size()) for component in pipe.components.values()
               if isinstance(component, torch.nn.Module) for p in component.parameters())


def one_copy_fits_beside(pipe, device: str) -> bool:
    """Whether a peer's copies of the weights fit in free memory beside the bench's own; when not, the bench writes
    its copy to disk and frees it while the peers run (run_peers)."""
    from diffcli import memory

    if device != "cpu":
        return True
    free = memory.host_available()
    return free is None or PEER_COPIES * weight_bytes(pipe) <= free


def interleave(peer: Peer, pipe, device: str, size: int, steps: int, cfg: float, rounds: int) -> dict:
    """The peer's image and diffcli's in turn, `rounds` times, each timed to a PNG: medians and their ratio, both
    paths meeting the same machine state (load, clock, caches) rather than one block of repeats each."""
    base = dict(num_inference_steps=steps, width=size, height=size)
    theirs, ours = [], []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(rounds):
            theirs.append(peer.image())
            _sync(device)
            start = time.perf_counter()
            pipe(**prompt_inputs(pipe, 1, True, cfg), **base).images[0].save(Path(folder) / f"{i}.png")
            _sync(device)
            ours.append(time.perf_counter() - start)
    peer_s, diffcli_s = statistics.median(theirs), statistics.median(ours)
    return {"rounds": rounds, "peer_s_per_image": round(peer_s, 3), "diffcli_s_per_image": round(diffcli_s, 3),
            "ratio": round(peer_s / diffcli_s, 3)}


def export_peer(folder: str, out: Path) -> tuple[str | dict, float | None]:
    """The OpenVINO peer's export of the diffusers `folder` into `out`, alone in its child process (its peak holds the
    torch weights and the IR beside them): (`out`, seconds), or ({"failed": why}, None)."""
    import json

    script, variable = CHILD_PEERS["openvino"][:2]
    done = subprocess.run([os.environ.get(variable) or sys.executable, str(Path(__file__).with_name(script)), folder,
                           json.dumps({"export_to": str(out)})], capture_output=True, text=True)
    answer = json_line(iter(done.stdout.splitlines()))
    if done.returncode or answer is None:
        return {"failed": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}, None
    return str(out), answer["export_s"]


def run_peers(report: dict, pipes: list, device: str, compare: tuple[str, ...], size: int, steps: int, cfg: float,
              repeats: int, precision: str, reference, scratch: Path | None, dtype, low_vram, threads: int | None):
    """The CHILD_PEERS peers of `compare` into `report`, stable-diffusion.cpp first; (the pipeline to go on with, the
    OpenVINO peer's process kept to alternate with diffcli's path, or None). `pipes`: the bench's pipeline as the one
    item of a list, which is emptied (so that no caller's name keeps the weights in memory while they are on disk).

    Where a peer's copies of the weights do not fit beside the bench's (SDXL in fp32 on 24 GiB), the bench writes its
    weights to disk and frees them while the peers run, then reads them back. With `scratch` (diffcli's path is
    OpenVINO) diffcli's IR is exported there first, from the weights in memory, and the OpenVINO peer exports alone:
    both compiled models then fit side by side (the pipeline comes back without its torch U-Net) and alternate."""
    import shutil

    from diffcli import memory, openvino_unet
    from diffcli.hashes import cache_dir

    pipe = pipes.pop()
    peers = [name for name in CHILD_PEERS if name in compare]
    stash, written, separate, export_s = None, {}, False, None
    if any(not peer_skipped(name, pipe) for name in peers) and not one_copy_fits_beside(pipe, device):
        cache_dir().mkdir(parents=True, exist_ok=True)  # not /tmp: it may be memory
        stash = Path(tempfile.mkdtemp(prefix=".bench-stash-", dir=cache_dir()))
    try:
        if stash is not None:
            written = {name: peer_model(name, pipe, stash / name) for name in peers}
            if not isinstance(written.get("openvino"), str):
                pipe.save_pretrained(stash / "openvino")
            cls, separate = type(pipe), scratch is not None and isinstance(written.get("openvino"), str)
            if separate:
                started = time.perf_counter()
                openvino_unet.export(pipe, scratch / "ir", precision)
                report["openvino_export_s"] = round(time.perf_counter() - started, 3)
            report["peers_alone"] = {"free": memory.gib(memory.host_available() or 0), "alternated": separate}
            del pipe
            memory.release_freed()
            if separate:
                written["openvino"], export_s = export_peer(written["openvino"], stash / "openvino-ir")
        if "sdcpp" in compare:
            report["sdcpp"] = measure_peer("sdcpp", None if stash else pipe, size, steps, cfg, repeats, "fp16",
                                           reference, written=written.get("sdcpp"))[0]
        peer = None
        if "openvino" in compare:
            report["openvino"], peer = measure_peer("openvino", None if stash else pipe, size, steps, cfg, repeats,
                                                    precision, reference, stash is None or separate,
                                                    written.get("openvino"))
            if export_s is not None:
                report["openvino"]["export_s"] = export_s
        if stash is not None:  # read back for diffcli's path: the same weights (the U-Net: its IR, if exported)
            pipe = cls.from_pretrained(stash / "openvino", torch_dtype=dtype, **({"unet": None} if separate else {}))
            pipe.set_progress_bar_config(disable=True)
            if separate:
                pipe.unet = openvino_unet.meta_unet(stash / "openvino" / "unet")
            else:
                from diffcli.pipeline import _place

                _place(pipe, device, optimize=False, low_vram=low_vram, threads=threads)
    finally:
        if stash is not None:
            shutil.rmtree(stash, ignore_errors=True)
    return pipe, peer


def hub_layout_text_encoders(folder: Path) -> None:
    """Rewrite a saved pipeline's CLIP text encoders with the `text_model.` level the Hub's files have: transformers
    >= 5.6 saves without it and older ones (optimum-intel's) then load random weights, warning only."""
    import json

    from safetensors.torch import load_file, save_file

    def hub(key: str) -> str:
        return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key

    for path in folder.glob("text_encoder*/*.safetensors"):
        save_file({hub(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    for path in folder.glob("text_encoder*/*.safetensors.index.json"):  # a sharded save names each key's file
        index = json.loads(path.read_text(encoding="utf-8"))
        index["weight_map"] = {hub(k): v for k, v in index["weight_map"].items()}
        path.write_text(json.dumps(index, indent=2), encoding="utf-8")


def check_backend(backend: str, device: str) -> None:
    """--backend is one of backend.BACKENDS; openvino needs its package and the CPU (before any weights load)."""
    from diffcli import backend as backends
    from diffcli.errors import UsageError

    backends.require(backend)
    if backend == "openvino" and device != "cpu":
        raise UsageError(f"--backend openvino runs on the CPU, got --device {device}", "add --device cpu")


def bench_engine(backend: str, device: str, pays: bool) -> str:
    """diffcli's engine in the bench: as backend.resolve picks it for a job at the defaults (`pays`: the bench's
    cpu.openvino_pays on its loaded pipeline)."""
    from diffcli import extras

    if device != "cpu" or backend == "torch":
        return "torch"
    return "openvino" if backend == "openvino" or (pays and extras.available("openvino")) else "torch"


def openvino_pays(pipe) -> bool:
    """cpu.openvino_pays for the bench's loaded pipeline (its weights, in fp32, counted into the memory available)."""
    from diffcli import cpu, memory

    weights = weight_bytes(pipe, itemsize=4)
    free = memory.host_available()
    return cpu.openvino_pays(cpu.cpu_flags(), cpu.loaded_parameters(pipe), weights,
                             None if free is None else free + weights)


def fast_dtype(pipe) -> str:
    """The dtype `--dtype auto` picks on this CPU for this pipeline (cpu.choose on its denoiser's size)."""
    from diffcli import cpu

    return cpu.choose(cpu.cpu_flags(), cpu.loaded_parameters(pipe))[0]


def arch_names() -> tuple[str, ...]:
    """Every --arch: the SD ones, then the flow-matching families."""
    from diffcli import bench_families

    return (*ARCHITECTURES, *bench_families.FAMILIES)


def arch_defaults(arch: str | None) -> tuple[int | None, int, float]:
    """Native size (None: the model's), steps and cfg of an --arch: the registry's for its family and variant (FLUX.1
    dev 28 steps at distilled guidance 3.5, Z-Image Turbo 9 at 0, ...); 30 steps at 7.5 for SD and a --model."""
    from diffcli import bench_families, families

    if arch in bench_families.FAMILIES:
        _, size, family, variant, _ = bench_families.FAMILIES[arch]
        defaults = next(v.defaults for v in families.get(family).variants if v.name == variant)
        return size, defaults["steps"], defaults["cfg"]
    return (ARCHITECTURES[arch][2] if arch else None), 30, 7.5


def weights_fit(arch: str, device: str, dtype_name: str) -> str | None:
    """Why the random weights of `arch` cannot be built on `device` (None: they fit): the flow-matching families are
    8-29 B parameters."""
    from diffcli import bench_families, memory
    from diffcli.pipeline import resolve_device

    if arch not in bench_families.FAMILIES:
        return None
    device = resolve_device(device)
    dtype = bench_dtype(arch, dtype_name, device)
    need = bench_families.FAMILIES[arch][4] * 1e9 * dtype.itemsize
    free = memory.device_free(device)
    if free is None or need * WEIGHT_HEADROOM <= free:
        return None
    return (f"--arch {arch} needs about {memory.gib(need)} for its {str(dtype).removeprefix('torch.')} weights alone, "
            f"and {device} has {memory.gib(free)} free")


def bench_dtype(arch: str | None, dtype_name: str, device: str, spec=None):
    """--dtype for the bench: on CUDA resolve_dtype's for the --model's `spec` or the --arch's family (bf16 for the
    transformer families); on the CPU the model's dtype for plain's path (fp32 at auto: diffcli's path then picks its
    own, fast_dtype)."""
    from diffcli import bench_families
    from diffcli.models import ModelSpec
    from diffcli.pipeline import resolve_dtype

    if spec is None and arch in bench_families.FAMILIES:
        spec = ModelSpec(source="hub", location=arch, name=arch, family=bench_families.FAMILIES[arch][2])
    return resolve_dtype(dtype_name, device, spec if device.startswith("cuda") else None)


def run_bench(arch: str | None, model: str | None, device: str, dtype_name: str, steps: int, cfg: float,
              size: int | None, batch_sizes: list[int], repeats: int, compare: tuple[str, ...], optimize: bool,
              low_vram: bool = False, deep_cache: int | None = None, threads: int | None = None,
              contended: bool = False, backend: str = "auto") -> dict:
    """Benchmark one architecture or model: the --compare peers first (plain diffusers eager, OpenVINO), then diffcli's
    path (on the CPU with --dtype auto: the fast path's dtype), then (--contended) diffcli's path again with one
    CPU-bound process competing. Every path's seed-0 image gets its PSNR against plain's."""
    import torch

    from diffcli import bench_families
    from diffcli.errors import UsageError
    from diffcli.models import resolve_model
    from diffcli.pipeline import _load_weights, _place, pipeline_class_name, resolve_device
    from diffcli.speed import check_deep_cache

    check_deep_cache(deep_cache)  # before any weights load
    if deep_cache and arch in bench_families.FAMILIES:
        raise UsageError(f"--deep-cache caches U-Net blocks; --arch {arch} has a transformer", "drop --deep-cache")
    device = resolve_device(device)
    spec = resolve_model(model) if model else None
    dtype = bench_dtype(arch, dtype_name, device, spec)
    start = time.perf_counter()
    if model:
        import diffusers

        pipe = _load_weights(getattr(diffusers, pipeline_class_name(spec, "txt2img")), spec, dtype, False, False)
        size = size or spec.sample_size or 512
        label = spec.name
    else:
        pipe = random_pipeline(arch, device, dtype)
        size = size or arch_defaults(arch)[0]
        label = f"{arch} (random weights)"
    plain_optimizations = _place(pipe, device, optimize=False, low_vram=low_vram, threads=threads)
    _sync(device)
    report = {"model": label, "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "size": size, "steps": steps, "cfg": cfg, "load_s": round(time.perf_counter() - start, 3),
              "torch": torch.__version__}
    pipe.set_progress_bar_config(disable=True)
    compare_plain = "plain" in compare
    reference = seeded_image(pipe, size, steps, cfg) if compare else None
    if compare_plain:
        report["plain"] = measure(pipe, device, size, steps, cfg, batch_sizes, repeats)
    fast = device == "cpu" and dtype_name == "auto" and not low_vram and fast_dtype(pipe) == "bf16"
    pays = device == "cpu" and dtype_name == "auto" and not low_vram and openvino_pays(pipe)
    engine = "torch" if low_vram else bench_engine(backend, device, pays)
    # diffcli's OpenVINO IR: exported afresh into a temporary folder (its time is the first run's extra load time)
    scratch = Path(tempfile.mkdtemp(prefix="diffcli-bench-openvino-")) if engine == "openvino" else None
    peer = None
    try:
        precision = "bf16" if fast or str(dtype) == "torch.bfloat16" else "f32"  # OpenVINO's where diffcli's path's is
        pipes = [pipe]
        del pipe  # run_peers frees the weights while they are on disk
        pipe, peer = run_peers(report, pipes, device, compare, size, steps, cfg, repeats, precision, reference,
                               None if deep_cache else scratch, dtype, low_vram, threads)
        if deep_cache:  # DeepCache hooks the eager U-Net's blocks: measure it before anything is compiled
            if "plain" not in report:
                report["plain"] = measure(pipe, device, size, steps, cfg, batch_sizes, repeats)
            report["deep_cache"] = measure_deep_cache(pipe, device, size, steps, cfg, repeats, deep_cache)
            report["deep_cache_speedup_ms_per_step"] = round(report["plain"]["ms_per_step"] / report["deep_cache"]["ms_per_step"], 2)
        if fast and engine == "torch":
            pipe.to(torch.bfloat16)
            report["dtype"] = "bfloat16 (plain and openvino's export: float32)" if compare else "bfloat16"
        installed = None
        if engine == "openvino":  # before placing: a U-Net exported already is on the meta device
            from diffcli import openvino_unet

            started, exported = time.perf_counter(), openvino_unet.is_cached(scratch / "ir")
            installed = openvino_unet.install(pipe, scratch / "ir", torch.bfloat16 if precision == "bf16" else torch.float32)
            if not exported:
                report["openvino_export_s"] = round(time.perf_counter() - started, 3)
            report["dtype"] = installed.split(" (")[0]
        report["optimizations"] = plain_optimizations if low_vram else _place(pipe, device, optimize, False, threads)
        if installed:
            report["optimizations"][-1] = installed
        _measure_diffcli(report, pipe, device, size, steps, cfg, batch_sizes, repeats, reference, contended, threads)
        if peer is not None:
            report["openvino_interleaved"] = interleave(peer, pipe, device, size, steps, cfg, max(5, 2 * repeats))
    finally:
        if peer is not None:
            peer.close()
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    return report


def _measure_diffcli(report: dict, pipe, device: str, size: int, steps: int, cfg: float, batch_sizes: list[int],
                     repeats: int, reference, contended: bool, threads: int | None) -> None:
    """diffcli's path into report["diffcli"] (and "contended"), with the speed-ups over plain."""
    import torch

    compare_plain = "plain" in report
    report["diffcli"] = measure(pipe, device, size, steps, cfg, batch_sizes, repeats, own=True)
    if reference is not None:
        report["diffcli"]["psnr_vs_plain_db"] = psnr(seeded_image(pipe, size, steps, cfg, own=True), reference)
    if contended:
        report["diffcli"]["cpu_threads"] = torch.get_num_threads()
        report["contended"] = measure_contended(pipe, device, size, steps, cfg, batch_sizes, repeats, threads)
        idle, busy = report["diffcli"]["s_per_image_end_to_end"], report["contended"]["s_per_image_end_to_end"]
        report["contention"] = {"competitor": "1 CPU-bound process (python busy loop, own session)", "idle_s_per_image": idle,
                                "contended_s_per_image": busy, "ratio": round(busy / idle, 2),
                                "idle_cpu_threads": report["diffcli"]["cpu_threads"],
                                "contended_cpu_threads": report["contended"]["cpu_threads"]}
    if compare_plain:
        report["speedup_ms_per_step"] = round(report["plain"]["ms_per_step"] / report["diffcli"]["ms_per_step"], 2)
        report["speedup_end_to_end"] = round(
            report["plain"]["s_per_image_end_to_end"] / report["diffcli"]["s_per_image_end_to_end"], 2
        )


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads"


def format_table(report: dict) -> str:
    """A short human table of one report."""
    rows = [f"{report['model']} on {report['device']} ({report['dtype']}, {report['size']}px, {report['steps']} steps, "
            f"cfg {report['cfg']:g}); load {report['load_s']} s"]
    header = f"{'path':8} {'first image s':>13} {'ms/step':>9} {'s/image e2e':>12} {'peak GiB':>9}  images/s by batch"
    rows.append(header)
    for path in ("plain", "deep_cache", "diffcli", "contended"):
        if path in report:
            r = report[path]
            rows.append(f"{path:8} {r['first_image_s']:>13} {r['ms_per_step']:>9} {r['s_per_image_end_to_end']:>12} "
                        f"{r.get('peak_memory_gib', '-'):>9}  {r['images_per_s_latents']}")
    if "speedup_ms_per_step" in report:
        rows.append(f"speed-up vs plain: {report['speedup_ms_per_step']}x per step, {report['speedup_end_to_end']}x end to end")
    if "openvino" in report:
        ov = report["openvino"]
        rows.append(f"openvino: {ov.get('skipped') or ov.get('failed') or ''}" if "first_image_s" not in ov else
                    f"{'openvino':8} {ov['first_image_s']:>13} {'-':>9} {ov['s_per_image_end_to_end']:>12} {'-':>9}  "
                    f"(OpenVINO {ov['openvino']}, {ov['precision']}, " + (f"export {ov['export_s']} s alone, compile "
                    if "export_s" in ov else "export and compile ") + f"{ov['load_s']} s)")
    if "sdcpp" in report:
        peer = report["sdcpp"]
        rows.append(f"sdcpp: {peer.get('skipped') or peer.get('failed') or ''}" if "first_image_s" not in peer else
                    f"{'sdcpp':8} {peer['first_image_s']:>13} {'-':>9} {peer['s_per_image_end_to_end']:>12} {'-':>9}  "
                    f"(stable-diffusion.cpp bindings {peer['sdcpp']}, {peer['precision']}, {peer['sampler']} sampler, "
                    f"load {peer['load_s']} s)")
    psnrs = [f"{path} {report[path]['psnr_vs_plain_db']} dB" for path in ("openvino", "sdcpp", "diffcli")
             if "psnr_vs_plain_db" in report.get(path, {})]
    if psnrs:
        rows.append(f"PSNR of the seed-0 image vs plain's: {', '.join(psnrs)}")
    if "openvino" in report and "first_image_s" in report["openvino"]:
        rows.append(f"diffcli vs openvino: {round(report['openvino']['s_per_image_end_to_end'] / report['diffcli']['s_per_image_end_to_end'], 2)}x end to end")
    if "openvino_interleaved" in report:
        both = report["openvino_interleaved"]
        rows.append(f"diffcli vs openvino, alternating image by image ({both['rounds']} rounds): {both['ratio']}x "
                    f"({both['diffcli_s_per_image']} vs {both['peer_s_per_image']} s per image)")
    if "deep_cache" in report:
        cache = report["deep_cache"]
        rows.append(f"deep_cache: every {cache['interval']} steps on the eager U-Net, {report['deep_cache_speedup_ms_per_step']}x "
                    f"per step vs plain, PSNR {cache['psnr_vs_uncached_db']} dB vs the same seed uncached")
    if "contention" in report:
        c = report["contention"]
        rows.append(f"contended: {c['competitor']} running: {c['idle_s_per_image']} -> {c['contended_s_per_image']} s/image "
                    f"end to end, {c['ratio']}x; cpu threads {c['idle_cpu_threads']} -> {c['contended_cpu_threads']}")
    if "peers_alone" in report:
        alone = report["peers_alone"]
        rows.append(f"peers: run while the bench's own weights were on disk only ({alone['free']} free holds one copy)"
                    + ("; OpenVINO's export alone, then its compiled model beside diffcli's" if alone["alternated"]
                       else ", so not alternated with diffcli's path"))
    if "openvino_export_s" in report:
        rows.append(f"diffcli's OpenVINO export (once per model, then cached): {report['openvino_export_s']} s")
    rows.append(f"optimizations: {', '.join(report['optimizations']) or 'none'}")
    return "\n".join(rows)
