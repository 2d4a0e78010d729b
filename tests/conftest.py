"""Tiny real Stable Diffusion components, built once per session and saved the ways users have models.

- `tiny_model`: a local diffusers folder (save_pretrained)
- `tiny_checkpoint`: the same weights as one original-layout .safetensors file
- `hf_cache`: the same model in a temporary Hugging Face cache under the repo id `diffcli-test/tiny-sd`
No test touches the network: HF_HUB_OFFLINE is set for the whole session.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="diffcli-hf-empty-")  # never the user's cache
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], True)
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("DIFFCLI_MODEL", None)
os.environ.pop("DIFFCLI_OUTPUT", None)

HUB_REPO = "diffcli-test/tiny-sd"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXT_HIDDEN = 32


def write_tiny_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE tokenizer (every byte, alone and word-final); returns vocab size."""
    from tokenizers.pre_tokenizers import ByteLevel

    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(ByteLevel.alphabet())  # the byte -> printable table CLIP shares with GPT-2
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def build_tiny_pipeline(root: Path):
    """Tiny SD1-layout components from config dicts, seeded, as real diffusers classes."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_size = write_tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, norm_num_groups=8, attention_head_dim=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_size=TEXT_HIDDEN,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
    ))
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer-src")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sdxl(root: Path):
    """Tiny SDXL components (two text encoders, text_time embedding), as diffusers' own tests build them."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = write_tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=72, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    config = CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=32,
                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab,
                            max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
    config_2 = CLIPTextConfig(**{**config.to_dict(), "hidden_size": 40})  # diffusers tells the encoders apart by width
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer-src")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config_2),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"))


def build_tiny_sd2(root: Path):
    """A tiny SD2-layout model: 1024-wide text encoder (how SD2 is told apart), linear projections, v-prediction."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base = build_tiny_pipeline(root)
    vocab = base.tokenizer.vocab_size
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config(base.unet.config, cross_attention_dim=1024, use_linear_projection=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=1024, intermediate_size=64,
        num_attention_heads=16, num_hidden_layers=1, vocab_size=vocab, max_position_embeddings=77, hidden_act="gelu"))
    scheduler = DDIMScheduler.from_config(base.scheduler.config, prediction_type="v_prediction")
    return StableDiffusionPipeline(**dict(base.components, unet=unet, text_encoder=text_encoder, scheduler=scheduler))


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_is_delivered():
    """A suite started in the background by a shell without job control (a CI runner's, `cmd &` in a script) inherits
    SIGINT ignored, and so would every process it starts: the Ctrl-C tests need it delivered, as a user's terminal
    does. A Python handler, unlike an ignored signal, is reset to the default in the processes the tests start."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """The tiny SD2 v-prediction model saved as a local diffusers folder."""
    root = tmp_path_factory.mktemp("sd2")
    build_tiny_sd2(root).save_pretrained(root / "tiny-sd2")
    return root / "tiny-sd2"


def build_tiny_sdxl_refiner(root: Path):
    """A tiny SDXL refiner: the tiny SDXL's second text encoder alone, aesthetic-score conditioning (5 time ids)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = build_tiny_sdxl(root)
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(base.unet.config, layers_per_block=1, transformer_layers_per_block=1,
                                            cross_attention_dim=40, projection_class_embeddings_input_dim=5 * 8 + 32)
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, tokenizer=None, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        unet=unet, scheduler=base.scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory) -> Path:
    """The tiny SDXL refiner saved as a local diffusers folder."""
    root = tmp_path_factory.mktemp("sdxl-refiner")
    build_tiny_sdxl_refiner(root).save_pretrained(root / "tiny-sdxl-refiner")
    return root / "tiny-sdxl-refiner"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline saved as a local diffusers folder."""
    root = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl(root).save_pretrained(root / "tiny-sdxl")
    return root / "tiny-sdxl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny pipeline saved as a local diffusers folder."""
    root = tmp_path_factory.mktemp("models")
    folder = root / "tiny-sd"
    build_tiny_pipeline(root).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory) -> Path:
    """A dedicated inpainting model: the tiny components with a 9-channel U-Net (latents, mask, masked image)."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    root = tmp_path_factory.mktemp("inpaint")
    base = build_tiny_pipeline(root)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(base.unet.config, in_channels=9)
    pipe = StableDiffusionInpaintPipeline(**dict(base.components, unet=unet))
    pipe.save_pretrained(root / "tiny-inpaint")
    return root / "tiny-inpaint"


@pytest.fixture(scope="session")
def tiny_latent_upscaler(tmp_path_factory) -> Path:
    """An SD x2 latent upscaler layout: K-block U-Net on 4 latent + 4 low-res latent channels, Fourier time embedding."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("latent-upscaler")
    vocab_size = write_tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=[32, 32, 64, 64],
        time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=TEXT_HIDDEN, in_channels=8,
        out_channels=5, mid_block_type=None, only_cross_attention=False, resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier", timestep_post_act="gelu", sample_size=16,
        down_block_types=("KDownBlock2D",) + ("KCrossAttnDownBlock2D",) * 3, up_block_types=("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",),
    )
    vae = AutoencoderKL(block_out_channels=[16, 16, 32, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_size=TEXT_HIDDEN,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, hidden_act="quick_gelu",
    ))
    pipe = StableDiffusionLatentUpscalePipeline(vae=vae, text_encoder=text_encoder, unet=unet,
                                                tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer-src"),
                                                scheduler=EulerDiscreteScheduler(prediction_type="sample"))
    pipe.save_pretrained(root / "tiny-latent-x2")
    return root / "tiny-latent-x2"


