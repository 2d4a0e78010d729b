"""The model families diffcli runs: one declarative entry each, and the lookups the rest of the code uses."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType

from diffcli.errors import ModelError, UsageError
from diffcli.layouts import FLUX_FILE, SD3_FILE, TransformerFile

# The tasks a family names a pipeline class for (outpaint runs the inpaint pipeline, hires the img2img one; edit is
# instruction editing: the input image conditions the model beside the prompt, it is not noised).
TASKS = ("txt2img", "img2img", "inpaint", "upscale", "edit")
# What encodes a family's prompts: prompts.encode's CLIP hidden states, or those plus a pooled embedding (SDXL's added
# conditioning); the pipeline's own CLIP and T5 encoders (SD3: two CLIPs and T5; FLUX.1: CLIP pooled and T5); the
# pipeline's own chat-template LLM encoders (Qwen-Image: Qwen2.5-VL's last hidden states; Z-Image: Qwen3's second last);
# nothing.
PROMPT_ENCODERS = ("clip", "clip+clip-pooled", "clip+clip+t5", "clip-pooled+t5", "qwen2.5-vl", "qwen3", "none")
# What --cfg sets: classifier-free guidance with the negative prompt; the guidance a distilled model takes as an input
# (FLUX.1 dev: one pass per step, no negative prompt); nothing (FLUX.1 schnell is distilled to need no guidance).
GUIDANCE = ("cfg", "distilled", "none")
DENOISERS = ("unet", "transformer")  # the pipeline component that denoises, whose config/ tells variants and sizes
# GPUs with less memory than this get --low-vram automatically, unless the family says otherwise.
LOW_VRAM_GIB = 6.0


@dataclass(frozen=True)
class CallStyle:
    """How a diffusers pipeline class takes the per-call inputs run_plan passes (the upscalers differ)."""

    prompt_embeds: bool = True  # our (weighted) embeddings; False: plain strings, the pipeline encodes them itself
    repeat_image: bool = False  # one input image per generator: the pipeline does not repeat it for a prompt batch
    step_end_callback: bool = True  # callback_on_step_end; False: the older per-step `callback(i, t, latents)`
    negative_prompt: bool = True  # strings only: it uses the negative prompt; False: FLUX.1 without true CFG ignores it
    clip_skip: bool = False  # strings only: it takes --clip-skip as its own clip_skip (SD3), else it is refused
    size: bool = False  # width/height passed with an input image too: SD3/FLUX img2img resize it to the native size
    # --cfg is the call's true_cfg_scale and a negative prompt (empty if none) always goes with it, which is what turns
    # the unconditional pass on (Qwen-Image); its guidance_scale, read by guidance-distilled transformers only, is unset
    true_cfg: bool = False
    cfg_off: float | None = None  # strings only: at a --cfg this low it runs no unconditional pass, the negative unread
    # FLUX.1 Kontext: it rescales width/height to the area max_area (passed as their product, so the size holds) and
    # resizes the input to its nearest trained size unless _auto_resize is off (off: the input at the output's size)
    max_area: bool = False
    batch: bool = True  # False: one image per call (Qwen-Image-Edit's processor reads one input image per prompt)
    # strings only: the most tokens its max_sequence_length takes (--max-sequence-length; diffusers' check_inputs: SD3
    # and FLUX.1 512 T5 tokens, Qwen-Image 1024); 0: taken with no bound checked (Z-Image); None: no such argument
    max_sequence_length: int | None = None
    # --true-cfg is the call's true_cfg_scale beside --cfg's distilled guidance, and the negative prompt goes with it
    # (FLUX.1 and Kontext: true CFG runs when it is above 1 and a negative prompt is given)
    takes_true_cfg: bool = False


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
class Variant:
    """A kind of model within a family, told apart by its denoiser's config, with its makers' recommended settings."""

    name: str  # e.g. "schnell"
    defaults: dict  # steps, cfg: as a model folder's diffcli.json says them (that file, when present, wins)
    when: tuple = ()  # (config key, values that tell it) pairs, all must hold; (): the family's other models
    guidance: str | None = None  # one of GUIDANCE, when not the family's
    base: str | None = None  # Hub id whose text encoders and VAE complete a transformer-only file of it (no --base)

    def __post_init__(self):
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def fits(self, denoiser: dict) -> bool:
        """Whether a denoiser config (unet/ or transformer/config.json) is of this variant."""
        return all(denoiser.get(key) in values for key, values in self.when)


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
    denoiser: str = "unet"  # one of DENOISERS; U-Net only: --hires, --refiner, --deep-cache, --variation-seed
    guidance: str = "cfg"  # one of GUIDANCE: what --cfg sets
    flow_match: bool = False  # trained for flow matching: it takes the flow-matching schedulers only (pipeline.py)
    latent_patch: int | None = None  # latent pixels per token side its pipeline packs (FLUX.1: 2x2) whatever the
    # denoiser config says; None: the config's patch_size (SD3), else 1. Sizes are multiples of it x the VAE's factor
    variants: tuple[Variant, ...] = ()  # the first that fits a model gives its defaults; none fits: no defaults
    controlnet: dict[str, str] = field(default_factory=dict)  # task -> its ControlNet pipeline class (--control)
    transformer_file: TransformerFile | None = None  # transformer-only files (.safetensors, .gguf) it loads
    edit_references: bool = False  # its edit pipeline takes --image reference images beside IMAGE (a list of images)
    requires: tuple[str, ...] = ()  # import names its pipelines need beyond diffcli's own, checked before loading

    def __post_init__(self):
        object.__setattr__(self, "pipelines", MappingProxyType(dict(self.pipelines)))
        object.__setattr__(self, "controlnet", MappingProxyType(dict(self.controlnet)))
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
_SD_CONTROL = {"txt2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
               "inpaint": "StableDiffusionControlNetInpaintPipeline"}
_XL_CONTROL = {"txt2img": "StableDiffusionXLControlNetPipeline", "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
               "inpaint": "StableDiffusionXLControlNetInpaintPipeline"}
# SD3 and FLUX.1 pipelines encode the prompt strings themselves (CLIP and T5); their img2img resizes its input to the
# native size unless given a size, and their VAE encodes one input image with the first generator only (as SD's inpaint).
_SD3_TEXT = CallStyle(prompt_embeds=False, clip_skip=True, max_sequence_length=512)
_SD3_STYLES = {"StableDiffusion3Pipeline": _SD3_TEXT,
               **dict.fromkeys(("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
                               replace(_SD3_TEXT, repeat_image=True, size=True))}
# the negative prompt is read with --true-cfg only; FLUX.1 Fill's pipeline has no true CFG
_FLUX_TEXT = CallStyle(prompt_embeds=False, negative_prompt=False, max_sequence_length=512, takes_true_cfg=True)
_FLUX_IMAGE = replace(_FLUX_TEXT, repeat_image=True, size=True)
_FLUX_STYLES = {"FluxPipeline": _FLUX_TEXT, "FluxImg2ImgPipeline": _FLUX_IMAGE, "FluxInpaintPipeline": _FLUX_IMAGE}
_FLUX_FILL = replace(_FLUX_IMAGE, takes_true_cfg=False)
# Qwen-Image and Z-Image encode the strings with their own LLM (a chat template around the prompt); their VAE encodes one
# input image with the first generator only. Qwen-Image's img2img/inpaint resize the input to 1024 unless given a size.
_QWEN_TEXT = CallStyle(prompt_embeds=False, true_cfg=True, cfg_off=1.0, max_sequence_length=1024)  # CFG when true_cfg_scale > 1
_QWEN_STYLES = {"QwenImagePipeline": _QWEN_TEXT,
                **dict.fromkeys(("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
                                replace(_QWEN_TEXT, repeat_image=True, size=True))}
# The edit pipelines: the input image joins the transformer's sequence as latents (and, Qwen-Image-Edit, goes through
# its Qwen2.5-VL with the prompt); no strength. Kontext encodes the input once (argmax latents) for the whole batch.
_KONTEXT = replace(_FLUX_TEXT, max_area=True)
_QWEN_EDIT = replace(_QWEN_TEXT, batch=False)
EDIT_MODELS = "FLUX.1 Kontext and Qwen-Image-Edit models, e.g. black-forest-labs/FLUX.1-Kontext-dev or Qwen/Qwen-Image-Edit"
_Z_IMAGE_TEXT = CallStyle(prompt_embeds=False, cfg_off=0.0, max_sequence_length=0)  # CFG when guidance_scale > 0
_Z_IMAGE_STYLES = {"ZImagePipeline": _Z_IMAGE_TEXT,
                   **dict.fromkeys(("ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
                                   replace(_Z_IMAGE_TEXT, repeat_image=True))}

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
        controlnet=_SD_CONTROL,
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
        controlnet=_SD_CONTROL,
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
        controlnet=_XL_CONTROL,
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
    Family(
        name="sd3",  # SD3 Medium, SD3.5 Medium and Large (MMDiT)
        pipelines={"txt2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline",
                   "inpaint": "StableDiffusion3InpaintPipeline"},
        text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
        prompt_encoder="clip+clip+t5",
        native_size=1024,
        call_styles=_SD3_STYLES,
        low_vram_gib=24.0,  # SD3.5 Large: an 8B transformer and T5-XXL, about 27 GiB in bf16
        denoiser="transformer",
        flow_match=True,
        variants=(Variant("sd3.5", {"steps": 28, "cfg": 4.5}, when=(("qk_norm", ("rms_norm",)),),  # 3.5 added QK norm
                          base="stabilityai/stable-diffusion-3.5-large"),
                  Variant("sd3", {"steps": 28, "cfg": 7.0}, base="stabilityai/stable-diffusion-3-medium-diffusers")),
        transformer_file=SD3_FILE,
    ),
    Family(
        name="flux",  # FLUX.1 dev and schnell
        pipelines={"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"},
        text_encoders=("text_encoder", "text_encoder_2"),
        prompt_encoder="clip-pooled+t5",
        native_size=1024,
        call_styles=_FLUX_STYLES,
        low_vram_gib=40.0,  # a 12B transformer (24 GiB in bf16) and T5-XXL (9.5 GiB)
        denoiser="transformer",
        guidance="distilled",
        flow_match=True,
        latent_patch=2,
        # schnell has no guidance embedding: --cfg does nothing (its config says false, or nothing: the class default)
        variants=(Variant("schnell", {"steps": 4, "cfg": 0.0}, when=(("guidance_embeds", (False, None)),), guidance="none",
                          base="black-forest-labs/FLUX.1-schnell"),
                  Variant("dev", {"steps": 28, "cfg": 3.5}, base="black-forest-labs/FLUX.1-dev")),
        transformer_file=FLUX_FILE,
    ),
    Family(
        name="flux-fill",  # FLUX.1 Fill dev: the masked image and the mask packed beside the latents
        pipelines={"inpaint": "FluxFillPipeline"},
        text_encoders=("text_encoder", "text_encoder_2"),
        prompt_encoder="clip-pooled+t5",
        native_size=1024,
        call_styles={"FluxFillPipeline": _FLUX_FILL},
        low_vram_gib=40.0,  # as FLUX.1 dev
        task_hint="a FLUX.1 Fill model only inpaints (inpaint, outpaint)",
        denoiser="transformer",
        guidance="distilled",
        flow_match=True,
        latent_patch=2,
        variants=(Variant("fill-dev", {"steps": 50, "cfg": 30.0}, base="black-forest-labs/FLUX.1-Fill-dev"),),  # its model card
        transformer_file=replace(FLUX_FILE, widened=None),
    ),
    Family(
        name="qwen-image",  # Qwen-Image (MMDiT, a Qwen2.5-VL text encoder, a Wan-style VAE)
        pipelines={"txt2img": "QwenImagePipeline", "img2img": "QwenImageImg2ImgPipeline",
                   "inpaint": "QwenImageInpaintPipeline"},
        text_encoders=("text_encoder",),
        prompt_encoder="qwen2.5-vl",
        native_size=1328,  # its model card's 1:1 size (diffusers' call defaults to 1024)
        call_styles=_QWEN_STYLES,
        low_vram_gib=64.0,  # a 20B transformer (about 41 GiB in bf16) and Qwen2.5-VL 7B (about 16 GiB)
        denoiser="transformer",
        flow_match=True,
        latent_patch=2,  # its pipeline packs 2x2 latents (image_processor's factor: vae_scale_factor * 2)
        variants=(Variant("qwen-image", {"steps": 50, "cfg": 4.0}),),  # its model card: true_cfg_scale 4.0
    ),
    Family(
        name="z-image",  # Z-Image (single-stream DiT, a Qwen3 text encoder, FLUX.1's VAE)
        pipelines={"txt2img": "ZImagePipeline", "img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline"},
        text_encoders=("text_encoder",),
        prompt_encoder="qwen3",
        native_size=1024,  # its model card and diffusers' call default
        call_styles=_Z_IMAGE_STYLES,
        low_vram_gib=24.0,  # a 6B transformer (about 12 GiB in bf16) and Qwen3 4B (about 8 GiB)
        denoiser="transformer",
        flow_match=True,
        latent_patch=2,  # all_patch_size (2,) in its config, which models.py does not read
        # --cfg is its pipeline's guidance_scale g: it predicts cond + g * (cond - uncond), so 0 runs no unconditional
        # pass and g is A1111's CFG g + 1. No config tells Turbo from the base model: the family's defaults are Turbo's
        # (its model card: 9 steps, guidance 0), the model people run; a base model's folder says its own in diffcli.json
        variants=(Variant("turbo", {"steps": 9, "cfg": 0.0}),),
    ),
    Family(
        name="flux-kontext",  # FLUX.1 Kontext dev: FLUX.1's components, the input image's latents beside the noise
        pipelines={"edit": "FluxKontextPipeline"},
        text_encoders=("text_encoder", "text_encoder_2"),
        prompt_encoder="clip-pooled+t5",
        native_size=1024,
        call_styles={"FluxKontextPipeline": _KONTEXT},
        low_vram_gib=40.0,  # as FLUX.1 dev
        task_hint="a FLUX.1 Kontext model edits an image from an instruction (diffcli edit IMAGE PROMPT)",
        denoiser="transformer",
        guidance="distilled",
        flow_match=True,
        latent_patch=2,
        # diffusers' FluxKontextPipeline docs: guidance_scale 2.5, 28 steps
        variants=(Variant("kontext-dev", {"steps": 28, "cfg": 2.5}, base="black-forest-labs/FLUX.1-Kontext-dev"),),
    ),
    Family(
        name="qwen-image-edit",  # Qwen-Image-Edit: Qwen-Image's components, its Qwen2.5-VL also reading the input image
        pipelines={"edit": "QwenImageEditPipeline"},
        text_encoders=("text_encoder",),
        prompt_encoder="qwen2.5-vl",
        native_size=1024,  # its pipeline's output: about 1 MP in the input's shape
        call_styles={"QwenImageEditPipeline": _QWEN_EDIT},
        low_vram_gib=64.0,  # as Qwen-Image
        task_hint="a Qwen-Image-Edit model edits an image from an instruction (diffcli edit IMAGE PROMPT)",
        denoiser="transformer",
        flow_match=True,
        latent_patch=2,
        variants=(Variant("edit", {"steps": 50, "cfg": 4.0}),),  # diffusers' docs: true_cfg_scale 4.0, 50 steps
        requires=("torchvision",),  # transformers' Qwen2-VL processor (its video processor) needs it
    ),
    Family(
        name="qwen-image-edit-plus",  # Qwen-Image-Edit-2509 and later: several input images ("Picture 1", 2, ...)
        pipelines={"edit": "QwenImageEditPlusPipeline"},
        text_encoders=("text_encoder",),
        prompt_encoder="qwen2.5-vl",
        native_size=1024,
        call_styles={"QwenImageEditPlusPipeline": _QWEN_EDIT},
        low_vram_gib=64.0,
        task_hint="a Qwen-Image-Edit model edits images from an instruction (diffcli edit IMAGE PROMPT --image REF)",
        denoiser="transformer",
        flow_match=True,
        latent_patch=2,
        variants=(Variant("edit-plus", {"steps": 40, "cfg": 4.0}),),  # its model card: true_cfg_scale 4.0, 40 steps
        edit_references=True,
        requires=("torchvision",),
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


def taking(attribute: str) -> tuple[str, ...]:
    """The families some pipeline of which takes a call style's `attribute` (set, not None or False), in registry
    order: what a refusal of a flag names."""
    def takes(value) -> bool:
        return value is not None and value is not False

    return tuple(f.name for f in _ENTRIES if any(takes(getattr(call_style(cls), attribute)) for cls in f.pipelines.values()))


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


def variant(family_name: str, denoiser: dict) -> Variant | None:
    """The family's variant a model of that denoiser config is (the first that fits), or None."""
    return next((v for v in get(family_name).variants if v.fits(denoiser)), None)


