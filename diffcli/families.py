"""The model families diffcli runs: one declarative entry each, and the lookups the rest of the code uses."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from diffcli.errors import ModelError, UsageError
from diffcli.layouts import FLUX2_FILE, FLUX_FILE, SD3_FILE, TransformerFile

# The tasks a family names a pipeline class for (outpaint runs the inpaint pipeline, hires the img2img one; edit is
# instruction editing: the input image conditions the model beside the prompt, it is not noised).
TASKS = ("txt2img", "img2img", "inpaint", "upscale", "edit")
# What encodes a family's prompts: prompts.encode's CLIP hidden states, or those plus a pooled embedding (SDXL's added
# conditioning); the pipeline's own CLIP and T5 encoders (SD3: two CLIPs and T5; FLUX.1: CLIP pooled and T5); the
# pipeline's own chat-template LLM encoders (Qwen-Image: Qwen2.5-VL's last hidden states; Z-Image: Qwen3's second last;
# FLUX.2 dev: Mistral Small 3.1's layers 10, 20, 30 side by side; FLUX.2 klein: Qwen3's layers 9, 18, 27); whatever
# the pipeline's own encoders are (the generic family: PixArt's T5, Sana's Gemma 2...); nothing.
PROMPT_ENCODERS = ("clip", "clip+clip-pooled", "clip+clip+t5", "clip-pooled+t5", "qwen2.5-vl", "qwen3", "mistral3",
                   "qwen3-layers", "own", "none")
# What --cfg sets: classifier-free guidance with the negative prompt; the guidance a distilled model takes as an input
# (FLUX.1 dev: one pass per step, no negative prompt); nothing (FLUX.1 schnell is distilled to need no guidance).
GUIDANCE = ("cfg", "distilled", "none")
# the pipeline component that denoises, whose config/ tells variants and sizes; "own": the generic family's, a U-Net or
# a transformer that diffcli does not hook (what needs SD's U-Net is refused as for a transformer)
DENOISERS = ("unet", "transformer", "own")
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
    # image= is a list of reference images that join the transformer's sequence, never noised (FLUX.2): img2img gives
    # IMAGE as the one reference and takes no --strength
    reference: bool = False
    # a pipeline whose __call__ lacks some of what run.py passes (the generic family's, FLUX.2 klein KV's): the
    # arguments it names; run.py passes it no others (None: all it passes)
    takes: frozenset | None = None
    # strings only: a prompt with A1111 weights goes as embeddings diffcli builds from its CLIP and T5 encoders
    # (t5_prompts.py: SD3, FLUX.1); unweighted ones still go as text
    weighted_t5: bool = False
    # it samples with torch's global RNG (SD3's ControlNet pipeline VAE-encodes the map with latent_dist.sample()):
    # seeded with the image's seed before each call, one image per call, so an image is its seed's on every run
    global_rng: bool = False
    # False: it repaints the masked area from noise and takes no strength (Z-Image's ControlNet inpaint): none passed
    strength: bool = True

    def guidance(self, cfg: float) -> dict:
        """--cfg as the call's argument: guidance_scale, or true_cfg_scale (Qwen-Image; its guidance_scale, read by
        guidance-distilled transformers only, stays unset)."""
        return {"true_cfg_scale": cfg} if self.true_cfg else {"guidance_scale": cfg}


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
    index: tuple = ()  # the same for model_index.json (a pipeline's own config: FLUX.2 klein's is_distilled)
    guidance: str | None = None  # one of GUIDANCE, when not the family's
    base: str | None = None  # Hub id whose text encoders and VAE complete a transformer-only file of it (no --base)
    # words of the model's name (a Hub id's repo, a folder's or file's own name; `_` read as `-`) that tell it where no
    # config can: SD3.5 Large Turbo has Large's configs. (): any name
    named: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def fits(self, denoiser: dict, model_index: dict | None = None, name: str = "") -> bool:
        """Whether a denoiser config (unet/ or transformer/config.json), and the folder's model_index.json and the
        model's name when at hand, are of this variant."""
        spelled = name.rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")  # the last part: a folder's own name
        return (all(denoiser.get(key) in values for key, values in self.when)
                and all((model_index or {}).get(key) in values for key, values in self.index)
                and (not self.named or any(word in spelled for word in self.named)))


