"""Smoke run of every training stage on CPU with tiny networks, then plain diffusers loading."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lab import train

pytestmark = pytest.mark.slow  # training runs (the lab's tests): `pytest -m "not slow"` leaves them out
SMOKE = ["--smoke", "--max-steps", "1", "--minutes", "1"]
ROOT = Path(__file__).resolve().parents[2]  # the repository root, where `python -m lab.NAME` runs


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory) -> Path:
    """A VAE and base UNet trained one smoke step each, once for the module: the prefix many tests share."""
    folder = tmp_path_factory.mktemp("smoke-base")
    train.main(["--out", str(folder), *SMOKE, "--stage", "vae"])
    train.main(["--out", str(folder), *SMOKE, "--stage", "unet"])
    return folder


def copy_of(base: Path, to: Path) -> Path:
    shutil.copytree(base, to, dirs_exist_ok=True)
    return to


def test_train_all_stages_smoke(tmp_path):
    train.main(["--out", str(tmp_path), "--smoke", "--max-steps", "2", "--minutes", "2", "--seed", "3"])
    logs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("log_*.json")}
    assert set(logs) == {"log_vae_tiny-shapes.json", "log_unet.json", "log_vae_tiny-shapes-x4.json",
                         "log_upscaler.json"}
    assert all(d["losses"] and d["losses"][-1][0] == d["steps"] == 2 for d in logs.values())
    from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / train.BASE)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.vae.config.scaling_factor > 0 and pipe.unet.config.sample_size == 16
    image = pipe("a red circle", num_inference_steps=1, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3)
    up = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / train.UPSCALER)
    assert up.unet.config.in_channels == 7 and up.vae.config.scaling_factor == 0.08333
    assert json.loads((tmp_path / train.BASE / "diffcli.json").read_text())["width"] == 128


def test_decoder_finetune_keeps_latent_scale(tmp_path):
    train.main(["--out", str(tmp_path / "a"), "--smoke", "--max-steps", "1", "--minutes", "1", "--stage", "vae"])
    train.main(["--out", str(tmp_path / "b"), "--smoke", "--max-steps", "1", "--minutes", "1", "--stage", "decoder",
                "--edge-weight", "10", "--resume", str(tmp_path / "a")])
    cfg = [json.loads((tmp_path / d / train.BASE / "vae" / "config.json").read_text()) for d in "ab"]
    assert cfg[0]["scaling_factor"] == cfg[1]["scaling_factor"]


def test_resumed_training_keeps_the_models_own_tokenizer(tmp_path):
    """Its text encoder learned those ids; a new BPE build may number tokens differently."""
    smoke = ["--smoke", "--max-steps", "1", "--minutes", "1"]
    train.main(["--out", str(tmp_path / "a"), *smoke])
    for name in (train.BASE, train.UPSCALER):  # mark the first model's vocabulary: swap two ids in both files
        folder = tmp_path / "a" / name / "tokenizer"
        for path, key in ((folder / "vocab.json", ()), (folder / "tokenizer.json", ("model", "vocab"))):
            data = json.loads(path.read_text())
            vocab = data[key[0]][key[1]] if key else data
            vocab["x</w>"], vocab["y</w>"] = vocab["y</w>"], vocab["x</w>"]
            path.write_text(json.dumps(data))
    for stage in ("unet", "upscaler"):
        train.main(["--out", str(tmp_path / "b"), *smoke, "--stage", stage, "--resume", str(tmp_path / "a")])
    from transformers import CLIPTokenizer

    for name in (train.BASE, train.UPSCALER):
        files = [json.loads((tmp_path / d / name / "tokenizer" / "vocab.json").read_text()) for d in "ab"]
        loaded = [CLIPTokenizer.from_pretrained(tmp_path / d / name / "tokenizer").get_vocab() for d in "ab"]
        assert files[0] == files[1] == loaded[0] == loaded[1], name


def test_zero_snr_schedule_converts_a_resumed_model_and_diffcli_runs_it(tmp_path, cli, smoke_base):
    """`--schedule zero-snr` saves a v-prediction, zero-terminal-SNR sampler; diffcli generates with the model."""
    smoke = SMOKE
    copy_of(smoke_base, tmp_path / "a")
    train.main(["--out", str(tmp_path / "b"), *smoke, "--stage", "unet", "--resume", str(tmp_path / "a"),
                "--schedule", "zero-snr"])
    configs = [json.loads((tmp_path / d / train.BASE / "scheduler" / "scheduler_config.json").read_text())
               for d in "ab"]
    assert (configs[0]["prediction_type"], configs[0]["rescale_betas_zero_snr"]) == ("epsilon", False)
    assert (configs[1]["prediction_type"], configs[1]["rescale_betas_zero_snr"], configs[1]["timestep_spacing"]) == \
        ("v_prediction", True, "trailing")
    result = cli("txt2img", "a red circle", "--model", tmp_path / "b" / train.BASE, "--steps", "2",
                 "--scheduler", "euler-a", "-o", tmp_path / "out.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json_lines()[0]["path"] == str(tmp_path / "out.png") and (tmp_path / "out.png").stat().st_size > 0


def test_focus_puts_the_named_object_into_the_given_share_of_scenes(tmp_path, capsys):
    from transformers import CLIPTokenizer

    from diffcli.shapes import world
    from lab.tokenizer import build_tokenizer

    tok = CLIPTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    small, star = world.SIZES.index("small"), world.SHAPES.index("star")

    def share(pool, size=None, objects=(1, 2)):
        hits = (pool.t["shape"] == star) & pool.t["present"].bool() & (size is None or pool.t["size"] == size)
        kind = sum(pool.t["present"].sum(dim=1) == n for n in objects).bool()
        return hits.any(dim=1)[kind].float().mean().item()

    plain, small_stars, stars, one_object = (
        train.Pool(2000, 5, tok, torch.device("cpu"), *f)
        for f in ((), ((small, star), 0.5), ((None, star), 0.5), ((small, star), 0.5, True)))
    assert share(plain, small) < 0.2 and 0.5 < share(small_stars, small) < 0.65  # small stars occur by chance too
    assert 0.6 < share(stars) < 0.75 and 0.25 < share(stars, small) < 0.4  # `star`: both sizes, at even odds
    assert 0.5 < share(one_object, small, [1]) < 0.65  # --focus-one-object: two-object scenes are drawn as usual
    assert share(one_object, small, [2]) == share(plain, small, [2])
    with pytest.raises(SystemExit) as exit:
        train.main(["--out", str(tmp_path / "x"), "--focus", "huge-star"])
    assert exit.value.code == 2 and "--focus 'huge-star'" in capsys.readouterr().err
    train.main(["--out", str(tmp_path / "y"), "--smoke", "--max-steps", "1", "--minutes", "1", "--stage", "vae",
                "--focus", "small-star", "--focus-share", "0.3", "--focus-one-object"])
    run = json.loads((tmp_path / "y" / "log_vae_tiny-shapes.json").read_text())["run"]
    assert (run["focus"], run["focus_share"], run["focus_one_object"]) == (str((small, star)), "0.3", "True")


def test_relation_head_reads_only_the_tokens_after_a_relation_word(tmp_path):
    from transformers import CLIPTokenizer

    from lab.tokenizer import build_tokenizer

    tok = CLIPTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    pool = train.Pool(300, 4, tok, torch.device("cpu"))
    words = {"left": 0, "right": 1, "above": 2, "over": 2, "below": 3, "under": 3}  # word -> relation index
    checked = 0
    for i in range(pool.n):
        tokens = [t.removesuffix("</w>") for t in tok.convert_ids_to_tokens(pool.ids[i])]
        end = tokens.index("<|endoftext|>")
        first = next((j for j, t in enumerate(tokens) if t in words), None)
        two = bool(pool.t["present"][i].sum() == 2)
        marks = pool.relation_marks[i].tolist()
        if two and first is not None:  # the relation said: every token after its word, through end of text
            relation = words[tokens[first]] + 1
            assert marks == [0] * (first + 1) + [relation] * (end - first) + [0] * (76 - end), tokens
            checked += 1
        else:  # one object (its "on the left" included) or "and"
            assert not any(marks), tokens
    assert checked > 100
    _, ids, marks = pool.batch(64, dropout=1.0)
    assert torch.all(ids == pool.empty) and not marks.any()  # emptied captions have nothing to read

    states = torch.randn(3, 77, 8, requires_grad=True)
    head, marks = torch.nn.Linear(8, 4), torch.zeros(3, 77, dtype=torch.long)
    assert train._relation_loss(head, states, marks).item() == 0
    marks[1, 5:9] = 3
    train._relation_loss(head, states, marks).backward()
    touched = states.grad.abs().sum(dim=2) > 0
    assert touched[1, 5:9].all() and touched.sum() == 4  # the gradient reaches the marked tokens only


def test_anchor_loss_holds_every_token_but_the_relation_ones(tmp_path, smoke_base):
    """--anchor-text: zero for the anchor's own output; its gradient reaches the tokens the relation head leaves
    alone (marks 0) and no others; the flag needs the resumed encoder it anchors to."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    anchor = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=1, max_position_embeddings=77))
    ids, marks = torch.randint(0, 50, (2, 77)), torch.zeros(2, 77, dtype=torch.long)
    marks[1, 5:9] = 2
    own = anchor(ids)[0].detach()
    assert train._anchor_loss(anchor, own, ids, marks).item() == 0
    states = (own + 0.1 * torch.randn_like(own)).requires_grad_(True)
    train._anchor_loss(anchor, states, ids, marks).backward()
    touched = states.grad.abs().sum(dim=2) > 0
    assert not touched[1, 5:9].any() and touched.sum() == 2 * 77 - 4
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--stage", "unet", "--anchor-text", "10"])
    smoke = SMOKE
    copy_of(smoke_base, tmp_path / "a")
    train.main(["--out", str(tmp_path / "b"), *smoke, "--stage", "unet", "--resume", str(tmp_path / "a"),
                "--relation-head", "1", "--anchor-text", "10"])
    log = json.loads((tmp_path / "b" / "log_unet.json").read_text())
    assert log["run"]["anchor_text"] == "10.0" and log["steps"] == 1


