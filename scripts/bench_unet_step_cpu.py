"""One U-Net step of a random-weight full-size SD 1.5 (cfg batch 2, 256 px) on the CPU, by engine and precision: torch
fp32, torch bf16 + channels_last, OpenVINO f32 and bf16, and OpenVINO bf16 from int8 weights with dynamic int8
activations (diffcli's own OpenVINOUNet; needs `diffcli[openvino]`, and nncf for the last). Medians of --repeats after
one warm-up (the compile); what `diffcli/cpu.py` and `openvino_unet.int8_weights` choose from is measured here
(docs/performance.md, "CPU fast path").

    python scripts/bench_unet_step_cpu.py [--threads 2] [--repeats 5] [--only fp32,bf16,ov_f32,ov_bf16,ov_bf16_int8]
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def median_s(call, repeats: int) -> float:
    call()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return round(statistics.median(runs), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="fp32,bf16,ov_f32,ov_bf16,ov_bf16_int8")
    args = parser.parse_args()
    which = args.only.split(",")

    import torch

    from diffcli import bench, cpu

    torch.set_num_threads(args.threads)
    pipe = bench.random_pipeline("sd15", "cpu", torch.float32)
    sample, timestep, text = torch.randn(2, 4, 32, 32), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    result = {"native_bf16": cpu.native_bf16(cpu.cpu_flags()), "threads": args.threads}
    with torch.no_grad():
        if "fp32" in which:
            result["torch_fp32_s"] = median_s(lambda: pipe.unet(sample, timestep, text), args.repeats)
        if "bf16" in which:
            unet = pipe.unet.to(torch.bfloat16).to(memory_format=torch.channels_last)
            result["torch_bf16_channels_last_s"] = median_s(
                lambda: unet(sample.bfloat16(), timestep, text.bfloat16()), args.repeats)
            pipe.unet.to(torch.float32)
    hints = [hint for hint in ("f32", "bf16", "bf16_int8") if f"ov_{hint}" in which]
    if hints:
        from diffcli import openvino_unet

        with tempfile.TemporaryDirectory(prefix="unet-step-") as scratch:  # the IR: 3.4 GB
            folder = Path(scratch) / "ir"
            openvino_unet.export(pipe, folder, "f32")  # full-precision weights for both hints
            parameters = sum(p.numel() for p in pipe.unet.parameters())
            for hint in hints:
                path, int8 = folder / "unet.xml", hint.endswith("_int8")
                if int8:  # a copy of the U-Net's IR with int8 weights
                    path = Path(scratch) / "int8" / "unet.xml"
                    path.parent.mkdir()
                    for suffix in (".xml", ".bin"):
                        shutil.copyfile(folder / f"unet{suffix}", path.with_suffix(suffix))
                    openvino_unet.compress_int8(path)
                config = openvino_unet.unet_config(hint.removesuffix("_int8"), int8)
                unet = openvino_unet.OpenVINOUNet(path, config, pipe.unet, parameters)
                result[f"openvino_{hint}_s"] = median_s(lambda: unet(sample, timestep, text), args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
