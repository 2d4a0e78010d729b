"""Full-size FLUX.1 [dev], SD 3.5 Large, Qwen-Image and Z-Image pipelines with random weights for `diffcli bench
--arch`, built from the published configs with no download: 8-29 B parameters each, so a GPU's.

The tokenizers are built here: CLIP's from the packaged vocabulary, T5's character by character (its pipelines pad to
max_sequence_length, so the cost is the real one), Qwen's a byte-level BPE trained on the pipelines' prompt templates
and the bench's prompt, so a prompt takes about as many tokens as Qwen's own tokenizer gives it.
"""

from __future__ import annotations

import json
import string
import tempfile
from contextlib import contextmanager
from pathlib import Path

from diffcli.checkpoints import CONFIGS

# name -> (pipeline class, native size, family and variant in the registry (their steps and cfg are the bench's
# defaults), billions of parameters in all: denoiser, text encoders, VAE, as tests/test_bench_families.py checks)
FAMILIES = {
    "flux": ("FluxPipeline", 1024, "flux", "dev", 16.87),  # FLUX.1 [dev]
    "sd35": ("StableDiffusion3Pipeline", 1024, "sd3", "sd3.5", 13.72),  # SD 3.5 Large
    "qwen-image": ("QwenImagePipeline", 1024, "qwen-image", "qwen-image", 28.85),
    "z-image": ("ZImagePipeline", 1024, "z-image", "turbo", 10.26),  # Z-Image Turbo
}
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)
FLUX_VAE = dict(block_out_channels=[128, 256, 512, 512], latent_channels=16, layers_per_block=2, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
SD3_VAE = dict(FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)
QWEN25_VL_7B = dict(  # Qwen/Qwen2.5-VL-7B-Instruct's text and vision towers
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                     tie_word_embeddings=False),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    vocab_size=152064, tie_word_embeddings=False)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_IMAGE_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                     "relationships of the objects and background:")


def clip_tokenizer():
    """CLIP's tokenizer from the packaged vocabulary (SD 1.5's config)."""
    from diffcli import checkpoints

    return checkpoints.packaged_tokenizers("sd15")["tokenizer"]


def t5_tokenizer(folder: Path):
    """T5's tokenizer, character-level: pad 0, eos 1 and unk 2 as T5's, then the word marker and printable characters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in string.printable.strip()]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def qwen_tokenizer(folder: Path, corpus: list[str]):
    """A byte-level BPE in Qwen2's format with Qwen's chat markers and turns, trained on `corpus`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=list(CHAT_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))  # vocab.json and merges.txt
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": None, "additional_special_tokens": list(CHAT_SPECIALS[1:]), "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Qwen2Tokenizer.from_pretrained(folder)


@contextmanager
def _made_as(device: str, dtype):
    """Modules built inside are made on `device` in `dtype` directly (no float32 copy of 20 B parameters first)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def _clip(with_projection: bool, config_folder: str):
    """A CLIP text encoder of a packaged config (SD 1.5's ViT-L, SDXL's second: OpenCLIP ViT-bigG)."""
    import transformers

    config = transformers.CLIPTextConfig.from_pretrained(CONFIGS / config_folder)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config)


def _t5(folder: Path):
    from transformers import T5Config, T5EncoderModel

    return {"model": T5EncoderModel(T5Config(**T5_XXL)), "tokenizer": t5_tokenizer(folder / "t5")}


def _flux(folder: Path, prompt: str) -> dict:  # noqa: ARG001 (the T5 and CLIP tokenizers need no corpus)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    t5 = _t5(folder)
    return dict(
        transformer=FluxTransformer2DModel(guidance_embeds=True), vae=AutoencoderKL(**FLUX_VAE),
        text_encoder=_clip(False, "sd15/text_encoder"), tokenizer=clip_tokenizer(),
        text_encoder_2=t5["model"], tokenizer_2=t5["tokenizer"],
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096))


def _sd35(folder: Path, prompt: str) -> dict:  # noqa: ARG001 (the T5 and CLIP tokenizers need no corpus)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    t5 = _t5(folder)
    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                        caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=192, qk_norm="rms_norm")
    tokenizer = clip_tokenizer()
    return dict(transformer=transformer, vae=AutoencoderKL(**SD3_VAE),
                text_encoder=_clip(True, "sd15/text_encoder"), tokenizer=tokenizer,
                text_encoder_2=_clip(True, "sdxl/text_encoder_2"), tokenizer_2=tokenizer,
                text_encoder_3=t5["model"], tokenizer_3=t5["tokenizer"],
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _prompt_corpus(prompt: str) -> list[str]:
    return [f"<|im_start|>system\n{QWEN_IMAGE_SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n"]


def _qwen_image(folder: Path, prompt: str) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return dict(transformer=QwenImageTransformer2DModel(), vae=AutoencoderKLQwenImage(),  # their defaults: full size
                text_encoder=Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B)).eval(),
                tokenizer=qwen_tokenizer(folder / "qwen", _prompt_corpus(prompt)), scheduler=scheduler)


def _z_image(folder: Path, prompt: str) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    transformer = ZImageTransformer2DModel()  # its defaults: Z-Image's 6 B
    with torch.no_grad():  # torch.empty at construction
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    return dict(transformer=transformer, vae=AutoencoderKL(**FLUX_VAE), text_encoder=Qwen3Model(Qwen3Config(**QWEN3_4B)),
                tokenizer=qwen_tokenizer(folder / "qwen", _prompt_corpus(prompt)),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


BUILDERS = {"flux": _flux, "sd35": _sd35, "qwen-image": _qwen_image, "z-image": _z_image}


def components(arch: str, device: str, dtype, prompt: str) -> dict:
    """The pipeline components of `arch` with random weights, made on `device` in `dtype`."""
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="diffcli-bench-tokenizers-") as folder, _made_as(device, dtype):
        return BUILDERS[arch](Path(folder), prompt)


def build(arch: str, device: str, dtype, prompt: str):
    """The full-size pipeline of `arch` with random weights."""
    import diffusers

    return getattr(diffusers, FAMILIES[arch][0])(**components(arch, device, dtype, prompt))


def parameters(parts: dict) -> int:
    """Parameters of the components that have them."""
    return sum(p.numel() for part in parts.values() if hasattr(part, "parameters") for p in part.parameters())
