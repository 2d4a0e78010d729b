"""The control trainer: what --unsaid-share, --conflict-share, --focus and --distill-share put in its pool and batches,
and the options it refuses."""

import random

import pytest

from diffcli.shapes import world
from lab.train_control import misnamed


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
    latents, maps, ids, near, taught, teacher = pool.batch(8, dropout=1.0, distill_share=1.0)
    assert taught.all() and len(teacher) == 8 and not (ids == pool.empty).all(dim=1).any()  # never emptied
    latents, maps, ids, near, taught, teacher = pool.batch(8, dropout=1.0, distill_share=0.0)
    assert not taught.any() and len(teacher) == 0 and (ids == pool.empty).all()
    assert maps.shape == (8, 3, 128, 128) and near.shape == latents[:, :1].shape and torch.isfinite(latents).all()


@pytest.mark.parametrize("argv, says", [
    (["--focus", "small-blob"], "--focus 'small-blob': expected SIZE-SHAPE"),
    (["--focus", "SMALL-square"], "--focus 'SMALL-square'"),
    (["--focus", "small-square,../star"], "--focus '../star'"),
    (["--distill-share", "0.5"], "--distill-share needs --resume"),
])
def test_bad_training_options_are_refused_before_any_work(tmp_path, capsys, argv, says):
    from lab.train_control import main

    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "run"), *argv])
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
