"""Tiny real SD3 and FLUX.1 components from config dicts (transformer, VAE, CLIP and T5 encoders), with tokenizers
written locally: the flow-matching families' models as users have them, saved as diffusers folders. No network."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_tokenizer
from PIL import Image
from task_inputs import pixels, write_mask, write_photo

from diffcli.output import read_metadata

TEXT_HIDDEN = 32  # CLIP and T5 widths: the transformers' joint_attention_dim
VAE_BLOCKS = (8, 8, 8, 8)  # four blocks: a VAE factor of 8, as the real models', so sizes must be multiples of 16
SD3_VAE_FACTORS = {"shift_factor": 0.0609, "scaling_factor": 1.5305}  # SD3's VAE latent statistics
FLUX_VAE_FACTORS = {"shift_factor": 0.1159, "scaling_factor": 0.3611}  # FLUX.1's


def write_tiny_t5_tokenizer(folder: Path):
    """A character-level T5 (Unigram) tokenizer: pad, eos, unk, the word marker and every printable character."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in string.printable.strip()]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def text_parts(root: Path) -> dict:
    """A CLIP tokenizer and config (built locally), a T5 tokenizer and a tiny T5 encoder."""
    import torch
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel

    vocab = write_tiny_tokenizer(root / "clip-tokenizer")
    t5_tokenizer = write_tiny_t5_tokenizer(root / "t5-tokenizer")
    clip = CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=TEXT_HIDDEN,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab,
                          max_position_embeddings=77, projection_dim=TEXT_HIDDEN, hidden_act="gelu")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=1,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    return {"clip_config": clip, "clip_tokenizer": CLIPTokenizer.from_pretrained(root / "clip-tokenizer"),
            "t5": t5, "t5_tokenizer": t5_tokenizer}


def tiny_vae(factors: dict, channels: int):
    """A VAE of the SD3/FLUX layout (no quant convs, a shift factor), downsampling by 8."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=VAE_BLOCKS, in_channels=3, out_channels=3, latent_channels=channels,
                         norm_num_groups=4, layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * len(VAE_BLOCKS),
                         up_block_types=["UpDecoderBlock2D"] * len(VAE_BLOCKS), use_quant_conv=False,
                         use_post_quant_conv=False, **factors)


def build_tiny_sd3(root: Path):
    """Tiny SD3.5-layout components (qk RMS norm, patch 2): two CLIPs with projection, T5, a joint transformer."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    parts = text_parts(root)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=TEXT_HIDDEN, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=16, qk_norm="rms_norm")
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(parts["clip_config"])
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**parts["clip_config"].to_dict()))
    tokenizer = parts["clip_tokenizer"]
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(SD3_VAE_FACTORS, 16),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=parts["t5"], tokenizer_3=parts["t5_tokenizer"])