def test_relation_head_flag_trains_and_is_recorded(tmp_path):
    smoke = ["--smoke", "--max-steps", "2", "--minutes", "1"]
    train.main(["--out", str(tmp_path), *smoke, "--stage", "vae"])
    train.main(["--out", str(tmp_path), *smoke, "--stage", "unet", "--relation-head", "0.5"])
    log = json.loads((tmp_path / "log_unet.json").read_text())
    assert log["run"]["relation_head"] == "0.5" and log["steps"] == 2


def test_distilling_from_the_resumed_model_itself_gives_zero_loss(tmp_path, smoke_base):
    """Below --distill-below the target is the teacher's (default: the resumed model's) estimate: at the first step
    the student is the teacher."""
    smoke = SMOKE
    copy_of(smoke_base, tmp_path / "a")
    losses = []
    for i, extra in enumerate((["--distill-below", "0"], ["--distill-below", "1000"],
                               ["--distill-below", "1000", "--teacher", str(tmp_path / "a")],
                               ["--distill-below", "500", "--distill-share", "1"],
                               ["--distill-below", "500", "--distill-share", "0"])):
        train.main(["--out", str(tmp_path / f"b{i}"), *smoke, "--stage", "unet", "--resume", str(tmp_path / "a"),
                    *extra])
        losses.append(json.loads((tmp_path / f"b{i}" / "log_unet.json").read_text())["losses"][0][1])
    assert max(losses[1:4]) < 1e-6 < min(losses[0], losses[4])