@pytest.fixture(scope="session")
def tiny_x4_upscaler(tmp_path_factory) -> Path:
    """An SD x4 upscaler layout: 7-channel U-Net (4 latent + 3 noised low-res RGB) with a noise-level class embedding,
    a VAE decoding x4 (3 blocks, scaling 0.08333), a DDPM low_res_scheduler and max_noise_level 350, as the real one."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("x4-upscaler")
    vocab_size = write_tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=7, out_channels=4, num_class_embeds=1000,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, norm_num_groups=8, attention_head_dim=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=0.08333)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_size=TEXT_HIDDEN,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
    ))
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer-src"), unet=unet,
        low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"),
        safety_checker=None, watermarker=None, feature_extractor=None, max_noise_level=350,
    )
    pipe.save_pretrained(root / "tiny-x4")
    return root / "tiny-x4"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> Path:
    """The tiny model as one original-layout (A1111/CompVis) .safetensors file."""
    from diffusers import StableDiffusionPipeline
    from diffcli.ldm_format import save_original_checkpoint

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    return save_original_checkpoint(pipe, tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, tiny_model) -> Path:
    """A Hugging Face cache holding the tiny model under HUB_REPO, as `hf download` would leave it."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    shutil.copytree(tiny_model, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return cache


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory) -> Path:
    """A peft LoRA for the tiny U-Net and text encoder, saved as diffusers' save_lora_weights writes it."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("loras")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
                                              weight_name="shiny.safetensors")
    return folder / "shiny.safetensors"


@pytest.fixture(scope="session")
def tiny_embedding(tmp_path_factory) -> Path:
    """An A1111-style textual-inversion file: two vectors under `emb_params`."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    torch.manual_seed(1)
    save_file({"emb_params": torch.randn(2, 32)}, folder / "mystyle.safetensors")
    return folder / "mystyle.safetensors"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own diffcli home and the shared offline HF cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFCLI_HOME", str(tmp_path / ".diffcli-home"))
    return tmp_path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys):
    """Run diffcli's real entry point in-process; returns exit code, stdout and stderr."""
    from diffcli.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def oom_twice(monkeypatch):
    """The first two generation calls run out of CUDA memory, the rest run: the out-of-memory ladder's first two steps
    are taken. The pipeline cache is the test's own (the remedies stay on the pipeline)."""
    import torch

    from diffcli import pipeline, run

    monkeypatch.setattr(pipeline, "_CACHE", {})
    real, calls = run._generate_batch, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "_generate_batch", generate)
    return calls


def run_subprocess(*args: str, env: dict | None = None, **kwargs):
    """diffcli as a real process (for help timing, signals and stdout bytes)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "diffcli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture(scope="session")
def tiny_controlnets(tmp_path_factory, tiny_model) -> list[Path]:
    """Two tiny ControlNets (different seeds) from the tiny U-Net, saved as diffusers folders (safetensors)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))  # the tiny VAE halves once
        for parameter in net.parameters():  # from_unet zeroes the output convs: give them weight so control shows
            if parameter.abs().sum() == 0:
                torch.nn.init.normal_(parameter, std=0.5)
        folder = tmp_path_factory.mktemp("controlnets") / f"tiny-cn-{seed}"
        net.save_pretrained(folder)
        folders.append(folder)
    return folders