def build_tiny_flux(root: Path, guidance: bool = True):
    """Tiny FLUX.1-layout components: CLIP (pooled) + T5, a double- and a single-stream block; `guidance`: the
    distilled-guidance embedding of FLUX.1 dev (without it, the schnell layout, whose scheduler does not shift)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    parts = text_parts(root)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
                                         pooled_projection_dim=TEXT_HIDDEN, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=guidance)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(parts["clip_config"])
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
                 if guidance else FlowMatchEulerDiscreteScheduler(shift=1.0))
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(FLUX_VAE_FACTORS, 4),
                        text_encoder=text_encoder, tokenizer=parts["clip_tokenizer"], text_encoder_2=parts["t5"],
                        tokenizer_2=parts["t5_tokenizer"])


def build_tiny_flux_fill(root: Path):
    """A tiny FLUX.1 Fill layout: the dev components with a transformer that also reads the packed masked-image latents
    (4 x 2x2) and the packed pixel mask (8x8 per latent pixel, x 2x2)."""
    import torch
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    base = build_tiny_flux(root)
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel.from_config(base.transformer.config, in_channels=16 + 16 + 256, out_channels=16)
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    return FluxFillPipeline(**dict(parts, transformer=transformer))


def save(pipe, folder: Path) -> Path:
    """The pipeline as a local diffusers folder (save_pretrained), as --model takes it."""
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """The tiny SD3.5-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("sd3")
    return save(build_tiny_sd3(root), root / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """The tiny FLUX.1 dev-layout model (guidance embedding) as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux")
    return save(build_tiny_flux(root), root / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    """The tiny FLUX.1 schnell-layout model (no guidance embedding) as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux-schnell")
    return save(build_tiny_flux(root, guidance=False), root / "tiny-flux-schnell")


@pytest.fixture(scope="session")
def tiny_flux_lora(tiny_flux, tmp_path_factory) -> Path:
    """A peft LoRA for the tiny FLUX.1 transformer (attention and output: enough to show), saved as diffusers does."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("flux-loras")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   weight_name="shiny.safetensors")
    return folder / "shiny.safetensors"


@pytest.fixture(scope="session")
def tiny_flux_fill(tmp_path_factory) -> Path:
    """The tiny FLUX.1 Fill-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux-fill")
    return save(build_tiny_flux_fill(root), root / "tiny-flux-fill")


# Qwen-Image and Z-Image: one LLM text encoder each, prompted through a chat template.
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, and the chat turn markers the templates use
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's turns, no system prompt
LLM_HIDDEN = 16  # the text encoders' width: the transformers' joint_attention_dim / cap_feat_dim


def write_tiny_qwen_tokenizer(folder: Path):
    """A byte-level Qwen2 BPE tokenizer (every byte a token, no merges) with the chat markers and a chat template."""
    import json

    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(sorted(ByteLevel.alphabet()) + list(CHAT_SPECIALS))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": None, "additional_special_tokens": list(CHAT_SPECIALS[1:]), "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Qwen2Tokenizer.from_pretrained(folder)


def build_tiny_qwen_image(root: Path):
    """Tiny Qwen-Image-layout components: a Qwen2.5-VL text encoder (with its small vision tower, unused for text), an
    MMDiT of 2x2 patches, and a Qwen-Image VAE downsampling by 8 as the real one (3 spatial downsamples)."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = write_tiny_qwen_tokenizer(root / "qwen-tokenizer")
    size = len(tokenizer)  # the vision marker ids follow the text vocabulary
    text = {"hidden_size": LLM_HIDDEN, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": size + 3, "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": LLM_HIDDEN}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=LLM_HIDDEN, vocab_size=size + 3,
                              vision_start_token_id=size, vision_end_token_id=size + 1, vision_token_id=size + 2,
                              image_token_id=size + 2, video_token_id=size + 2)
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=LLM_HIDDEN,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def build_tiny_z_image(root: Path):
    """Tiny Z-Image-layout components: a Qwen3 text encoder, a single-stream DiT of 2x2 patches, FLUX.1's VAE layout."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = write_tiny_qwen_tokenizer(root / "qwen-tokenizer")
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=LLM_HIDDEN, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=len(tokenizer), max_position_embeddings=512,
                                          bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1,
                                           n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                                           cap_feat_dim=LLM_HIDDEN, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # the pad tokens start as torch.empty: fixed, so the folder is the same every session
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(FLUX_VAE_FACTORS, 16),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory) -> Path:
    """The tiny Qwen-Image-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("qwen-image")
    return save(build_tiny_qwen_image(root), root / "tiny-qwen-image")


@pytest.fixture(scope="session")
def tiny_z_image(tmp_path_factory) -> Path:
    """The tiny Z-Image-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("z-image")
    return save(build_tiny_z_image(root), root / "tiny-z-image")


