"""Every option of every command, declared once (declare.Flag): Typer builds the commands from these tables, and
jobs-file values and batch's pass-through flags are converted by the same entries, so the three cannot disagree.

Nothing heavy is imported here: `diffcli --help` builds every command from these tables.
"""

from __future__ import annotations

from dataclasses import replace

from diffcli.declare import Flag
from diffcli.sweep import parse_cfg, parse_prompt_sr, parse_scheduler, parse_seed, parse_steps


def group(*flags: Flag) -> dict[str, Flag]:
    return {flag.name: flag for flag in flags}


SEED_HELP = "Seed of image 1; image i uses seed+i; -1: random. Default: random, always reported."
PROMPT = group(
    Flag("negative", ("--negative", "-n"), str, "", "What the image should not show."),
    Flag("weighting", ("--weighting",), bool, True, "A1111 attention syntax: (word), ((word)), \\[word], (word:1.3); "
         "\\( is a literal bracket.", off="--no-weighting"),
    Flag("clip_skip", ("--clip-skip",), int, None, "Skip the last CLIP layers, counted as in A1111 (1 = none, 2 = "
         "penultimate).", min=1, max=12),
    Flag("max_sequence_length", ("--max-sequence-length",), int, None, "Most T5/LLM prompt tokens (SD3, FLUX.1 up to "
         "512, Qwen-Image 1024; Z-Image); default: the pipeline's own. CLIP-only models refuse it.", min=1,
         metavar="N"),
)
SAMPLING = group(
    Flag("cfg", ("--cfg",), "sweep", None, "Guidance scale (default 7.5, or the model's recommendation); a comma list "
         "sweeps.", parser=parse_cfg, metavar="CFG[,CFG...]"),
    Flag("steps", ("--steps",), "sweep", None, "Denoising steps (default suits the scheduler); a comma list sweeps.",
         parser=parse_steps, metavar="N[,N...]"),
    Flag("seed", ("--seed",), "sweep", None, SEED_HELP + " A comma list sweeps (-1 in it: a random seed).",
         parser=parse_seed, metavar="S[,S...]"),
    Flag("true_cfg", ("--true-cfg",), float, None, "FLUX.1 (and Kontext): true CFG scale with --negative, beside "
         "--cfg's distilled guidance (above 1: a second, unconditional pass each step).", min=1.0),
    Flag("num_images", ("--num-images", "-N"), int, 1, "How many images to make."),
    Flag("batch_size", ("--batch-size",), int, 1, "Images per pipeline call (memory grows with it)."),
    Flag("scheduler", ("--scheduler",), "sweep", None, "Sampler by name, A1111 names too (see `diffcli schedulers`); a "
         "comma list sweeps.", parser=parse_scheduler, metavar="NAME[,NAME...]"),
    Flag("prompt_sr", ("--prompt-sr",), "sweep", None, "Prompt S/R: one job per item, each replacing the first item in "
         "the prompt (CSV quoting: \"a, b\",c); sweeps and --grid like --cfg.", parser=parse_prompt_sr,
         metavar="WORD,REPLACEMENT[,...]"),
)
WIDTH = Flag("width", ("--width",), int, None, "Width in pixels (default: the model's native size).")
HEIGHT = Flag("height", ("--height",), int, None, "Height in pixels (default: the model's native size).")
ASPECT = Flag("aspect", ("--aspect",), str, None, "Shape W:H (16:9, 2:3, 1.5): the size of about the model's "
              "native area in that shape, each side a multiple the model takes; with --width or --height, the other "
              "side.", metavar="W:H")
VARIATION = group(
    Flag("variation_seed", ("--variation-seed",), int, None, "Seed of the noise to vary toward (image i uses variation "
         "seed + i).", min=0),
    Flag("variation_strength", ("--variation-strength",), float, None, "0 = the seed's image, 1 = the variation "
         "seed's; needs --variation-seed.", min=0.0, max=1.0),
)
MODEL = Flag("model", ("--model", "-m"), str, None, "Bundled name, Hub id, diffusers folder or .safetensors file.",
             envvar="DIFFCLI_MODEL")