@dataclass(frozen=True)
class ControlNets:
    """How a family runs ControlNets of one model class (a config's `_class_name`): the class holding several ("":
    one unit only), the pipeline class per task, whether those take guess mode; `modes`: a union model's control types
    by name (its control_mode values, from the union models' cards), for the class's union models."""

    multi: str
    pipelines: Mapping[str, str]
    guess_mode: bool = False
    modes: Mapping[str, int] = field(default_factory=dict)
    shared: bool = False  # the multi class holds one ControlNet that reads every unit's map: all units one model
    steps: bool = True  # the pipelines take control_guidance_start/end; False: a unit acts on every step

    def __post_init__(self):
        object.__setattr__(self, "pipelines", MappingProxyType(dict(self.pipelines)))
        object.__setattr__(self, "modes", MappingProxyType(dict(self.modes)))


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
    controlnet: dict[str, ControlNets] = field(default_factory=dict)  # ControlNet class -> how it runs (--control)
    ip_adapter: bool = False  # its txt2img/img2img/inpaint pipelines take IP-Adapters (--ip-adapter, ip_adapter.py)
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
_SD_STYLES = dict.fromkeys(("StableDiffusionInpaintPipeline", "StableDiffusionControlNetInpaintPipeline"),
                           CallStyle(repeat_image=True))
_XL_INPAINT = {"StableDiffusionXLInpaintPipeline": CallStyle(repeat_image=True)}  # the refiner's too
_XL_STYLES = {**_XL_INPAINT, **dict.fromkeys(("StableDiffusionXLControlNetInpaintPipeline",
                                             "StableDiffusionXLControlNetUnionInpaintPipeline"), CallStyle(repeat_image=True))}
_SD_REFINERS = ("sd1", "sd2", "sd-refiner")  # SD 1.x/2.x UNets take over inside the base pipeline's loop
# ControlNets: SD 1.x/2.x and XL with guess mode; XL's union models (xinsir's ProMax layout) and FLUX.1's (InstantX's
# and Shakker-Labs' Union Pro: FluxControlNetModel with num_mode) take a control mode per map. SD3 has no ControlNet
# img2img or inpaint pipeline in diffusers (its ControlNet "inpainting" pipeline is an inpainting ControlNet of its own).
_SD_CONTROL = {"ControlNetModel": ControlNets("MultiControlNetModel", {
    "txt2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
    "inpaint": "StableDiffusionControlNetInpaintPipeline"}, guess_mode=True)}
XL_UNION_MODES = {"openpose": 0, "depth": 1, "hed": 2, "softedge": 2, "scribble": 2, "canny": 3, "lineart": 3,
                  "lineart_anime": 3, "mlsd": 3, "normal": 4, "segment": 5, "tile": 6, "blur": 6, "repaint": 7}
FLUX_UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "openpose": 4, "gray": 5, "lq": 6}
_XL_CONTROL = {
    "ControlNetModel": ControlNets("MultiControlNetModel", {
        "txt2img": "StableDiffusionXLControlNetPipeline", "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionXLControlNetInpaintPipeline"}, guess_mode=True),
    "ControlNetUnionModel": ControlNets("MultiControlNetUnionModel", {
        "txt2img": "StableDiffusionXLControlNetUnionPipeline", "img2img": "StableDiffusionXLControlNetUnionImg2ImgPipeline",
        "inpaint": "StableDiffusionXLControlNetUnionInpaintPipeline"}, guess_mode=True, modes=XL_UNION_MODES)}
_SD3_CONTROL = {"SD3ControlNetModel": ControlNets("SD3MultiControlNetModel", {"txt2img": "StableDiffusion3ControlNetPipeline"})}
_FLUX_CONTROL = {"FluxControlNetModel": ControlNets("FluxMultiControlNetModel", {
    "txt2img": "FluxControlNetPipeline", "img2img": "FluxControlNetImg2ImgPipeline",
    "inpaint": "FluxControlNetInpaintPipeline"}, modes=FLUX_UNION_MODES)}
# Qwen-Image (InstantX's; the union one reads any map, no mode): diffusers' multi class runs one ControlNet over several
# maps; its ControlNet "inpaint" pipeline is an inpainting ControlNet of its own (as SD3's). Z-Image (alibaba-pai's Fun
# Controlnet Union, no mode): one unit on every step; its inpaint pipeline repaints from noise, the ControlNet reading
# the masked image and mask beside the map (Union 2.0 and later).
_QWEN_CONTROL = {"QwenImageControlNetModel": ControlNets("QwenImageMultiControlNetModel",
                                                         {"txt2img": "QwenImageControlNetPipeline"}, shared=True)}