def sd3_to_original(state: dict) -> dict:
    """An SD3 transformer's weights under SAI's names (sd3.5_large.safetensors): diffusers' converter inverted (q, k, v
    joined; the context-only last block's and the output's adaLN halves swapped back)."""
    import torch

    state, out = dict(state), {}
    swap = lambda weight: torch.cat(weight.chunk(2, dim=0)[::-1])  # noqa: E731 - its own inverse
    renames = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj.": "x_embedder.proj.", "context_embedder.": "context_embedder.",
               "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
               "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
               "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
               "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.", "proj_out.": "final_layer.linear."}
    blocks = {"attn.norm_q.": "x_block.attn.ln_q.", "attn.norm_k.": "x_block.attn.ln_k.",
              "attn.norm_added_q.": "context_block.attn.ln_q.", "attn.norm_added_k.": "context_block.attn.ln_k.",
              "attn.to_out.0.": "x_block.attn.proj.", "attn.to_add_out.": "context_block.attn.proj.",
              "norm1.linear.": "x_block.adaLN_modulation.1.", "norm1_context.linear.": "context_block.adaLN_modulation.1.",
              "ff.net.0.proj.": "x_block.mlp.fc1.", "ff.net.2.": "x_block.mlp.fc2.",
              "ff_context.net.0.proj.": "context_block.mlp.fc1.", "ff_context.net.2.": "context_block.mlp.fc2."}
    last = max(int(name.split(".")[1]) for name in state if name.startswith("transformer_blocks."))
    for name, tensor in state.items():
        if name.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + name.rsplit(".", 1)[1]] = swap(tensor)
        elif name.startswith("transformer_blocks."):
            _, index, rest = name.split(".", 2)
            for old, new in blocks.items():
                if rest.startswith(old):
                    moved = new + rest[len(old):]
                    context_pre_only = int(index) == last and old == "norm1_context.linear."
                    out[f"joint_blocks.{index}.{moved}"] = swap(tensor) if context_pre_only else tensor
        else:
            old = next(old for old in renames if name.startswith(old))
            out[renames[old] + name[len(old):]] = tensor
    for index in range(last + 1):
        for block, parts in (("x_block", ("to_q", "to_k", "to_v")), ("context_block", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for kind in ("weight", "bias"):
                joined = [state[f"transformer_blocks.{index}.attn.{part}.{kind}"] for part in parts]
                out[f"joint_blocks.{index}.{block}.attn.qkv.{kind}"] = torch.cat(joined)
    return out


def flux2_to_original(state: dict) -> dict:
    """A FLUX.2 transformer's weights under BFL's names (flux2-dev.safetensors): diffusers' converter inverted (q, k, v
    joined, norm weights named scale, the output's adaLN halves swapped back)."""
    import torch

    renames = {"x_embedder.": "img_in.", "context_embedder.": "txt_in.", "proj_out.": "final_layer.linear.",
               "time_guidance_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
               "time_guidance_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
               "time_guidance_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
               "time_guidance_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
               "double_stream_modulation_img.linear.": "double_stream_modulation_img.lin.",
               "double_stream_modulation_txt.linear.": "double_stream_modulation_txt.lin.",
               "single_stream_modulation.linear.": "single_stream_modulation.lin."}
    double = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
              "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
              "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_out.0.": "img_attn.proj.",
              "attn.to_add_out.": "txt_attn.proj.", "ff.linear_in.": "img_mlp.0.", "ff.linear_out.": "img_mlp.2.",
              "ff_context.linear_in.": "txt_mlp.0.", "ff_context.linear_out.": "txt_mlp.2."}
    single = {"attn.to_qkv_mlp_proj.": "linear1.", "attn.to_out.": "linear2.", "attn.norm_q.weight": "norm.query_norm.scale",
              "attn.norm_k.weight": "norm.key_norm.scale"}
    out, joined = {}, {}
    for name, tensor in state.items():
        if name.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + name.rsplit(".", 1)[1]] = torch.cat(tensor.chunk(2, dim=0)[::-1])
        elif name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            kind, index, rest = name.split(".", 2)
            if kind == "transformer_blocks" and any(p in rest for p in ("to_q.", "to_k.", "to_v.", "add_q_proj.",
                                                                        "add_k_proj.", "add_v_proj.")):
                joined.setdefault((index, "txt" if ".add_" in "." + rest else "img", rest.rsplit(".", 1)[1]), {})[
                    rest.split(".")[1]] = tensor
                continue
            table, block = (double, "double_blocks") if kind == "transformer_blocks" else (single, "single_blocks")
            old = next(old for old in table if rest.startswith(old))
            out[f"{block}.{index}.{table[old]}{rest[len(old):]}"] = tensor
        else:
            old = next(old for old in renames if name.startswith(old))
            out[renames[old] + name[len(old):]] = tensor
    for (index, stream, kind), parts in joined.items():
        order = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
        out[f"double_blocks.{index}.{stream}_attn.qkv.{kind}"] = torch.cat([parts[p] for p in order])
    return out


