"""The control trainer: what --unsaid-share, --conflict-share, --focus, --distill-share and --rollout-share put in its
pool and batches, that its rollout walks the states `diffcli txt2img` does, which scenes each refreshed bank draws,
and the options it refuses."""

import random

import pytest

from diffcli.shapes import world
from lab.train_control import BUNDLED, misnamed

CONTROL = str(BUNDLED / "tiny-shapes-control")


def test_misnamed_scenes_change_every_shape_and_nothing_else():
    rng = random.Random(0)
    for two in (False, True) * 20:
        scene = world.sample_scene(rng, two)
        before = [vars(o).copy() for o in scene.objects]
        other = misnamed(rng, scene)
        assert [vars(o) for o in scene.objects] == before  # the scene drawn keeps its shapes
        for was, now in zip(before, other.objects):
            assert now.shape != was["shape"] and 0 <= now.shape < len(world.SHAPES)
            assert {**vars(now), "shape": was["shape"]} == was
        assert (other.background, other.relation, other.position) == (scene.background, scene.relation, scene.position)


def _pool(**options):
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from lab.train_control import BUNDLED, Pool

    tok = CLIPTokenizer.from_pretrained(BUNDLED / "tiny-shapes" / "tokenizer")
    vae = AutoencoderKL.from_pretrained(BUNDLED / "tiny-shapes" / "vae", dtype=torch.float32).eval()
    return tok, Pool(24, 0, tok, vae, **options)


def test_focus_gives_one_object_of_every_scene_a_focus_kind():
    _, pool = _pool(focus=((0, 1), (0, 3)), focus_share=1.0)
    assert all(any((o.size, o.shape) in ((0, 1), (0, 3)) for o in s.objects) for s in pool.scenes)
    assert {(o.size, o.shape) for s in pool.scenes for o in s.objects} - {(0, 1), (0, 3)}  # the other object is left


def test_taught_scenes_leave_shape_size_and_place_to_the_map_and_the_teacher_hears_them():
    import torch

    tok, pool = _pool(distill=True)
    words = lambda ids: set(tok.decode(ids, skip_special_tokens=True).split())  # noqa: E731
    for s, student, teacher in zip(pool.scenes, pool.student_ids, pool.teacher_ids):
        assert not words(student) & {*world.SHAPES, *world.POSITION_NAMES, "middle", "above", "over", "below", "under",
                                     *(w for v in world.SIZE_WORDS.values() for w in v)}
        assert {world.SHAPES[o.shape] for o in s.objects} <= words(teacher)
        assert {world.COLOUR_NAMES[o.colour] for o in s.objects} | {world.COLOUR_NAMES[s.background]} <= words(student)
    latents, maps, ids, near, taught, teacher, fixed, _, _ = pool.batch(8, dropout=1.0, distill_share=1.0)
    assert taught.all() and len(teacher) == 8 and not (ids == pool.empty).all(dim=1).any()  # never emptied
    latents, maps, ids, near, taught, teacher, fixed, _, _ = pool.batch(8, dropout=1.0, distill_share=0.0)
    assert not taught.any() and not fixed.any() and len(teacher) == 0 and (ids == pool.empty).all()
    assert maps.shape == (8, 3, 128, 128) and near.shape == latents[:, :1].shape and torch.isfinite(latents).all()