RUNTIME = group(
    Flag("model_config", ("--model-config",), str, None, "Diffusers folder describing a non-standard single-file "
         "checkpoint."),
    Flag("base", ("--base",), str, None, "Diffusers folder or Hub id whose text encoders and VAE complete a "
         "transformer-only SD3/FLUX.1 file (.safetensors, .gguf); default: the family's official repo.",
         metavar="REPO_OR_DIR"),
    Flag("vae", ("--vae",), str, None, "Replace the model's VAE (A1111's SD VAE): a .safetensors file, a diffusers "
         "folder or a Hub id."),
    Flag("device", ("--device",), str, "auto", "auto | cuda | cuda:N | mps | cpu.", envvar="DIFFCLI_DEVICE"),
    Flag("dtype", ("--dtype",), str, "auto", "auto (fp16 on GPU, bf16 there for FLUX.1/2, SD3, Qwen-Image and Z-Image; on the CPU bf16 in channels_last where it has AMX or AVX512-BF16 and the model is large, "
         "else fp32) | fp16 | bf16 | fp32."),
    Flag("safety_checker", ("--safety-checker",), bool, False, "Run the model's safety checker (off by default)."),
    Flag("allow_pickle", ("--allow-pickle",), bool, False, "Allow pickle-based weights (.ckpt/.bin); unsafe for "
         "untrusted files."),
    Flag("optimize", ("--optimize",), bool, True, "CUDA fast path: compiled U-Net and VAE with CUDA graphs.",
         off="--no-optimize"),
    Flag("low_vram", ("--low-vram",), "bools", None, "Attention slicing, VAE tiling, CPU offload; --no-low-vram: all on "
         "the device (default: offloading and VAE tiling chosen from the weights' size and the free memory).",
         off="--no-low-vram"),
    Flag("threads", ("--threads",), int, None, "CPU threads (default: OMP_NUM_THREADS, else 1 for a model under 100 M "
         "denoiser parameters, else the cores other processes leave free).", envvar="DIFFCLI_THREADS"),
    Flag("backend", ("--backend",), str, "auto", "CPU engine of an SD 1.x/2.x/XL U-Net, text encoders and VAE decoder: auto (OpenVINO for "
         "a model of 100 M denoiser parameters or more where it is installed: bf16 on a CPU with native bf16, else "
         "f32; else torch) | torch | openvino (pip install 'diffcli[openvino]').",
         envvar="DIFFCLI_BACKEND"),
)
DEEP_CACHE = Flag("deep_cache", ("--deep-cache",), int, None, "DeepCache: run the whole U-Net every N steps, reuse its "
                  "deep features between (faster, slightly different; U-Net not compiled).", min=2)
OUTPUT = group(
    Flag("out", ("--out", "-o"), str, None, "File, folder, or name template like '{index:05d}-{seed}-{slug}.png'. "
         "Default: outputs/.", envvar="DIFFCLI_OUTPUT"),
    Flag("overwrite", ("--overwrite",), bool, False, "Replace existing files instead of refusing."),
)
REPORTING = group(  # whole-run switches: how results are shown, never settings of one job
    Flag("as_json", ("--json",), bool, False, "One JSON object per image on stdout instead of paths."),
    Flag("quiet", ("--quiet", "-q"), bool, False, "Nothing on stderr but errors."),
)
SERVER = Flag("server", ("--server",), str, None, "Send the jobs to a running `diffcli serve` at URL (http://user:pass@host:port "
              "with --api-auth) and write the files here; auto: the local server when it answers, else run here.",
              envvar="DIFFCLI_SERVER", metavar="URL")
