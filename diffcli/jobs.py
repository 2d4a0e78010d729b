"""The typed Job: what one command line, batch line or request asks for, in sections, and the one builder.

`build(command, values)` is how the CLI, batch lines and (later) the server make Jobs: values keyed by option name
(flags.COMMANDS), comma lists of swept options expanded into one Job per combination. plan.check_job checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from diffcli.errors import UsageError


@dataclass
class Prompt:
    text: str = ""
    negative: str = ""
    weighting: bool = True  # A1111 attention syntax; False: brackets are literal text
    clip_skip: int | None = None  # None: the model's last layer (A1111's 1)
    max_sequence_length: int | None = None  # T5/LLM tokens of the prompt; None: the pipeline's own default


@dataclass
class Sampling:
    cfg: float | None = None  # None: the model's recommendation, else 7.5 (A1111's default)
    steps: int | None = None  # None: the model's recommendation, else what suits the scheduler
    seed: int | None = None  # None or -1: drawn at random, then always reported
    scheduler: str | None = None  # None: the scheduler the model ships with (or recommends)
    width: int | None = None  # None: the model's native size, or the input image's
    height: int | None = None
    aspect: str | None = None  # W:H: the size of about the native area in that shape (plan.size_for_aspect)
    num_images: int = 1
    batch_size: int = 1  # images per pipeline call; memory grows linearly with it
    true_cfg: float | None = None  # FLUX.1's true_cfg_scale (with the negative prompt), beside --cfg's distilled guidance
    variation_seed: int | None = None  # A1111 subseed: image i's noise slerped toward variation_seed + i
    variation_strength: float | None = None
    prompt_sr: str | None = None  # this sweep cell's --prompt-sr replacement: a grid label and a metadata field


@dataclass
class ModelSettings:
    """The model, its replacements, and where and how it runs (pipeline.load_for_job reads these)."""

    name: str | None = None  # --model; None: $DIFFCLI_MODEL, then the bundled model
    config: str | None = None  # --model-config: diffusers folder describing a single-file checkpoint
    # --base: diffusers folder or Hub id whose text encoders, VAE and scheduler complete a transformer-only --model file
    # (SD3, FLUX.1 .safetensors or .gguf); None: the registry's default for the file's variant
    base: str | None = None
    vae: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    safety_checker: bool = False
    allow_pickle: bool = False  # trust: from the command line only, never from a jobs file
    optimize: bool = True  # the CUDA fast path (compile, CUDA graphs); off with --no-optimize or --deep-cache
    low_vram: bool | None = None  # None: the automatic memory plan (memory.py) from the weights and the free memory
    threads: int | None = None  # None: OMP_NUM_THREADS, else the cores other processes leave free
    backend: str = "auto"  # the CPU engine of an SD U-Net, text encoders and VAE decoder (backend.py): auto, torch or openvino
    deep_cache: int | None = None  # run the whole U-Net every N steps


@dataclass
class Output:
    out: str | None = None  # None: $DIFFCLI_OUTPUT, then ./outputs/
    overwrite: bool = False


@dataclass
class SecondPasses:
    hires: float | None = None  # scale of the hires fix
    hires_steps: int | None = None
    hires_strength: float | None = None  # None: the model's recommendation (plan resolves it)
    hires_upscaler: str = "latent"
    hires_upscaler_model: str | None = None
    refiner: str | None = None  # None: the model's default refiner if any; "none": none at all
    refiner_start: float | None = None


@dataclass
class Adapters:
    lora: list = field(default_factory=list)  # --lora FILE[:SCALE]
    lora_dir: str | None = None
    embedding: list = field(default_factory=list)  # --embedding FILE[:TOKEN]
    embedding_dir: str | None = None
    ip_adapter: list = field(default_factory=list)  # --ip-adapter MODEL, repeatable (ip_adapter.py)
    ip_image: list = field(default_factory=list)  # --ip-image IMAGE, one per adapter, in the same order
    ip_scale: list = field(default_factory=list)  # --ip-scale S (text), one per adapter or none (all 1)
    ip_encoder: str | None = None  # --ip-encoder: the CLIP image encoder; None: image_encoder beside the adapter


@dataclass
class Controls:
    """ControlNet units (--control TYPE:IMAGE;model=...;weight=...), checked and resolved by controlnet.resolve."""

    units: list = field(default_factory=list)  # the --control texts, in order (ControlNet 0, 1, ...)
    guess_mode: bool = False  # the ControlNets see no prompt (A1111's "ControlNet is more important")


@dataclass
class ImageInput:  # img2img
    input: str = ""
    strength: float = 0.75
    resize: str = "fit"


@dataclass
class MaskInput:  # inpaint
    input: str = ""
    mask: str | None = None
    mask_blur: int = 4
    invert_mask: bool = False
    mask_from_alpha: bool = False
    masked_only: bool = False
    padding: int = 32
    resize_mask: bool = False
    fill: str = "original"
    strength: float = 1.0


@dataclass
class OutpaintInput:
    input: str = ""
    extend: str = "all=64"
    feather: int = 8
    fill: str = "fill"
    strength: float = 1.0


@dataclass
class UpscaleInput:
    input: str = ""
    scale: int = 4
    method: str = "x4"
    noise_level: int | None = None  # None: the model's diffcli.json noise_level, else DEFAULT_NOISE_LEVEL
    tile: int | None = None  # None: automatic (tasks.AUTO_TILE)
    tile_overlap: int | None = None


@dataclass
class EditInput:  # edit: instruction editing (FLUX.1 Kontext, Qwen-Image-Edit)
    input: str = ""
    image: list = field(default_factory=list)  # --image REF, repeatable: reference images after IMAGE (Picture 2, ...)
    resize: str = "fit"  # with --width/--height: how IMAGE takes that size


INPUTS = {"img2img": ImageInput, "inpaint": MaskInput, "outpaint": OutpaintInput, "upscale": UpscaleInput,
          "edit": EditInput}
SWEPT = ("cfg", "steps", "seed", "scheduler", "prompt_sr")  # options whose comma lists make one Job per value


@dataclass
class Job:
    """Everything needed to produce the images of one command line (or one batch line, one sweep cell)."""

    command: str = "txt2img"  # txt2img | img2img | inpaint | outpaint | upscale | edit
    prompt: Prompt = field(default_factory=Prompt)
    sampling: Sampling = field(default_factory=Sampling)
    model: ModelSettings = field(default_factory=ModelSettings)
    output: Output = field(default_factory=Output)
    second: SecondPasses = field(default_factory=SecondPasses)
    adapters: Adapters = field(default_factory=Adapters)
    controls: Controls = field(default_factory=Controls)
    inputs: ImageInput | MaskInput | OutpaintInput | UpscaleInput | EditInput | None = None

    @property
    def task(self) -> str:
        """The pipeline task: outpaint is inpainting a padded canvas."""
        return "inpaint" if self.command == "outpaint" else self.command

    def copy(self, **sampling) -> Job:
        """A deep-enough copy (sections are replaced, not shared) with sampling fields changed."""
        return replace(self, prompt=replace(self.prompt), sampling=replace(self.sampling, **sampling),
                       model=replace(self.model), output=replace(self.output), second=replace(self.second),
                       adapters=replace(self.adapters, lora=list(self.adapters.lora), embedding=list(self.adapters.embedding),
                                        ip_adapter=list(self.adapters.ip_adapter), ip_image=list(self.adapters.ip_image),
                                        ip_scale=list(self.adapters.ip_scale)),
                       controls=replace(self.controls, units=list(self.controls.units)),
                       inputs=_copy_inputs(self.inputs))


def _copy_inputs(inputs):
    """A copy of a job's inputs section; its lists (edit's --image) not shared."""
    if inputs is None:
        return None
    return replace(inputs, image=list(inputs.image)) if isinstance(inputs, EditInput) else replace(inputs)


SECTIONS = {"sampling": Sampling, "model": ModelSettings, "output": Output, "second": SecondPasses, "adapters": Adapters,
            "controls": Controls}
RENAMED = {"prompt": ("prompt", "text"), "negative": ("prompt", "negative"), "weighting": ("prompt", "weighting"),
           "clip_skip": ("prompt", "clip_skip"), "max_sequence_length": ("prompt", "max_sequence_length"), "model": ("model", "name"), "model_config": ("model", "config"),
           "control": ("controls", "units")}


def build(command: str, values: dict) -> list[Job]:
    """The Jobs of one command line, batch line or request: `values` keyed by option name; swept options may hold a
    sweep.Values list (one Job per combination). Values are checked by plan.check_job."""
    from diffcli import sweep

    values = dict(values)
    swept = {name: values.pop(name, None) for name in SWEPT}
    job = Job(command)
    if command in INPUTS:
        job.inputs = INPUTS[command]()
    places = _places(command)
    for name, value in values.items():
        if name not in places:
            raise UsageError(f"{command} does not take {name!r}")
        section, attribute = places[name]
        if value is not None:
            setattr(getattr(job, section), attribute, list(value) if isinstance(value, tuple) else value)
    if job.model.deep_cache:  # its hooks on the U-Net's blocks and a compiled U-Net exclude each other
        job.model.optimize = False
    lists = {name: (value if isinstance(value, sweep.Values) else sweep.Values([value])) for name, value in swept.items()
             if value is not None}
    return sweep.expand(job, **lists)


def _places(command: str) -> dict[str, tuple[str, str]]:
    """Option name -> (section, attribute) of a command's Job."""
    places, renamed = dict(RENAMED), set(RENAMED.values())
    for section, cls in SECTIONS.items():
        places.update({f.name: (section, f.name) for f in fields(cls)
                       if f.name not in places and (section, f.name) not in renamed})
    if command in INPUTS:
        places.update({f.name: ("inputs", f.name) for f in fields(INPUTS[command])})
    return places