GGUF_BLOCK = 32  # Q8_0 and Q5_0 quantize rows in blocks of 32 values


def write_gguf(path: Path, state: dict, arch: str) -> Path:
    """A GGUF file of `state` as city96's converter writes one: 2-D weights whose rows split into 32-value blocks
    quantized (Q8_0, every third Q5_0), other matrices F16, vectors and the rest F32."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(str(path), arch)
    for index, (name, tensor) in enumerate(sorted(state.items())):
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and data.shape[1] % GGUF_BLOCK == 0 and name.endswith("weight"):
            kind = GGMLQuantizationType.Q5_0 if index % 3 == 0 else GGMLQuantizationType.Q8_0
            writer.add_tensor(name, quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data.astype(np.float16 if data.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

# --- shared by the flow-matching families' tests (test_flow_families, test_qwen_zimage) ---

FAST = ("--steps", "2", "--seed", "1", "--quiet")
TOLERANCE = 2  # 8-bit values: the CLI's image against diffusers' own float output, rounded
SIZE = (64, 48)  # width x height: multiples of 16 (VAE factor 8 x the 2x2 latent patch)


def diffusers_image(class_name: str, folder, prompt: str, steps: int = 2, seed: int = 1, **kwargs) -> np.ndarray:
    """The plain diffusers pipeline's image as 8-bit values, with the CLI's generator, steps and guidance."""
    import diffusers
    import torch

    pipe = getattr(diffusers, class_name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                 **kwargs).images[0]
    return np.round(image * 255)


@pytest.fixture
def model(request):
    """The tiny model folder a test is parametrized with (by fixture name)."""
    return request.getfixturevalue(request.param)


def check_img2img_and_inpaint(cli, model, prefix: str, guidance: dict, tmp_path) -> None:
    """img2img (two images in one call, each equal to its seed alone) and inpaint (the repainted area as diffusers's,
    the rest exactly the input) of a flow-matching model against the plain diffusers pipelines `prefix`*."""
    photo, mask = write_photo(tmp_path, SIZE), write_mask(tmp_path, SIZE, box=(16, 8, 40, 32))
    result = cli("img2img", photo, "a dog", "--model", model, "--strength", "0.6", "--cfg", "3", *FAST, "--num-images", "2",
                 "--batch-size", "2", "-o", "i-{seed}.png")  # one call: each image as its seed alone
    assert result.exit_code == 0, result.stderr
    assert Image.open("i-1.png").size == SIZE  # the input's size, not the model's native one
    for seed in (1, 2):
        expected = diffusers_image(f"{prefix}Img2ImgPipeline", model, "a dog", seed=seed, image=Image.open(photo),
                                   strength=0.6, width=SIZE[0], height=SIZE[1], **guidance)
        assert np.abs(pixels(f"i-{seed}.png") - expected).max() <= TOLERANCE
    result = cli("inpaint", photo, "a dog", "--mask", mask, "--mask-blur", "0", "--model", model, "--cfg", "3", *FAST,
                 "-o", "m.png")
    assert result.exit_code == 0, result.stderr
    repaint = np.asarray(Image.open(mask)) == 255
    expected = diffusers_image(f"{prefix}InpaintPipeline", model, "a dog", image=Image.open(photo),
                               mask_image=Image.open(mask), strength=1.0, width=SIZE[0], height=SIZE[1], **guidance)
    assert np.abs(pixels("m.png")[repaint] - expected[repaint]).max() <= TOLERANCE
    assert np.array_equal(pixels("m.png")[~repaint], pixels(photo)[~repaint])
    assert read_metadata("m.png")["task"] == "inpaint"


def check_outpaint(cli, model, tmp_path) -> None:
    """outpaint runs the model's inpaint pipeline on the widened canvas."""
    photo = write_photo(tmp_path, SIZE)
    result = cli("outpaint", photo, "a dog", "--extend", "right=16", "--model", model, *FAST, "-o", "o.png")
    assert result.exit_code == 0, result.stderr
    assert Image.open("o.png").size == (SIZE[0] + 16, SIZE[1])