GRID = Flag("grid", ("--grid",), bool, False, "Also write an X/Y contact sheet of a sweep, with axis labels.")
ADAPTERS = group(
    Flag("lora", ("--lora",), "texts", None, "LoRA file, folder or Hub id, with an optional :SCALE (default 1); "
         "repeatable."),
    Flag("lora_dir", ("--lora-dir",), str, None, "Folder for the prompt's <lora:name:weight> tags.",
         envvar="DIFFCLI_LORA_DIR"),
    Flag("embedding", ("--embedding",), "texts", None, "Textual-inversion file, with an optional :TOKEN (default: file "
         "name); repeatable."),
    Flag("embedding_dir", ("--embedding-dir",), str, None, "Folder of embeddings, used when their file name appears in "
         "the prompt.", envvar="DIFFCLI_EMBEDDING_DIR"),
)
SECOND_PASSES = group(
    Flag("hires", ("--hires",), float, None, "Hires fix: upscale the first pass by SCALE and refine it with img2img."),
    Flag("hires_steps", ("--hires-steps",), int, None, "Steps of the hires pass (default: --steps, or the model's "
         "recommendation when --hires-strength is not given).", min=1),
    Flag("hires_strength", ("--hires-strength",), float, None, "Denoising strength of the hires pass (0..1; default: "
         "the model's recommendation, else 0.7)."),
    Flag("hires_upscaler", ("--hires-upscaler",), str, "latent", "latent (upscale the latents), lanczos (the pixels) "
         "or x4 (an SD x4 upscaler model)."),
    Flag("hires_upscaler_model", ("--hires-upscaler-model",), str, None, "SD x4 upscaler for --hires-upscaler x4 "
         "(default: $DIFFCLI_UPSCALE_MODEL, else bundled tiny-shapes-x4)."),
    Flag("refiner", ("--refiner",), str, None, "Model (bundled name, Hub id, folder or file) that finishes the base "
         "model's image: an SDXL refiner for SDXL, an SD 1.x/2.x model for those; 'none' turns off a model's default "
         "refiner."),
    Flag("refiner_start", ("--refiner-start",), float, None, "Fraction of the schedule the base model runs before the "
         "refiner takes over (default 0.8, or the model's own)."),
)
CONTROL = group(
    Flag("control", ("--control",), "texts", None, "ControlNet: TYPE:IMAGE;model=DIR_OR_ID[;weight=1;start=0;end=1;"
         "resize=crop|fit|stretch;mode=M;PARAM=V] with TYPE a `diffcli preprocess` type (canny, scribble, none...) and "
         "mode a union ControlNet's control type (default TYPE's); repeatable (several ControlNets)."),
    Flag("guess_mode", ("--guess-mode",), bool, False, "The ControlNets see no prompt (A1111's control mode "
         "\"ControlNet is more important\"; SD 1.x, 2.x and XL)."),
)
IP_ADAPTER = group(
    Flag("ip_adapter", ("--ip-adapter",), "texts", None, "IP-Adapter (SD 1.x, SDXL, FLUX.1): a .safetensors file, a folder "
         "holding one, or a Hub file owner/repo/subfolder/file.safetensors; repeatable, each with its --ip-image."),
    Flag("ip_image", ("--ip-image",), "texts", None, "The image prompt of each --ip-adapter, in the same order."),
    Flag("ip_scale", ("--ip-scale",), "texts", None, "Strength of each --ip-adapter, in the same order (default 1; 0 "
         "turns it off)."),
    Flag("ip_encoder", ("--ip-encoder",), str, None, "CLIP image encoder of the adapters (folder or Hub "
         "owner/repo/subfolder); default: the image_encoder folder beside the adapter file (FLUX.1: else "
         "openai/clip-vit-large-patch14)."),
)
INPUT = Flag("input", (), str, None, "Input image (PNG, JPEG, WebP...; EXIF orientation applied).")
STRENGTH_HELP = "How much to change the input: 0 keeps it, 1 ignores it."
IMG2IMG = group(
    Flag("strength", ("--strength",), float, 0.75, STRENGTH_HELP),
    Flag("resize", ("--resize",), str, "fit", "With --width/--height: fit (pad), crop or stretch."),
)
INPAINT = group(
    Flag("mask", ("--mask",), str, None, "Mask image: white = repaint, black = keep."),
    Flag("mask_blur", ("--mask-blur",), int, 4, "Feather the mask edge by PX pixels."),
    Flag("invert_mask", ("--invert-mask",), bool, False, "Repaint the black part instead."),
    Flag("mask_from_alpha", ("--mask-from-alpha",), bool, False, "Repaint the input's transparent pixels."),
    Flag("masked_only", ("--masked-only",), bool, False, "Inpaint a crop around the mask at full resolution, paste back."),
    Flag("padding", ("--padding",), int, 32, "Pixels around the mask in the --masked-only crop."),
    Flag("resize_mask", ("--resize-mask",), bool, False, "Stretch a mask whose size differs from the image."),
    Flag("fill", ("--fill",), str, "original", "What the masked area starts from (A1111's masked content): original "
         "(the input's pixels), fill (the colours around it), latent-noise, latent-nothing. Matters below --strength 1."),
    Flag("strength", ("--strength",), float, 1.0, STRENGTH_HELP),
)
OUTPAINT = group(
    Flag("extend", ("--extend",), str, "all=64", "Pixels to add: left=128,right=128,top=0,bottom=64 or all=64."),
    Flag("feather", ("--feather",), int, 8, "Width of the soft seam into the original, in pixels."),
    Flag("fill", ("--fill",), str, "fill", "What the new area starts from: fill (the colours around it), original (the "
         "stretched edge pixels), latent-noise, latent-nothing. Matters below --strength 1."),
    Flag("strength", ("--strength",), float, 1.0, STRENGTH_HELP),
)
UPSCALE = group(
    Flag("scale", ("--scale",), int, 4, "Upscaling factor: 4 with --method x4, 2 with --method latent."),
    Flag("method", ("--method",), str, "x4", "x4 (SD x4 upscaler) or latent (SD x2 latent upscaler)."),
    Flag("noise_level", ("--noise-level",), int, None, "Noise added to the input (0-350): more invents more detail "
         "(default: the model's recommendation, else 20)."),
    Flag("tile", ("--tile",), int, None, "Process the input in tiles of SIZE pixels; 0: whole image. Default: 256 (x4) "
         "or 512 (latent) when the input is larger."),
    Flag("tile_overlap", ("--tile-overlap",), int, None, "Input pixels shared by neighbouring tiles, up to three quarters of "
         "--tile: more is slower and closer to the untiled result (default: half of --tile)."),
)
EDIT = group(
    Flag("image", ("--image",), "texts", None, "A reference image besides the input (Picture 2, 3... of the instruction), "
         "for models that take several (Qwen-Image-Edit-2509, FLUX.2); repeatable."),
    Flag("resize", ("--resize",), str, "fit", "With --width/--height: fit (pad), crop or stretch the input."),
)
UPSCALE_MODEL = replace(MODEL, envvar="DIFFCLI_UPSCALE_MODEL", help="An SD x4 upscaler (default: bundled tiny-shapes-x4) "
                        "or, with --method latent, an SD x2 latent upscaler.")