def test_distill_share_draws_that_share_of_timesteps_below_t():
    t = train._timesteps(4000, 1000, 500, 0.8, torch.device("cpu"))
    assert 0.77 < (t < 500).float().mean() < 0.83 and t.min() >= 0 and t.max() < 1000
    assert (train._timesteps(100, 1000, 500, 0.0, torch.device("cpu")) >= 500).all()
    for bad in (["--distill-share", "0.5"], ["--distill-below", "500", "--distill-share", "1.5"]):
        with pytest.raises(SystemExit):
            train.main(["--out", "unused", "--stage", "unet", *bad])


def test_teacher_targets_remake_the_noisy_latents_on_a_new_schedule(tmp_path, smoke_base):
    smoke = SMOKE
    copy_of(smoke_base, tmp_path)
    from lab import models

    sched = models.noise_scheduler(models.ZERO_SNR_NOISE)
    teacher = train.Teacher(tmp_path / train.BASE, sched, torch.device("cpu"))
    assert not teacher.v and teacher.timestep[0] == 0 and (teacher.timestep.diff() >= 0).all()
    t, noisy = torch.tensor([0, 300, 700]), torch.randn(3, 4, 16, 16)
    x0, noise = teacher.targets(noisy, t, torch.ones(3, 77, dtype=torch.long))
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * x0 + (1 - a).sqrt() * noise, noisy, atol=1e-4)
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "c"), *smoke, "--stage", "unet", "--distill-below", "500"])