def test_rollout_states_are_taught_and_walk_the_states_diffcli_txt2img_does(tmp_path):
    """The bundled pair and ControlNet drawing one pool scene from its student caption: the rollout keeps the states
    below its timestep, and its final latents decode to the image `diffcli txt2img` makes of that caption, map and
    seed (euler-a, the refiner from 0.5; the same noise draws, so equal up to float rounding)."""
    import json

    import numpy as np
    import torch
    from diffusers import ControlNetModel, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel

    from diffcli.refiner import _converted_unet
    from diffcli.shapes import evaluate
    from lab.train_control import BUNDLED, rollout

    tok, pool = _pool(distill=True)
    base, refiner = BUNDLED / "tiny-shapes", BUNDLED / "tiny-shapes-refiner"
    load = lambda cls, path: cls.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    text, unet, own = load(CLIPTextModel, base / "text_encoder"), load(UNet2DConditionModel, base / "unet"), load(
        UNet2DConditionModel, refiner / "unet")
    net = load(ControlNetModel, BUNDLED / "tiny-shapes-control")
    sampler = EulerAncestralDiscreteScheduler.from_config(json.loads((base / "scheduler" / "scheduler_config.json").read_text()))
    refined = _converted_unet(own, json.loads((refiner / "scheduler" / "scheduler_config.json").read_text()), sampler,
                              unet.config, None)
    with torch.no_grad():
        scenes, states, times, finals = rollout(net, unet, refined, sampler, text, pool, torch.tensor([3]), 250, 14, 3.0,
                                                torch.Generator().manual_seed(7))
    assert scenes.tolist() == [3] * len(times) and len(times) >= 2 and (times < 250).all() and states.shape[1:] == (4, 16, 16)

    Image.fromarray(pool.maps[3].numpy().astype(np.uint8) * 255).convert("RGB").save(tmp_path / "map.png")
    prompt = tok.decode(pool.student_ids[3], skip_special_tokens=True)
    made, = evaluate._images("txt2img", [dict(prompt=prompt, seed=7, model="tiny-shapes", device="cpu",
                                              control=[f"none:{tmp_path / 'map.png'}"])])
    from diffusers import AutoencoderKL

    vae = load(AutoencoderKL, base / "vae")
    with torch.no_grad():
        image = (vae.decode(finals / vae.config.scaling_factor).sample[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.abs(image - made).mean() < 2 / 255 and np.abs(image - made).max() < 0.1

    batch = pool.batch(8, dropout=0.0, bank=(scenes, states, times), rollout_share=1.0)
    taught, fixed, at, when = batch[4], *batch[6:]
    assert fixed.all() and taught.all()  # every row a visited state, taught from the full caption
    for state, t in zip(at, when):
        assert any(torch.equal(state, s) and t == u for s, u in zip(states, times))


def test_each_refreshed_bank_draws_the_next_scenes_round_the_pool():
    import torch

    from lab.train_control import bank_scenes

    order = torch.tensor([4, 2, 0, 1, 3])
    assert bank_scenes(order, 0, 2).tolist() == [4, 2]
    assert bank_scenes(order, 1, 2).tolist() == [0, 1]
    assert bank_scenes(order, 2, 2).tolist() == [3, 4]  # wraps round
    assert bank_scenes(order, 3, 5).tolist() == [4, 2, 0, 1, 3]


@pytest.mark.parametrize("argv, says", [
    (["--focus", "small-blob"], "--focus 'small-blob': expected SIZE-SHAPE"),
    (["--focus", "SMALL-square"], "--focus 'SMALL-square'"),
    (["--focus", "small-square,../star"], "--focus '../star'"),
    (["--distill-share", "0.5"], "--distill-share and --rollout-share need --resume"),
    (["--rollout-share", "0.5"], "--distill-share and --rollout-share need --resume"),
    (["--resume", CONTROL, "--rollout-share", "1.5"], "--rollout-share 1.5: expected a share"),
    (["--resume", CONTROL, "--distill-share", "-0.1"], "--distill-share -0.1"),
    (["--resume", CONTROL, "--rollout-share", "0.5", "--rollout-scenes", "0"],
     "--rollout-scenes 0: expected 1 to --pool"),
    (["--rollout-below", "0"], "--rollout-below 0: expected a timestep"),
    (["--resume", CONTROL, "--rollout-share", "0.5", "--rollout-refresh", "-1"], "--rollout-refresh -1: expected"),
    (["--resume", CONTROL, "--distill-share", "0.5", "--rollout-refresh", "10"], "with --rollout-share"),
    (["--resume", CONTROL, "--distill-share", "0.5", "--teacher", "../nowhere"],
     "--teacher ../nowhere: not a ControlNet folder"),
    (["--resume", str(BUNDLED / "tiny-shapes"), "--distill-share", "0.5"], "tiny-shapes: not a ControlNet folder"),
])
def test_bad_training_options_are_refused_before_any_work(tmp_path, capsys, argv, says):
    from lab.train_control import main

    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "run"), *argv])
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, says", [
    (["--kinds", "small-blob"], "--kinds 'small-blob': expected SIZE-SHAPE"),
    (["--kinds", "Small-square"], "--kinds 'Small-square'"),
    (["--at", "120-0"], "--at '120-0': expected LO-HI"),
    (["--at", "5-5"], "--at '5-5'"),
    (["--at", "abc"], "--at 'abc'"),
])
def test_bad_phase_probe_options_are_refused_before_any_work(capsys, argv, says):
    from lab.control_phase import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and says in capsys.readouterr().err