def prompt_argument(help_text: str, default: str | None = None) -> Flag:
    return Flag("prompt", (), str, default, help_text)


def _drop(options: dict[str, Flag], *names: str) -> dict[str, Flag]:
    return {name: flag for name, flag in options.items() if name not in names}


IMAGE_COMMON = {**SAMPLING, **PROMPT, **ADAPTERS, "model": MODEL, **RUNTIME, "deep_cache": DEEP_CACHE, **OUTPUT}
# The options of each generating command, in --help order: what a batch line of that command may set, too.
COMMANDS: dict[str, dict[str, Flag]] = {
    "txt2img": {"prompt": prompt_argument("What to draw."), **IMAGE_COMMON, "width": WIDTH, "height": HEIGHT,
                "aspect": ASPECT, **VARIATION, **SECOND_PASSES, **CONTROL, **IP_ADAPTER},
    "img2img": {"input": INPUT, "prompt": prompt_argument("What the result should show."), **IMG2IMG, **IMAGE_COMMON,
                "width": WIDTH, "height": HEIGHT, **CONTROL, **IP_ADAPTER},
    "inpaint": {"input": INPUT, "prompt": prompt_argument("What to paint into the masked area."), **INPAINT,
                **IMAGE_COMMON, "width": WIDTH, **CONTROL, **IP_ADAPTER},
    "outpaint": {"input": INPUT, "prompt": prompt_argument("What the new area should show."), **OUTPAINT,
                 **IMAGE_COMMON, **IP_ADAPTER},
    "edit": {"input": INPUT, "prompt": prompt_argument("The instruction, e.g. \"make the car blue\"."), **EDIT,
             **IMAGE_COMMON, "width": WIDTH, "height": HEIGHT},
    "upscale": {"input": INPUT, "prompt": prompt_argument("Optional description of the image.", ""), **UPSCALE,
                **_drop(IMAGE_COMMON, "model", "model_config", "base", "safety_checker", "lora", "lora_dir", "embedding",
                        "embedding_dir", "deep_cache", "clip_skip", "max_sequence_length", "true_cfg"),
                "model": UPSCALE_MODEL},
}