def detect(model_index: dict, denoiser: dict) -> str:
    """The family of a diffusers folder, from its pipeline class and denoiser (UNet or transformer) config (first rule
    that fits; a new family whose folders these rules do not tell apart adds one)."""
    pipeline_class = model_index.get("_class_name", "")
    for family in _ENTRIES:  # the transformer families: their pipeline classes are their own
        if family.denoiser == "transformer" and pipeline_class in family.pipelines.values():
            return family.name
    if "Upscale" in pipeline_class:
        return "sd-latent-upscaler" if "Latent" in pipeline_class else "sd-x4-upscaler"
    no_text_encoder = (model_index.get("text_encoder") or [None])[0] is None
    if "XL" in pipeline_class or denoiser.get("addition_embed_type") == "text_time":
        return "sdxl-refiner" if no_text_encoder and "text_encoder_2" in model_index else "sdxl"
    if not pipeline_class.startswith("StableDiffusion") or pipeline_class.startswith("StableDiffusion3"):
        raise ModelError(f"unsupported pipeline class {pipeline_class!r}",
                         "diffcli runs Stable Diffusion 1.x, 2.x, XL and 3.x, FLUX.1 (dev, schnell, Fill, Kontext), "
                         "Qwen-Image and Z-Image models, and Qwen-Image-Edit")
    if no_text_encoder:
        return "sd-refiner"  # a UNet that reads another model's prompt embeddings: only a --refiner
    return "sd2" if denoiser.get("cross_attention_dim") == 1024 else "sd1"  # OpenCLIP ViT-H's width, else CLIP ViT-L