_Z_IMAGE_CONTROL = {"ZImageControlNetModel": ControlNets("", {
    "txt2img": "ZImageControlNetPipeline", "inpaint": "ZImageControlNetInpaintPipeline"}, steps=False)}
# SD3 and FLUX.1 pipelines encode the prompt strings themselves (CLIP and T5); their img2img resizes its input to the
# native size unless given a size, and their VAE encodes one input image with the first generator only (as SD's inpaint).
_SD3_TEXT = CallStyle(prompt_embeds=False, clip_skip=True, max_sequence_length=512, weighted_t5=True, cfg_off=1.0)
_SD3_STYLES = {"StableDiffusion3Pipeline": _SD3_TEXT,
               "StableDiffusion3ControlNetPipeline": replace(_SD3_TEXT, global_rng=True, batch=False),
               **dict.fromkeys(("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
                               replace(_SD3_TEXT, repeat_image=True, size=True))}
# the negative prompt is read with --true-cfg only; FLUX.1 Fill's pipeline has no true CFG
_FLUX_TEXT = CallStyle(prompt_embeds=False, negative_prompt=False, max_sequence_length=512, takes_true_cfg=True,
                       weighted_t5=True)
_FLUX_IMAGE = replace(_FLUX_TEXT, repeat_image=True, size=True)
_FLUX_FILL = replace(_FLUX_IMAGE, takes_true_cfg=False)
_FLUX_STYLES = {"FluxPipeline": _FLUX_TEXT, "FluxImg2ImgPipeline": _FLUX_IMAGE, "FluxInpaintPipeline": _FLUX_IMAGE,
                "FluxControlNetPipeline": _FLUX_TEXT,  # the ControlNet img2img and inpaint ones have no true CFG
                "FluxControlNetImg2ImgPipeline": _FLUX_FILL, "FluxControlNetInpaintPipeline": _FLUX_FILL}
# Qwen-Image and Z-Image encode the strings with their own LLM (a chat template around the prompt); their VAE encodes one
# input image with the first generator only. Qwen-Image's img2img/inpaint resize the input to 1024 unless given a size.
_QWEN_TEXT = CallStyle(prompt_embeds=False, true_cfg=True, cfg_off=1.0, max_sequence_length=1024)  # CFG when true_cfg_scale > 1
_QWEN_STYLES = {"QwenImagePipeline": _QWEN_TEXT, "QwenImageControlNetPipeline": _QWEN_TEXT,
                **dict.fromkeys(("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
                                replace(_QWEN_TEXT, repeat_image=True, size=True))}
# The edit pipelines: the input image joins the transformer's sequence as latents (and, Qwen-Image-Edit, goes through
# its Qwen2.5-VL with the prompt); no strength. Kontext encodes the input once (argmax latents) for the whole batch.
_KONTEXT = replace(_FLUX_TEXT, max_area=True)
_QWEN_EDIT = replace(_QWEN_TEXT, batch=False)
EDIT_MODELS = ("FLUX.1 Kontext and Qwen-Image-Edit models, and FLUX.2 ones, e.g. black-forest-labs/FLUX.1-Kontext-dev, "
               "Qwen/Qwen-Image-Edit or black-forest-labs/FLUX.2-klein-4B")
_Z_IMAGE_TEXT = CallStyle(prompt_embeds=False, cfg_off=0.0, max_sequence_length=0)  # CFG when guidance_scale > 0
_Z_IMAGE_STYLES = {"ZImagePipeline": _Z_IMAGE_TEXT, "ZImageControlNetPipeline": _Z_IMAGE_TEXT,
                   **dict.fromkeys(("ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
                                   replace(_Z_IMAGE_TEXT, repeat_image=True)),
                   # one image per call: it repeats the images for a batch, not the mask
                   "ZImageControlNetInpaintPipeline": replace(_Z_IMAGE_TEXT, batch=False, strength=False)}
# FLUX.2: one pipeline class generates (txt2img) and takes input images as references (img2img: IMAGE alone; edit: IMAGE
# and the --image ones), encoded once (argmax latents) for the whole batch. Its own chat-template LLM encodes the
# strings; no negative prompt (klein's CFG pass reads an empty one); max_sequence_length (512 unless given) is not
# bounded by its check_inputs. img2img passes the input's size, which it would otherwise shrink to 1 MP.
_FLUX2 = CallStyle(prompt_embeds=False, negative_prompt=False, max_sequence_length=0, reference=True, size=True)
# FLUX.2 klein inpaint (a FLUX.2 klein img2img with a mask): the input noised by --strength beside its reference latents
_FLUX2_INPAINT = replace(_FLUX2, reference=False)
# FLUX.2 klein KV: the distilled klein with the references' attention keys and values cached after the first step; its
# __call__ takes no guidance_scale (run.py passes only what it names)
_FLUX2_KV = replace(_FLUX2, takes=frozenset((
    "image", "prompt", "height", "width", "num_inference_steps", "sigmas", "num_images_per_prompt", "generator",
    "latents", "prompt_embeds", "output_type", "return_dict", "attention_kwargs", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs", "max_sequence_length", "text_encoder_out_layers")))

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
        ip_adapter=True,
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
        ip_adapter=True,
    ),
    Family(
        name="sdxl-refiner",
        # only the second text encoder: it refines (img2img) and inpaints, it cannot start from noise
        pipelines={"img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"},
        text_encoders=("text_encoder_2",),
        prompt_encoder="clip+clip-pooled",
        native_size=1024,
        single_file=SingleFile("conditioner.embedders.0.model.", 1280, "sdxl-refiner"),  # OpenCLIP bigG alone
        call_styles=_XL_INPAINT,
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
        controlnet=_SD3_CONTROL,
        low_vram_gib=24.0,  # SD3.5 Large: an 8B transformer and T5-XXL, about 27 GiB in bf16
        denoiser="transformer",
        flow_match=True,
        # SD3.5 Large Turbo: Large's configs, so its name tells it; its model card: 4 steps, guidance 0
        variants=(Variant("sd3.5-large-turbo", {"steps": 4, "cfg": 0.0}, when=(("qk_norm", ("rms_norm",)),),
                          named=("large-turbo",), base="stabilityai/stable-diffusion-3.5-large-turbo"),
                  Variant("sd3.5", {"steps": 28, "cfg": 4.5}, when=(("qk_norm", ("rms_norm",)),),  # 3.5 added QK norm
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
        controlnet=_FLUX_CONTROL,
        ip_adapter=True,  # XLabs' adapters, through diffusers' FluxIPAdapterMixin
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
        controlnet=_QWEN_CONTROL,
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
        controlnet=_Z_IMAGE_CONTROL,
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
    Family(
        name="flux2",  # FLUX.2 dev (a 32B transformer, a Mistral Small 3.1 text encoder, its own 32-channel VAE)
        pipelines=dict.fromkeys(("txt2img", "img2img", "edit"), "Flux2Pipeline"),
        text_encoders=("text_encoder",),
        prompt_encoder="mistral3",
        native_size=1024,  # its pipeline's default size (default_sample_size 128 x the VAE's 8)
        call_styles={"Flux2Pipeline": _FLUX2},
        low_vram_gib=96.0,  # a 32B transformer and a 24B text encoder: about 112 GB of bf16 weights (2 bytes each)
        task_hint="a FLUX.2 dev model generates (txt2img) and takes input images as references (img2img, edit); "
                  "it has no inpaint pipeline (a FLUX.2 klein model inpaints)",
        denoiser="transformer",
        guidance="distilled",  # --cfg is the guidance its transformer embeds, one pass per step
        flow_match=True,
        latent_patch=2,  # its pipeline packs 2x2 latents (its image processor's factor: vae_scale_factor * 2)
        # diffusers' Flux2Pipeline: 50 steps, guidance_scale 4.0 (its call default; its docstring example shows 2.5)
        variants=(Variant("dev", {"steps": 50, "cfg": 4.0}, base="black-forest-labs/FLUX.2-dev"),),
        edit_references=True,
        requires=("torchvision",),  # its tokenizer is transformers' PixtralProcessor, which needs it
        transformer_file=FLUX2_FILE,  # a file without guidance embedding is klein's
    ),
    Family(
        name="flux2-klein",  # FLUX.2 klein 4B and 9B (a Qwen3 text encoder, FLUX.2's VAE), distilled or base
        pipelines={**dict.fromkeys(("txt2img", "img2img", "edit"), "Flux2KleinPipeline"),
                   "inpaint": "Flux2KleinInpaintPipeline"},
        text_encoders=("text_encoder",),
        prompt_encoder="qwen3-layers",
        native_size=1024,
        call_styles={"Flux2KleinPipeline": _FLUX2, "Flux2KleinInpaintPipeline": _FLUX2_INPAINT},
        low_vram_gib=24.0,  # 9B: a 9B transformer and Qwen3 8B, about 34 GB of bf16 weights; 4B: about 16 GB
        task_hint="a FLUX.2 klein model generates (txt2img), takes input images as references (img2img, edit) and "
                  "inpaints",
        denoiser="transformer",
        flow_match=True,
        latent_patch=2,
        # --cfg is its guidance_scale: CFG against an empty negative prompt above 1 (the base models); the distilled
        # ones (model_index.json: is_distilled) run no CFG. diffusers' docstrings: base 50 steps at 4.0; the distilled
        # KV model 4 steps (BFL: the distilled models are 4-step). 1.0: the pipeline warns of any higher --cfg it ignores
        variants=(Variant("distilled", {"steps": 4, "cfg": 1.0}, index=(("is_distilled", (True,)),), guidance="none"),
                  Variant("base", {"steps": 50, "cfg": 4.0})),
        edit_references=True,
        transformer_file=replace(FLUX2_FILE, unguided=None),  # its files need --base: 4B and 9B differ
    ),
    Family(
        name="flux2-klein-kv",  # FLUX.2 klein 9B KV: klein's components, reference images' K/V cached across steps
        pipelines=dict.fromkeys(("txt2img", "img2img", "edit"), "Flux2KleinKVPipeline"),
        text_encoders=("text_encoder",),
        prompt_encoder="qwen3-layers",
        native_size=1024,
        call_styles={"Flux2KleinKVPipeline": _FLUX2_KV},
        low_vram_gib=24.0,  # as klein 9B
        task_hint="a FLUX.2 klein KV model generates (txt2img) and takes input images as references (img2img, edit)",
        denoiser="transformer",
        flow_match=True,
        latent_patch=2,
        # diffusers' docstring: 4 steps; its pipeline takes no guidance at all, as FLUX.1 schnell (cfg 0)
        variants=(Variant("distilled-kv", {"steps": 4, "cfg": 0.0}, guidance="none"),),
        edit_references=True,
    ),
    Family(
        name="generic",  # any other diffusers text-to-image pipeline (PixArt, Sana, Chroma, HiDream...), run as it is
        pipelines={},  # resolved from the folder (families.generic): its own class; img2img/inpaint as AutoPipeline maps it
        text_encoders=("text_encoder",),  # whichever its pipeline has: it encodes the prompt strings itself
        prompt_encoder="own",
        native_size=1024,  # when its denoiser config says no sample_size (Chroma: its pipeline's 128 x the VAE's 8)
        lora=False,  # resolved: whether its pipeline classes load LoRAs
        task_hint="diffcli runs another diffusers pipeline for txt2img, and img2img and inpaint where diffusers' "
                  "AutoPipelineForImage2Image/AutoPipelineForInpainting map it to one",
        denoiser="own",
    ),
)
# By name, in the order above (detection of single files and messages list them so).
FAMILIES: MappingProxyType[str, Family] = MappingProxyType({f.name: f for f in _ENTRIES})
# By pipeline class: one style per class, whichever families share it.
_CALL_STYLES = {cls: style for f in _ENTRIES for cls, style in f.call_styles.items()}
# Every pipeline class an entry names: never run as a generic one.
_NAMED = frozenset(cls for f in _ENTRIES for cls in (*f.pipelines.values(), *f.call_styles,
                                                     *(c for nets in f.controlnet.values() for c in nets.pipelines.values())))
GENERIC = "generic"
# Text-to-image pipelines diffusers' AutoPipelineForText2Image does not map, which the generic family runs too.
KNOWN_TEXT2IMAGE = ("HiDreamImagePipeline", "SanaSprintPipeline", "Cosmos2TextToImagePipeline", "HunyuanImagePipeline",
                    "LongCatImagePipeline", "BriaPipeline")
RUNS = ("Stable Diffusion 1.x, 2.x, XL and 3.x, FLUX.1 (dev, schnell, Fill, Kontext), FLUX.2 (dev, klein), Qwen-Image "
        "and Z-Image models, and Qwen-Image-Edit; and other diffusers text-to-image pipelines (PixArt, Sana, Chroma, "
        "HiDream...)")


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
    """How run_plan calls a pipeline class: its family's; a generic one's from its signature; else the default."""
    if class_name in _CALL_STYLES or class_name in _NAMED or not class_name:
        return _CALL_STYLES.get(class_name, CallStyle())
    found = _generic_classes().get(class_name)
    return _generic_style(found) if found is not None else CallStyle()


def of(spec) -> Family:
    """The family of a resolved model (models.ModelSpec): its entry; the generic one's with the folder's classes (none
    known, as for a single file given a generic --model-config: the entry, which runs no task)."""
    if spec.family == GENERIC and getattr(spec, "pipeline", None):
        return generic(spec.pipeline, bool(spec.flow_match))
    return get(spec.family)


@functools.lru_cache(maxsize=None)
def generic(class_name: str, flow_match: bool) -> Family:
    """The generic entry for a folder of pipeline `class_name` (detect accepted it) with a flow-matching scheduler or
    not: txt2img that class; img2img and inpaint the classes diffusers' AutoPipeline maps it to, if any; its LoRA
    support, call styles and __call__ defaults (steps, guidance) from the classes themselves."""
    from diffusers.pipelines import auto_pipeline

    classes = {"txt2img": _generic_classes()[class_name]}
    key = next((k for k, c in auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items() if c.__name__ == class_name), None)
    for task, mapping in (("img2img", auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING),
                          ("inpaint", auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING)):
        cls = mapping.get(key)
        if cls is not None and cls.__name__ in _generic_classes():
            classes[task] = cls
    defaults = {}
    for option, argument in (("steps", "num_inference_steps"), ("cfg", "guidance_scale")):
        default = _parameters(classes["txt2img"]).get(argument)
        if default is not None and isinstance(default.default, (int, float)) and not isinstance(default.default, bool):
            defaults[option] = default.default
    entry = get(GENERIC)
    missing = " or ".join(task for task in ("img2img", "inpaint") if task not in classes)
    hint = f"diffcli runs {class_name} for {', '.join(classes)}" + (
        f": diffusers' AutoPipeline maps it to no {missing} pipeline" if missing else "")
    return replace(entry, pipelines={task: cls.__name__ for task, cls in classes.items()},
                   call_styles={cls.__name__: _generic_style(cls) for cls in classes.values()},
                   lora=all(hasattr(cls, "load_lora_weights") for cls in classes.values()), flow_match=flow_match,
                   # one that takes a safety checker (LCM) leaves it out unless --safety-checker, as SD's
                   safety_checker=all("requires_safety_checker" in _parameters(cls, "__init__") for cls in classes.values()),
                   variants=(Variant(class_name, defaults),),  # its own __call__'s defaults
                   task_hint=hint)


def check_generic(class_name) -> None:
    """A model_index.json _class_name the generic family runs, or a ModelError saying why not: only names in
    diffusers' own pipeline namespace are looked at, never imported from the user's text."""
    if not isinstance(class_name, str):
        raise ModelError(f"model_index.json: _class_name is not a pipeline class name, got {class_name!r}",
                         f"diffcli runs {RUNS}")
    if class_name in _generic_classes() and class_name not in _generic_img2img():
        return
    from diffusers import pipelines

    exported = {name for names in pipelines._import_structure.values() for name in names}
    what = ("not a diffusers text-to-image pipeline that loads alone (as video, audio, image-to-image, ControlNet "
            "and prior/decoder ones)" if class_name in exported and class_name.endswith("Pipeline")
            else "not a diffusers pipeline class")
    raise ModelError(f"unsupported pipeline class {class_name!r}: {what}", f"diffcli runs {RUNS}")


@functools.lru_cache(maxsize=None)
def _generic_classes() -> dict:
    """Name -> class of the pipelines the generic family runs: the text-to-image ones AutoPipelineForText2Image maps
    (not ControlNet/control ones, which need control images, nor the prior+decoder combined ones) and KNOWN_TEXT2IMAGE,
    that take a prompt and make images (no frames), none an entry names; and their img2img and inpaint classes."""
    import diffcli.pipeline  # noqa: F401 (its library verbosity settings, before diffusers is imported)
    import diffusers
    from diffusers.pipelines import auto_pipeline

    text2image = [cls for key, cls in auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items() if "control" not in key]
    text2image += [getattr(diffusers, name) for name in KNOWN_TEXT2IMAGE if hasattr(diffusers, name)]
    found = {cls.__name__: cls for cls in text2image if _makes_images(cls, ("prompt",))}
    for key, cls in auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items():
        if cls.__name__ not in found:
            continue
        for mapping, needs in ((auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, ("prompt", "image", "strength")),
                               (auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING, ("prompt", "image", "mask_image"))):
            other = mapping.get(key)
            if other is not None and _makes_images(other, needs):
                found[other.__name__] = other
    return found


@functools.lru_cache(maxsize=None)
def _generic_img2img() -> frozenset:
    """The generic classes that take an input image: a folder's own class is a text-to-image one."""
    return frozenset(name for name, cls in _generic_classes().items() if "image" in _parameters(cls))


def _makes_images(cls, needs: tuple) -> bool:
    """A pipeline class no entry names, loaded alone (not a combined prior+decoder), taking `needs`, no frames."""
    parameters = _parameters(cls)
    return (cls.__name__ not in _NAMED and not getattr(cls, "_load_connected_pipes", False)
            and all(name in parameters for name in needs) and "num_frames" not in parameters)


def _parameters(cls, method: str = "__call__") -> dict:
    import inspect

    return dict(inspect.signature(getattr(cls, method)).parameters)


@functools.lru_cache(maxsize=None)
def _generic_style(cls) -> CallStyle:
    """A generic pipeline's call style, from the arguments its __call__ names: strings it encodes itself, and only
    what it takes (an input image per generator, and its size, where it takes one)."""
    takes = frozenset(_parameters(cls))
    image = "image" in takes
    return CallStyle(prompt_embeds=False, repeat_image=image, step_end_callback="callback_on_step_end" in takes,
                     negative_prompt="negative_prompt" in takes, clip_skip="clip_skip" in takes,
                     size=image and "width" in takes, max_sequence_length=0 if "max_sequence_length" in takes else None,
                     takes=takes)


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


def variant(family: str | Family, denoiser: dict, model_index: dict | None = None, name: str = "") -> Variant | None:
    """The family's (by name, or a resolved generic one) variant a model of that denoiser config (and
    model_index.json, for a folder, and its name) is (the first that fits), or None."""
    family = get(family) if isinstance(family, str) else family
    return next((v for v in family.variants if v.fits(denoiser, model_index, name)), None)


def detect(model_index: dict, denoiser: dict) -> str:
    """The family of a diffusers folder, from its pipeline class and denoiser (UNet or transformer) config (first rule
    that fits; a new family whose folders these rules do not tell apart adds one)."""
    if not isinstance(model_index, dict) or not isinstance(model_index.get("_class_name", ""), str):
        check_generic(model_index.get("_class_name") if isinstance(model_index, dict) else None)
    pipeline_class = model_index.get("_class_name", "")
    for family in _ENTRIES:  # the transformer families: their pipeline classes are their own
        if family.denoiser == "transformer" and pipeline_class in family.pipelines.values():
            return family.name
    if pipeline_class and not pipeline_class.startswith("StableDiffusion") and pipeline_class in _generic_classes():
        check_generic(pipeline_class)  # a text-to-image class of its own, not an img2img one
        return GENERIC
    if "Upscale" in pipeline_class:
        return "sd-latent-upscaler" if "Latent" in pipeline_class else "sd-x4-upscaler"
    no_text_encoder = (model_index.get("text_encoder") or [None])[0] is None
    if "XL" in pipeline_class or denoiser.get("addition_embed_type") == "text_time":
        return "sdxl-refiner" if no_text_encoder and "text_encoder_2" in model_index else "sdxl"
    if not pipeline_class.startswith("StableDiffusion") or pipeline_class.startswith("StableDiffusion3"):
        check_generic(pipeline_class)  # says why not (a generic class it would run returned above)
        raise ModelError(f"unsupported pipeline class {pipeline_class!r}", f"diffcli runs {RUNS}")
    if no_text_encoder:
        return "sd-refiner"  # a UNet that reads another model's prompt embeddings: only a --refiner
    return "sd2" if denoiser.get("cross_attention_dim") == 1024 else "sd1"  # OpenCLIP ViT-H's width, else CLIP ViT-L