# Commands the server does not run (no --server; a request naming one is refused): none now (edit's --image files
# travel in the request, as INPUT does).
LOCAL_ONLY: tuple[str, ...] = ()


REPLAY = {  # replay's flags override the image's recorded settings
    "image": Flag("image", (), str, None, "An image made by diffcli, or by A1111 or another tool writing A1111's "
                  "parameters text."),
    "verify": Flag("verify", ("--verify",), bool, False, "Compare the replay with IMAGE: max and mean absolute pixel "
                   "difference (stderr, or a 'verify' entry with --json)."),
    "model": Flag("model", ("--model", "-m"), str, None, "Use this model instead of the recorded one (bundled name, Hub "
                  "id, folder or file)."),
    "steps": Flag("steps", ("--steps",), int, None, "Denoising steps (default: the recorded ones)."),
    "cfg": Flag("cfg", ("--cfg",), float, None, "Guidance scale (default: the recorded one)."),
    "seed": Flag("seed", ("--seed",), int, None, "Seed (default: the recorded one); -1: random, reported."),
    "scheduler": Flag("scheduler", ("--scheduler",), str, None, "Sampler by name (default: the recorded one; A1111 "
                      "names are mapped)."),
    "width": Flag("width", ("--width",), int, None, "Width in pixels (default: the recorded size)."),
    "height": Flag("height", ("--height",), int, None, "Height in pixels (default: the recorded size)."),
    **RUNTIME,
    "dtype": Flag("dtype", ("--dtype",), str, None, "fp16 | bf16 | fp32 | auto; default: the recorded one on the same "
                  "kind of device, else auto."),
    "backend": Flag("backend", ("--backend",), str, None, "auto | torch | openvino; default: the recorded one (OpenVINO "
                    "where it is installed), else auto."),
    **OUTPUT, **REPORTING, **ADAPTERS,
}
BATCH = {  # batch's own options, then the per-job ones that are defaults for every line
    "file": Flag("file", (), str, None, "Jobs: prompts (.txt, one per line), JSON Lines (.jsonl) or CSV (.csv); - reads stdin."),
    "fmt": Flag("fmt", ("--format",), str, None, "text | jsonl | csv (default: from the extension; stdin: sniffed)."),
    "command": Flag("command", ("--command",), str, "txt2img", "Command of lines that name none (a line may say "
                    "\"command\": ...)."),
    "wildcards": Flag("wildcards", ("--wildcards",), str, None, "Folder of NAME.txt files for __NAME__ in prompts."),
    "random": Flag("random", ("--random",), int, None, "Draw N prompts from each {a|b} template instead of all combinations."),
    "dry_run": Flag("dry_run", ("--dry-run",), bool, False, "Print the expanded jobs (seeds, paths, ids) as JSON lines; "
                    "load no model."),
    "manifest": Flag("manifest", ("--manifest",), str, None, "Record of finished images (default: diffcli-manifest.jsonl "
                     "in the output folder)."),
    "force": Flag("force", ("--force",), bool, False, "Make every image again, even those the manifest records."),
    "processes": Flag("processes", ("--processes",), int, 1, "Local processes (one per GPU); same as accelerate launch."),
    "negative": COMMANDS["txt2img"]["negative"],
    "cfg": Flag("cfg", ("--cfg",), float, None, "Guidance scale (default 7.5, or the model's recommendation)."),
    "steps": Flag("steps", ("--steps",), int, None, "Denoising steps (default suits the scheduler)."),
    "seed": Flag("seed", ("--seed",), int, None, "Base seed: a job without a seed gets base + images before it. "
                 "Default (or -1): recorded in the manifest, else random."),
    "width": WIDTH, "height": HEIGHT,
    **{name: COMMANDS["txt2img"][name] for name in ("num_images", "batch_size")},
    "scheduler": Flag("scheduler", ("--scheduler",), str, None, "Sampler by name, A1111 names too (see `diffcli "
                      "schedulers`)."),
    "model": MODEL, **{name: RUNTIME[name] for name in ("model_config", "base", "device", "dtype", "safety_checker",
                                                              "allow_pickle", "threads", "vae", "backend")},
    "out": replace(OUTPUT["out"], help="Folder or template; default outputs/{job:05d}-{seed}-{slug}.png."),
    "overwrite": OUTPUT["overwrite"], **REPORTING, "server": SERVER,
}


