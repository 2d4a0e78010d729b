"""The model families diffcli runs: one declarative entry each, and the lookups the rest of the code uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from diffcli.errors import ModelError, UsageError

# The tasks a family names a pipeline class for (outpaint runs the inpaint pipeline, hires the img2img one).
TASKS = ("txt2img", "img2img", "inpaint", "upscale")
# What prompts.encode makes for a family's text encoders: hidden states, hidden states plus a pooled embedding
# (SDXL's added conditioning), or nothing (no text encoder of its own).
PROMPT_ENCODERS = ("clip", "clip+clip-pooled", "none")
# GPUs with less memory than this get --low-vram automatically, unless the family says otherwise.
LOW_VRAM_GIB = 6.0


@dataclass(frozen=True)
class CallStyle:
    """How a diffusers pipeline class takes the per-call inputs run_plan passes (the upscalers differ)."""

    prompt_embeds: bool = True  # our (weighted) embeddings; False: plain strings, the pipeline encodes them itself
    repeat_image: bool = False  # one input image per generator: the pipeline does not repeat it for a prompt batch
    step_end_callback: bool = True  # callback_on_step_end; False: the older per-step `callback(i, t, latents)`


@dataclass(frozen=True)
class SingleFile:
    """How an original-layout (A1111/CompVis) checkpoint of the family looks and which packaged config loads it."""

    text_encoder_prefix: str  # state-dict keys of the text encoder that tells the family apart
    cross_attention_dim: int  # the UNet's attn2.to_k input width: the text encoder's hidden size
    config: str  # folder under diffcli/configs/
    config_v: str | None = None  # for v-prediction, where it differs in more than the scheduler (SD 2.x 768-v)
    config_inpaint: str | None = None  # for a 9-channel inpainting UNet; None: none packaged

    def config_name(self, inpaint: bool, prediction_type: str) -> str | None:
        """The packaged config folder for a variant (inpainting configs are epsilon; the scheduler is set apart)."""
        if inpaint:
            return self.config_inpaint
        return self.config_v if prediction_type == "v_prediction" and self.config_v else self.config


@dataclass(frozen=True)
class Family:
    """What a model family is, known before any weights load."""

    name: str  # recorded in image metadata as model_family: never rename one
    pipelines: dict[str, str]  # task -> diffusers pipeline class name; a task not listed is refused
    text_encoders: tuple[str, ...]  # the pipeline components that encode prompts
    prompt_encoder: str  # one of PROMPT_ENCODERS
    native_size: int | None = None  # image side in pixels it was trained at; the UNet config says it when present
    size_multiple: int = 8  # the VAE's downsampling factor, when the VAE config does not say
    prediction_type: str = "epsilon"  # guessed for a single file that does not say (the scheduler config decides)
    single_file: SingleFile | None = None  # None: diffusers folders only
    refiners: tuple[str, ...] = ()  # families it takes as --refiner
    upscale: tuple[str, int] | None = None  # (--method, scale) of an upscaler
    call_styles: dict[str, CallStyle] = field(default_factory=dict)  # pipeline class -> its style, if not CallStyle()
    low_vram_gib: float = LOW_VRAM_GIB  # CUDA devices smaller than this get --low-vram automatically
    safety_checker: bool = False  # its folders ship a safety checker, which is left out unless --safety-checker
    lora: bool = True  # its pipelines load LoRAs (load_lora_weights)
    task_hint: str | None = None  # said when a task it has no pipeline for is asked

    def __post_init__(self):
        object.__setattr__(self, "pipelines", MappingProxyType(dict(self.pipelines)))
        object.__setattr__(self, "call_styles", MappingProxyType(dict(self.call_styles)))

    @property
    def img2img(self) -> bool:
        return "img2img" in self.pipelines

    @property
    def inpaint(self) -> bool:
        return "inpaint" in self.pipelines

    @property
    def takes_refiner(self) -> bool:
        return bool(self.refiners)


# SD 1.x and 2.x share their pipeline classes; the inpainting ones get one input image per generator, since their
# VAE encodes one input image with the first generator only: repeated, image i is encoded with generator i, so a batch
# image equals the same seed run alone.
_SD_PIPELINES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                 "inpaint": "StableDiffusionInpaintPipeline"}
_SD_STYLES = {"StableDiffusionInpaintPipeline": CallStyle(repeat_image=True)}
_XL_STYLES = {"StableDiffusionXLInpaintPipeline": CallStyle(repeat_image=True)}
_SD_REFINERS = ("sd1", "sd2", "sd-refiner")  # SD 1.x/2.x UNets take over inside the base pipeline's loop

_ENTRIES = (
    Family(
        name="sd1",
        pipelines=_SD_PIPELINES,
        text_encoders=("text_encoder",),
        prompt_encoder="clip",
        native_size=512,
        single_file=SingleFile("cond_stage_model.transformer.", 768, "sd15", config_inpaint="sd15-inpaint"),  # CLIP ViT-L
        refiners=_SD_REFINERS,
        call_styles=_SD_STYLES,
        safety_checker=True,
    ),
    Family(
        name="sd2",
        pipelines=_SD_PIPELINES,
        text_encoders=("text_encoder",),
        prompt_encoder="clip",
        native_size=768,  # the 768-v models; 512-base says 512 in its UNet config
        prediction_type="v_prediction",  # as diffusers: no weight tells 512-epsilon from 768-v
        single_file=SingleFile("cond_stage_model.model.", 1024, "sd2", "sd2-v", "sd2-inpaint"),  # OpenCLIP ViT-H
        refiners=_SD_REFINERS,
        call_styles=_SD_STYLES,
        safety_checker=True,
    ),
    Family(
        name="sdxl",
        pipelines={"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                   "inpaint": "StableDiffusionXLInpaintPipeline"},
        text_encoders=("text_encoder", "text_encoder_2"),
        prompt_encoder="clip+clip-pooled",
        native_size=1024,
        # CLIP ViT-L (embedders.0) + OpenCLIP bigG (embedders.1)
        single_file=SingleFile("conditioner.embedders.1.model.", 2048, "sdxl", config_inpaint="sdxl-inpaint"),
        refiners=("sdxl-refiner", "sdxl"),  # latents handed over with denoising_end / denoising_start
        call_styles=_XL_STYLES,
        low_vram_gib=12.0,
    ),
    Family(
        name="sdxl-refiner",
        # only the second text encoder: it refines (img2img) and inpaints, it cannot start from noise
        pipelines={"img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"},
        text_encoders=("text_encoder_2",),
        prompt_encoder="clip+clip-pooled",
        native_size=1024,
        single_file=SingleFile("conditioner.embedders.0.model.", 1280, "sdxl-refiner"),  # OpenCLIP bigG alone
        call_styles=_XL_STYLES,
        low_vram_gib=12.0,
    ),
    Family(
        name="sd-refiner",
        pipelines={},  # a UNet that reads another model's prompt embeddings: only a --refiner (refiner.load_sd)
        text_encoders=(),
        prompt_encoder="none",
        lora=False,
        task_hint="it has no text encoder of its own: use it as --refiner of an SD 1.x/2.x model",
    ),
    Family(
        name="sd-x4-upscaler",
        pipelines={"upscale": "StableDiffusionUpscalePipeline"},
        text_encoders=("text_encoder",),
        prompt_encoder="clip",
        size_multiple=4,  # its VAE downsamples by 4
        upscale=("x4", 4),
        call_styles={"StableDiffusionUpscalePipeline": CallStyle(repeat_image=True, step_end_callback=False)},
    ),
    Family(
        name="sd-latent-upscaler",
        pipelines={"upscale": "StableDiffusionLatentUpscalePipeline"},
        text_encoders=("text_encoder",),
        prompt_encoder="clip+clip-pooled",  # last hidden states + pooled, encoded by the pipeline itself
        upscale=("latent", 2),
        # its text encoding is its own, so it gets the prompt strings
        call_styles={"StableDiffusionLatentUpscalePipeline": CallStyle(prompt_embeds=False, repeat_image=True,
                                                                       step_end_callback=False)},
        lora=False,
    ),
)
# By name, in the order above (detection of single files and messages list them so).
FAMILIES: MappingProxyType[str, Family] = MappingProxyType({f.name: f for f in _ENTRIES})
# By pipeline class: one style per class, whichever families share it.
_CALL_STYLES = {cls: style for f in _ENTRIES for cls, style in f.call_styles.items()}


def get(name: str) -> Family:
    """The family called `name`; an unknown one is a ModelError."""
    family = FAMILIES.get(name)
    if family is None:
        raise ModelError(f"unknown model family {name!r}", f"known families: {', '.join(FAMILIES)}")
    return family


def pipeline_class(family_name: str, task: str) -> str | None:
    """The diffusers class that runs `task` on the family, or None when it does not."""
    return get(family_name).pipelines.get(task)


def call_style(class_name: str) -> CallStyle:
    """How run_plan calls a pipeline class; the default for classes no family lists."""
    return _CALL_STYLES.get(class_name, CallStyle())


def refiners_of(name: str) -> tuple[str, ...]:
    """The families a base model of family `name` takes as --refiner (empty: none)."""
    return get(name).refiners


def upscale_methods() -> tuple[str, ...]:
    """The upscale --method values, in registry order."""
    return tuple(f.upscale[0] for f in _ENTRIES if f.upscale)


def upscaler(method: str) -> tuple[str, int]:
    """(family, scale) of an upscale method."""
    for f in _ENTRIES:
        if f.upscale and f.upscale[0] == method:
            return f.name, f.upscale[1]
    raise UsageError(f"unknown upscale method {method!r}", f"choose one of: {', '.join(upscale_methods())}")


def detect(model_index: dict, unet: dict) -> str:
    """SD1/SD2/SDXL or an upscaler, from a diffusers folder's pipeline class and UNet config (first rule that fits;
    a new family whose folders these rules do not tell apart adds one)."""
    pipeline_class = model_index.get("_class_name", "")
    if "Upscale" in pipeline_class:
        return "sd-latent-upscaler" if "Latent" in pipeline_class else "sd-x4-upscaler"
    no_text_encoder = (model_index.get("text_encoder") or [None])[0] is None
    if "XL" in pipeline_class or unet.get("addition_embed_type") == "text_time":
        return "sdxl-refiner" if no_text_encoder and "text_encoder_2" in model_index else "sdxl"
    if not pipeline_class.startswith("StableDiffusion"):
        raise ModelError(f"unsupported pipeline class {pipeline_class!r}", "diffcli runs Stable Diffusion 1.x, 2.x and XL models")
    if no_text_encoder:
        return "sd-refiner"  # a UNet that reads another model's prompt embeddings: only a --refiner
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"  # OpenCLIP ViT-H's width, else CLIP ViT-L
