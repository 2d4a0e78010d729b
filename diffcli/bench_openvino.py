"""The OpenVINO peer of `diffcli bench --compare openvino`: optimum-intel's pipeline exported from the bench's diffusers
folder, timed as diffcli's path is (prompt to PNG: first image, then the median of --repeats), with the seed-0 image
saved for PSNR; with "serve" it then makes one more image per "image" line on stdin, answering its time, until stdin
closes (the bench alternates it with diffcli's path). With "export_to" it only exports the folder to OpenVINO IR there
and exits (the bench's SDXL: the export's peak memory needs the machine alone); FOLDER may be such an export.

Standalone, importing nothing from diffcli: optimum-intel pins older transformers than diffcli's, so it may run in a
venv of its own ($DIFFCLI_OPENVINO_PYTHON). Usage: python bench_openvino.py FOLDER SETTINGS_JSON; prints one JSON
line (and one per image served).
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time


def main() -> None:
    import numpy as np
    import torch
    from optimum.intel import OVPipelineForText2Image

    folder, settings = sys.argv[1], json.loads(sys.argv[2])
    if settings.get("export_to"):
        started = time.perf_counter()
        OVPipelineForText2Image.from_pretrained(folder, export=True, compile=False).save_pretrained(settings["export_to"])
        print(json.dumps({"export_s": round(time.perf_counter() - started, 3)}), flush=True)
        return
    size, steps, cfg, prompt = settings["size"], settings["steps"], settings["cfg"], settings["prompt"]
    started = time.perf_counter()
    config = {"INFERENCE_PRECISION_HINT": settings["precision"], "INFERENCE_NUM_THREADS": str(settings["threads"]),
              "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
    exported = os.path.isfile(os.path.join(folder, "unet", "openvino_model.xml"))
    pipe = OVPipelineForText2Image.from_pretrained(folder, export=not exported, compile=False, ov_config=config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)  # static shapes: OpenVINO's fast path
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started

    scratch = tempfile.mkdtemp()

    def call(seed: int = 0):  # as diffcli's path is timed: to a PNG on disk
        generator = torch.Generator("cpu").manual_seed(seed)
        begin = time.perf_counter()
        image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=cfg, width=size, height=size,
                     generator=generator).images[0]
        image.save(os.path.join(scratch, "image.png"))
        return time.perf_counter() - begin, image

    first, image = call()
    np.save(settings["image"], np.asarray(image, dtype=np.float32) / 255)
    times = [call()[0] for _ in range(settings["repeats"])]
    import openvino

    print(json.dumps({"first_image_s": round(first, 3), "s_per_image_end_to_end": round(statistics.median(times), 3),
                      "load_s": round(load_s, 3), "precision": settings["precision"],
                      "openvino": openvino.__version__.split("-")[0]}), flush=True)
    if settings.get("serve"):  # one more image per "image" line, until stdin closes: the bench alternates with it
        for line in sys.stdin:
            if line.strip() == "image":
                print(json.dumps({"s": round(call()[0], 4)}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
