"""The stable-diffusion.cpp peer of `diffcli bench --compare sdcpp`: its Python bindings (stable-diffusion-cpp-python)
on the bench's model written as one original-layout fp16 .safetensors file, timed as diffcli's path is (first image,
then the median of --repeats), with the seed-0 image saved for PSNR.

Standalone, importing nothing from diffcli, so it may run in a venv of its own ($DIFFCLI_SDCPP_PYTHON: the bindings
compile stable-diffusion.cpp from source when installed). Usage: python bench_sdcpp.py CHECKPOINT SETTINGS_JSON;
prints one JSON line.
"""

import json
import statistics
import sys
import time

SAMPLER = "euler"  # stable-diffusion.cpp has no PNDM (the SD 1.5 config's scheduler): its deterministic Euler instead


def main() -> None:
    import numpy as np
    from stable_diffusion_cpp import StableDiffusion

    checkpoint, settings = sys.argv[1], json.loads(sys.argv[2])
    size, steps, cfg, prompt = settings["size"], settings["steps"], settings["cfg"], settings["prompt"]
    started = time.perf_counter()
    engine = StableDiffusion(model_path=checkpoint, n_threads=settings["threads"], verbose=False)
    load_s = time.perf_counter() - started

    def call(seed: int = 0):
        begin = time.perf_counter()
        images = engine.generate_image(prompt=prompt, cfg_scale=cfg, sample_steps=steps, width=size, height=size,
                                       seed=seed, sample_method=SAMPLER)
        return time.perf_counter() - begin, np.asarray(images[0].convert("RGB"), dtype=np.float32) / 255

    first, image = call()
    np.save(settings["image"], image)
    times = [call()[0] for _ in range(settings["repeats"])]
    from importlib.metadata import version

    print(json.dumps({"first_image_s": round(first, 3), "s_per_image_end_to_end": round(statistics.median(times), 3),
                      "load_s": round(load_s, 3), "sampler": SAMPLER, "precision": "fp16 file",
                      "sdcpp": version("stable-diffusion-cpp-python")}))


if __name__ == "__main__":
    main()