SERVE = {  # `diffcli serve`: the server's command line is the only source of trust and file access
    "host": Flag("host", ("--host",), str, "127.0.0.1", "Address to listen on; another than loopback needs --api-auth "
                 "or --no-auth."),
    "port": Flag("port", ("--port",), int, 7860, "Port (A1111's default)."),
    "model": replace(MODEL, help="Model loaded at start and used when a request names none (default: the bundled "
                     "model)."),
    "models_dir": Flag("models_dir", ("--models-dir",), str, None, "Folder of models (diffusers folders, .safetensors) "
                       "requests may name; nothing outside it is reachable.", envvar="DIFFCLI_MODELS_DIR"),
    "lora_dir": replace(ADAPTERS["lora_dir"], help="Folder for <lora:name:weight> tags in prompts."),
    "controlnet_dir": Flag("controlnet_dir", ("--controlnet-dir",), str, None, "Folder of ControlNet folders requests "
                           "may name (A1111's alwayson_scripts.controlnet, diffcli's --control through --server)."),
    "api_auth": Flag("api_auth", ("--api-auth",), str, None, "HTTP Basic users: user:pass[,user2:pass2].",
                     envvar="DIFFCLI_API_AUTH"),
    "no_auth": Flag("no_auth", ("--no-auth",), bool, False, "Allow a non-loopback --host without --api-auth."),
    "queue": Flag("queue", ("--queue",), int, 8, "Requests that may wait; more are answered 503 with Retry-After."),
    "devices": Flag("devices", ("--devices",), str, "auto", "One worker per device: cuda:0,cuda:1; auto: the best one."),
    "threads": RUNTIME["threads"],
    "keep_models": Flag("keep_models", ("--keep-models",), int, 2, "Models kept loaded per worker (least recently "
                        "used dropped)."),
    "max_steps": Flag("max_steps", ("--max-steps",), int, 150, "Most steps a request may ask for."),
    "max_pixels": Flag("max_pixels", ("--max-pixels",), int, 2048 * 2048, "Most pixels of one image (hires included)."),
    "max_images": Flag("max_images", ("--max-images",), int, 16, "Most images one request may make."),
    "max_body_mb": Flag("max_body_mb", ("--max-body-mb",), float, 64.0, "Largest request body (base64 images "
                        "included), in MB."),
    "allow_pickle": replace(RUNTIME["allow_pickle"], help="Also offer .ckpt/.bin files of --models-dir (unsafe for "
                            "untrusted files)."),
}


PREPROCESS = {  # `diffcli preprocess`: a control map for ControlNet; types and parameters are diffcli.control's
    "image": Flag("image", (), str, None, "Input image (PNG, JPEG, WebP...; EXIF orientation applied)."),
    "type": Flag("type", ("--type", "-t"), str, "canny", "The map: canny[:low=100,high=200], "
                 "scribble[:level=32,thicken=1], threshold[:level=127], lineart[:sigma=6], tile[:factor=2], "
                 "blur[:sigma=9], none; with controlnet_aux and weights in $DIFFCLI_ANNOTATORS: depth, openpose, "
                 "normal, mlsd, hed, softedge, lineart_anime.", metavar="TYPE[:KEY=VALUE,...]"),
    "out": Flag("out", ("--out", "-o"), str, None, "A .png file (lossless) or a folder. Default: "
                "outputs/<image stem>-<type>.png."),
    "overwrite": OUTPUT["overwrite"],
    "allow_pickle": replace(RUNTIME["allow_pickle"], help="Allow the model-based types, whose annotator weights "
                            "(.pth) are pickles; only for files you trust."),
    "as_json": replace(REPORTING["as_json"], help="One JSON object on stdout (path, type, parameters, size) "
                       "instead of the path."),
}