def values_of(job: Job) -> dict:
    """The option values build(job.command, values) makes this very job from (one sweep cell): build's inverse, for
    sending a job on (the --server client)."""
    return {name: getattr(getattr(job, section), attribute) for name, (section, attribute) in _places(job.command).items()}


def record(job: Job) -> dict:
    """The job's settings beyond the core fields, flat, as image metadata records them (and replay reads them)."""
    prompt, sampling, second, adapters, inputs = job.prompt, job.sampling, job.second, job.adapters, job.inputs
    out = {"weighting": prompt.weighting}
    optional = {"clip_skip": prompt.clip_skip, "deep_cache": job.model.deep_cache, "vae": job.model.vae,
                "base": job.model.base, "model_config": job.model.config, "lora_dir": adapters.lora_dir,
                "embedding_dir": adapters.embedding_dir,
                "prompt_sr": sampling.prompt_sr, "max_sequence_length": prompt.max_sequence_length,
                "true_cfg": sampling.true_cfg, "backend": job.model.backend if job.model.backend != "auto" else None}
    if sampling.variation_seed is not None:
        optional.update(variation_seed=sampling.variation_seed, variation_strength=sampling.variation_strength)
    if second.hires:
        optional.update(hires_scale=second.hires, hires_upscaler=second.hires_upscaler)
        out.update(hires_steps=second.hires_steps, hires_strength=second.hires_strength)
        if second.hires_upscaler == "x4":
            out["hires_upscaler_model"] = second.hires_upscaler_model
    out.update({key: value for key, value in optional.items() if value})
    if second.refiner == "none":  # recorded, so a replay keeps a model's default refiner away too
        out["refiner"] = None
    elif second.refiner:
        out.update(refiner=second.refiner, refiner_start=second.refiner_start)
    if isinstance(inputs, ImageInput):
        out.update(input=inputs.input, strength=inputs.strength, resize=inputs.resize)
    elif isinstance(inputs, MaskInput):
        out.update(input=inputs.input, mask=inputs.mask or "alpha", mask_blur=inputs.mask_blur,
                   invert_mask=inputs.invert_mask, masked_only=inputs.masked_only, padding=inputs.padding,
                   strength=inputs.strength, fill=inputs.fill)
    elif isinstance(inputs, OutpaintInput):
        out.update(input=inputs.input, outpaint=inputs.extend, feather=inputs.feather, strength=inputs.strength,
                   fill=inputs.fill)
    elif isinstance(inputs, EditInput):
        out.update(input=inputs.input, resize=inputs.resize, **({"images": list(inputs.image)} if inputs.image else {}))
    elif isinstance(inputs, UpscaleInput):
        out.update(input=inputs.input, scale=inputs.scale, method=inputs.method, tile=inputs.tile,
                   tile_overlap=inputs.tile_overlap)
    return out
