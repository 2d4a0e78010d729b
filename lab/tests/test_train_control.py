"""The control trainer's captions: what --unsaid-share and --conflict-share put in its pool."""

import random

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