# --- the edit models: FLUX.1 Kontext and Qwen-Image-Edit (Plus: several images) ---

VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")  # Qwen2.5-VL's image markers
VISION_PATCH = 14  # Qwen2.5-VL's vision patch side; the processor merges 2x2 patches into one LLM token
VISION_MAX_PIXELS = 56 * 56  # a few vision tokens per image, whatever the input size (the real processor: ~1 MP)


def build_tiny_flux_kontext(root: Path):
    """A tiny FLUX.1 Kontext layout: FLUX.1 dev's components (the input image's latents join the sequence, so the
    transformer is the same class and shape)."""
    from diffusers import FluxKontextPipeline

    base = build_tiny_flux(root)
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    return FluxKontextPipeline(**parts)


def write_tiny_qwen_vl_processor(folder: Path):
    """A Qwen2-VL processor built locally: the byte-level tokenizer with the vision markers too, and an image
    processor of 14 px patches merged 2x2 that keeps images at most VISION_MAX_PIXELS."""
    import json

    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor

    folder.mkdir(parents=True, exist_ok=True)
    specials = list(CHAT_SPECIALS) + list(VISION_SPECIALS)
    vocab = {token: i for i, token in enumerate(sorted(ByteLevel.alphabet()) + specials)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": None, "additional_special_tokens": specials[1:], "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    images = Qwen2VLImageProcessor(patch_size=VISION_PATCH, merge_size=2, temporal_patch_size=2,
                                   min_pixels=VISION_PATCH * VISION_PATCH * 4, max_pixels=VISION_MAX_PIXELS)
    return tokenizer, Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer)


def build_tiny_qwen_image_edit(root: Path, plus: bool = False):
    """Tiny Qwen-Image-Edit components (Plus: the several-image pipeline): Qwen-Image's, with a Qwen2.5-VL whose
    vision tower reads the input image through the processor."""
    import diffusers
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    base = build_tiny_qwen_image(root)
    tokenizer, processor = write_tiny_qwen_vl_processor(root / "qwen-vl-processor")
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), VISION_SPECIALS)}
    text = dict(base.text_encoder.config.text_config.to_dict(), vocab_size=len(tokenizer))
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": LLM_HIDDEN,
              "patch_size": VISION_PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
              "fullatt_block_indexes": [0]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=LLM_HIDDEN, vocab_size=len(tokenizer),
                              vision_token_id=ids["image_token_id"], **ids)
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    parts = dict(base.components, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor)
    cls = diffusers.QwenImageEditPlusPipeline if plus else diffusers.QwenImageEditPipeline
    return cls(**parts)