def test_average_weights_script_mixes_two_models_and_rejects_bad_input(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    script = ["-m", "lab.average_weights"]  # as the lab runs it, from the repository root

    def model(folder, value, shape=(2, 3)):
        for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            save_file({"w": torch.full(shape, value, dtype=torch.float16)}, folder / name)
        (folder / "model_index.json").write_text("{}")
        return str(folder)

    def run(*args):
        return subprocess.run([sys.executable, *script, *map(str, args)], capture_output=True, text=True, cwd=ROOT)

    a, b, odd = model(tmp_path / "a", 1.0), model(tmp_path / "b", 3.0), model(tmp_path / "odd", 0.0, (3, 2))
    done = run(a, b, 0.25, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    weights = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")["w"]
    assert weights.dtype == torch.float16 and torch.all(weights == 1.5)
    assert (tmp_path / "out" / "model_index.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a", "b", "odd", "out"]  # no draft folder left behind
    for args, error in (((a, b, "half", tmp_path / "x"), "invalid float value: 'half'"),
                        ((a, b, 1.5, tmp_path / "x"), "FRACTION must be between 0 and 1"),
                        ((a, tmp_path / "none", 0.5, tmp_path / "x"), "not a model folder"),
                        ((a, odd, 0.5, tmp_path / "x"), "have different architectures"),
                        ((a, b, 0.5, tmp_path / "out"), "exists; choose a new folder")):
        result = run(*args)
        assert result.returncode == 2 and error in result.stderr and "Traceback" not in result.stderr, args
    assert not (tmp_path / "x").exists()


def test_bundle_with_refiner_script_pairs_a_base_with_a_refiner_sharing_its_text_encoder(tmp_path, cli, smoke_base):
    """A zero-SNR base and an epsilon refiner without text encoder: diffcli runs the pair by the base's diffcli.json."""
    import subprocess
    import sys

    script = ["-m", "lab.bundle_with_refiner"]  # as the lab runs it, from the repository root
    smoke = SMOKE
    copy_of(smoke_base, tmp_path / "a")
    train.main(["--out", str(tmp_path / "b"), *smoke, "--stage", "unet", "--resume", str(tmp_path / "a"),
                "--schedule", "zero-snr"])
    base, refiner, out = tmp_path / "b" / train.BASE, tmp_path / "a" / train.BASE, tmp_path / "bundle"

    def run(*args):
        return subprocess.run([sys.executable, *script, *map(str, args)], capture_output=True, text=True, cwd=ROOT)

    done = run(base, refiner, 0.5, out)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "tiny-shapes-refiner").iterdir()) == [
        "diffcli.json", "model_index.json", "scheduler", "unet", "vae"]
    result = cli("txt2img", "a red circle", "--model", out / "tiny-shapes", "--steps", "4", "-o", tmp_path / "x.png",
                 "--json")
    assert result.exit_code == 0, result.stderr
    record = result.json_lines()[0]
    assert (record["refiner"], record["refiner_start"]) == (str(out / "tiny-shapes-refiner"), 0.5)
    for args, error in (((base, refiner, 0.5, out), "exists; choose a new folder"),
                        ((base, refiner, 1, tmp_path / "y"), "START must be between 0 and 1"),
                        ((base, tmp_path, 0.5, tmp_path / "y"), "is not a tiny-shapes model folder")):
        result = run(*args)
        assert result.returncode == 2 and error in result.stderr and "Traceback" not in result.stderr, args
    assert not (tmp_path / "y").exists()



def test_upscaler_training_pairs_are_windows_of_the_zoomed_world_and_their_box_average(tmp_path):
    """`render_crops` draws exactly what `world.render` draws at the zoomed size; `upscale_batch`'s input is the 4x box
    average of its target rounded to 8 bits, and `upscale_mixed_batch` keeps the pixels per batch about constant."""
    import random

    from transformers import CLIPTokenizer

    from diffcli.shapes import world
    from lab.tokenizer import build_tokenizer

    scenes = world.to_tensors([world.sample_scene(random.Random(i), i % 2 == 0) for i in range(4)])
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert torch.equal(train.render_crops(scenes, ones, zeros, zeros, 128), world.render(scenes))
    window = train.render_crops(scenes, 4 * ones, 100 * ones, 200 * ones, 96)
    assert torch.allclose(window, world.render(scenes, size=512)[:, :, 200:296, 100:196], atol=1e-5)
    pool = train.Pool(50, 1, CLIPTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok")), torch.device("cpu"))
    high, low = train.upscale_batch(pool, 3, 64)
    assert high.shape == (3, 3, 64, 64) and low.shape == (3, 3, 16, 16) and high.min() >= -1 and high.max() <= 1
    levels = (low + 1) * 127.5  # 0-255
    assert (levels - (torch.nn.functional.avg_pool2d(high, 4) + 1) * 127.5).abs().max() <= 0.5 + 1e-3
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert train.upscale_crops(96) == [64, 96, 128, 192, 256]
    for _ in range(5):
        high, _ = train.upscale_mixed_batch(pool, 16, 96)
        assert high.shape[2] in (64, 96, 128, 192, 256) and 0.5 < high.shape[0] * high.shape[2] ** 2 / (16 * 96**2) < 2