@pytest.fixture(scope="session")
def tiny_flux_kontext(tmp_path_factory) -> Path:
    """The tiny FLUX.1 Kontext-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux-kontext")
    return save(build_tiny_flux_kontext(root), root / "tiny-flux-kontext")


@pytest.fixture(scope="session")
def qwen_vl_without_torchvision():
    """Where torchvision is missing (transformers' Qwen2-VL processor needs it for its video processor): the processor
    without a video processor (the image and text parts are all the edit pipelines use), and diffcli told that
    torchvision is there; for the rest of the session."""
    import diffcli.extras

    patch = pytest.MonkeyPatch()
    if not diffcli.extras.available("torchvision"):
        from transformers import Qwen2VLProcessor

        patch.setattr(Qwen2VLProcessor, "get_attributes", classmethod(lambda cls: ["image_processor", "tokenizer"]))
        available = diffcli.extras.available
        patch.setattr(diffcli.extras, "available", lambda module: module == "torchvision" or available(module))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_qwen_image_edit(tmp_path_factory, qwen_vl_without_torchvision) -> Path:
    """The tiny Qwen-Image-Edit-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("qwen-image-edit")
    return save(build_tiny_qwen_image_edit(root), root / "tiny-qwen-image-edit")


@pytest.fixture(scope="session")
def tiny_qwen_image_edit_plus(tmp_path_factory, qwen_vl_without_torchvision) -> Path:
    """The tiny Qwen-Image-Edit-Plus (2509) layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("qwen-image-edit-plus")
    return save(build_tiny_qwen_image_edit(root, plus=True), root / "tiny-qwen-image-edit-plus")


# --- FLUX.2: dev (a Mistral3 text encoder, its tokenizer a PixtralProcessor in the real folders) and klein (Qwen3) ---

FLUX2_HIDDEN = 16  # the text encoders' width; the transformer reads three of their layers side by side (x 3)
FLUX2_WEIGHT_SCALE = 3.0  # the tiny transformer's weights scaled up, so the prompt and references visibly count
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
# Mistral's turns; FLUX.2 dev's messages hold content lists ({"type": "text", "text": ...}), whose texts are joined
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{% set text = m['content'] %}{% else %}"
    "{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}"
    "[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")


def write_byte_bpe_tokenizer(folder: Path, specials: tuple, **tokens):
    """A byte-level BPE tokenizer (every byte a token, no merges) with these special tokens first, built with the
    tokenizers library and saved as a PreTrainedTokenizerFast (or `cls`, in tokens); `tokens` names bos/eos/pad...
    (and chat_template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    cls = tokens.pop("cls", PreTrainedTokenizerFast)
    vocab = {token: i for i, token in enumerate(list(specials) + sorted(ByteLevel.alphabet()))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=tokens.get("unk_token")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(list(specials))
    cls(tokenizer_object=bpe, **tokens).save_pretrained(folder)
    return cls.from_pretrained(folder)


def write_tiny_mistral_tokenizer(folder: Path):
    """Mistral's specials and turns on a byte-level BPE. FLUX.2 dev's real tokenizer is a PixtralProcessor around
    Mistral's, which transformers builds only with torchvision installed; the pipeline calls only its
    apply_chat_template, which a tokenizer has too."""
    return write_byte_bpe_tokenizer(folder, MISTRAL_SPECIALS, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                    pad_token="<pad>", chat_template=MISTRAL_TEMPLATE)


def tiny_flux2_parts(guidance: bool) -> dict:
    """FLUX.2's own components: a transformer of one double- and one single-stream block (`guidance`: dev's embedded
    guidance), its VAE (batch-norm statistics over 2x2-patched latents), downsampling by 8, and its scheduler."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * FLUX2_HIDDEN,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance)
    with torch.no_grad():  # at its default init another prompt or reference moves pixels by about one level: x3 shows it
        for parameter in transformer.parameters():
            parameter.mul_(FLUX2_WEIGHT_SCALE)
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=VAE_BLOCKS, latent_channels=4, norm_num_groups=4, layers_per_block=1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler}


def build_tiny_flux2(root: Path):
    """Tiny FLUX.2 dev-layout components: a Mistral3 text encoder (a small Pixtral vision tower, unused for text) with
    the 31 hidden states the pipeline reads layers 10, 20 and 30 of, and a transformer with the guidance embedding."""
    import torch
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = write_tiny_mistral_tokenizer(root / "mistral-tokenizer")
    text = {"model_type": "mistral", "hidden_size": FLUX2_HIDDEN, "intermediate_size": 16, "num_hidden_layers": 30,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": len(tokenizer),
            "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "head_dim": 8, "image_size": 64, "patch_size": 16}
    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                                   image_token_index=tokenizer.unk_token_id)).eval()
    return Flux2Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, **tiny_flux2_parts(guidance=True))


def build_tiny_flux2_klein(root: Path, distilled: bool = True):
    """Tiny FLUX.2 klein-layout components: a Qwen3 causal LM (the pipeline reads its layers 9, 18 and 27), a
    transformer without a guidance embedding; `distilled` as model_index.json's is_distilled (False: a base model,
    whose pipeline runs CFG)."""
    import torch
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = write_tiny_qwen_tokenizer(root / "qwen-tokenizer")
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=FLUX2_HIDDEN, intermediate_size=16, num_hidden_layers=27,
                                                num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                                vocab_size=len(tokenizer), max_position_embeddings=1024,
                                                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                                tie_word_embeddings=True)).eval()
    return Flux2KleinPipeline(text_encoder=text_encoder, tokenizer=tokenizer, is_distilled=distilled,
                              **tiny_flux2_parts(guidance=False))


def build_tiny_flux2_klein_kv(root: Path):
    """The tiny distilled klein's components in FLUX.2 klein KV's pipeline (references' K/V cached across steps)."""
    from diffusers import Flux2KleinKVPipeline

    klein = build_tiny_flux2_klein(root)
    return Flux2KleinKVPipeline(**{name: getattr(klein, name) for name in
                                   ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")}, is_distilled=True)


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory) -> Path:
    """The tiny FLUX.2 dev-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux2")
    return save(build_tiny_flux2(root), root / "tiny-flux2")


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory) -> Path:
    """The tiny FLUX.2 klein-layout model (distilled, as FLUX.2-klein-4B) as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux2-klein")
    return save(build_tiny_flux2_klein(root), root / "tiny-flux2-klein")


@pytest.fixture(scope="session")
def tiny_flux2_klein_kv(tmp_path_factory) -> Path:
    """The tiny FLUX.2 klein KV-layout model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux2-klein-kv")
    return save(build_tiny_flux2_klein_kv(root), root / "tiny-flux2-klein-kv")


@pytest.fixture(scope="session")
def tiny_flux2_klein_base(tmp_path_factory) -> Path:
    """The tiny FLUX.2 klein base-layout model (not distilled: CFG) as a local diffusers folder."""
    root = tmp_path_factory.mktemp("flux2-klein-base")
    return save(build_tiny_flux2_klein(root, distilled=False), root / "tiny-flux2-klein-base")


# --- the generic family: other diffusers text-to-image pipelines, run through their own class (test_generic) ---

PIXART_VAE_FACTORS = {"scaling_factor": 0.13025}  # SD's VAE layout, as PixArt-Sigma's (no shift factor)


def tiny_t5(root: Path) -> dict:
    """A character-level T5 tokenizer (written locally) and a tiny T5 encoder, TEXT_HIDDEN wide."""
    import torch
    from transformers import T5Config, T5EncoderModel

    tokenizer = write_tiny_t5_tokenizer(root / "t5-tokenizer")
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=1,
                                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    return {"text_encoder": encoder, "tokenizer": tokenizer}


def build_tiny_pixart_sigma(root: Path):
    """Tiny PixArt-Sigma components: a T5 encoder, a 2x2-patch DiT (learned sigma: 8 output channels for 4 latent
    ones) whose sample_size 8 x the VAE's 8 makes its native size 64, an SD-layout VAE, DPM++ (noise prediction)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, cross_attention_dim=16, sample_size=8, patch_size=2,
                                           caption_channels=TEXT_HIDDEN)
    return PixArtSigmaPipeline(transformer=transformer, vae=tiny_vae(PIXART_VAE_FACTORS, 4),
                               scheduler=DPMSolverMultistepScheduler(), **tiny_t5(root))


def build_tiny_chroma(root: Path):
    """Tiny Chroma components: a T5 encoder, a FLUX.1-like transformer without CLIP or guidance embedding (it reads
    the packed 2x2 latents: 16 channels for the VAE's 4), FLUX.1's VAE layout and flow-matching Euler."""
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
                                           axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                           approximator_hidden_dim=16, approximator_layers=1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return ChromaPipeline(transformer=transformer, vae=tiny_vae(FLUX_VAE_FACTORS, 4), scheduler=scheduler,
                          **tiny_t5(root))


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


def build_tiny_sana(root: Path):
    """Tiny Sana components: a Gemma 2 encoder with a byte-level BPE Gemma tokenizer (built with the tokenizers
    library), a linear-attention DiT, a six-block DC-AE (factor 32; the pipeline wants sizes of 32) and DPM++ on flow
    sigmas, as Sana's folders have."""
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    tokenizer = write_byte_bpe_tokenizer(root / "gemma-tokenizer", GEMMA_SPECIALS, cls=GemmaTokenizerFast, bos_token="<bos>",
                                         eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer),
                                            max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                                            bos_token_id=2)).eval()
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                         num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=16, sample_size=32, patch_size=1)
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3  # six blocks: a factor of 32, as Sana's DC-AE
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=blocks,
                        decoder_block_types=blocks, encoder_block_out_channels=(8,) * 6, decoder_block_out_channels=(8,) * 6,
                        encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3, decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
                        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6, downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                        scheduler=scheduler)


LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")


def build_tiny_hidream(root: Path):
    """Tiny HiDream-I1 components: two CLIPs with projection (248 positions, as its long CLIPs), T5, a Llama with a
    byte-level BPE tokenizer (built with the tokenizers library), a mixture-of-experts transformer reading both Llama
    layers, FLUX.1's VAE layout and flow-matching Euler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, LlamaConfig, LlamaForCausalLM

    size = write_tiny_tokenizer(root / "clip-tokenizer")
    clip_tokenizer = CLIPTokenizer.from_pretrained(root / "clip-tokenizer")
    llama_tokenizer = write_byte_bpe_tokenizer(root / "llama-tokenizer", LLAMA_SPECIALS, bos_token=LLAMA_SPECIALS[0],
                                               eos_token=LLAMA_SPECIALS[1], pad_token=LLAMA_SPECIALS[2])
    torch.manual_seed(0)
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=size - 1, hidden_size=TEXT_HIDDEN, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=size, max_position_embeddings=248,
        projection_dim=TEXT_HIDDEN, hidden_act="gelu")) for _ in range(2)]
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, vocab_size=len(llama_tokenizer), max_position_embeddings=256,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=2)).eval()
    t5 = tiny_t5(root)
    transformer = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                                 num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
                                                 caption_channels=[TEXT_HIDDEN, 16], text_emb_dim=2 * TEXT_HIDDEN,
                                                 num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                                 max_resolution=(128, 128), llama_layers=(0, 1))
    return HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(FLUX_VAE_FACTORS, 4),
                                text_encoder=clips[0], tokenizer=clip_tokenizer, text_encoder_2=clips[1],
                                tokenizer_2=clip_tokenizer, text_encoder_3=t5["text_encoder"], tokenizer_3=t5["tokenizer"],
                                text_encoder_4=llama, tokenizer_4=llama_tokenizer, transformer=transformer)


@pytest.fixture(scope="session")
def tiny_hidream(tmp_path_factory) -> Path:
    """The tiny HiDream-I1 model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("hidream")
    return save(build_tiny_hidream(root), root / "tiny-hidream")


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory) -> Path:
    """The tiny Sana model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("sana")
    return save(build_tiny_sana(root), root / "tiny-sana")


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory) -> Path:
    """The tiny PixArt-Sigma model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("pixart")
    return save(build_tiny_pixart_sigma(root), root / "tiny-pixart")


@pytest.fixture(scope="session")
def tiny_chroma(tmp_path_factory) -> Path:
    """The tiny Chroma model as a local diffusers folder."""
    root = tmp_path_factory.mktemp("chroma")
    return save(build_tiny_chroma(root), root / "tiny-chroma")


def build_tiny_lcm(root: Path):
    """A tiny Latent Consistency Model: the tiny SD1 components with a U-Net that embeds the guidance scale
    (time_cond_proj_dim) and LCM's scheduler; AutoPipeline maps it to an img2img pipeline too."""
    import torch
    from conftest import build_tiny_pipeline
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    base = build_tiny_pipeline(root)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(base.unet.config, time_cond_proj_dim=32)
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder",)}
    return LatentConsistencyModelPipeline(**dict(parts, unet=unet, scheduler=LCMScheduler.from_config(base.scheduler.config)))


@pytest.fixture(scope="session")
def tiny_lcm(tmp_path_factory) -> Path:
    """The tiny LCM as a local diffusers folder."""
    root = tmp_path_factory.mktemp("lcm")
    return save(build_tiny_lcm(root), root / "tiny-lcm")
