"""The ControlNet judge's --offset: objects put that far from the world's five places, the place the judge expects
unchanged; an offset that could reach another place is refused."""

import math

import pytest


def test_moved_objects_are_offset_px_from_their_place_which_stays_the_nearest():
    from diffcli.shapes import world
    from lab.control_check import moved, scenes

    items = scenes(20, 0, "colour")
    for (text, before), (said, after) in zip(items, moved(items, 12.0, 0)):
        a, b = before.objects[0], after.objects[0]
        assert said == text and after.position == before.position and (a.shape, a.size) == (b.shape, b.size)
        x, y = world.POSITIONS[world.POSITION_NAMES[before.position]]
        assert math.hypot(b.x - x, b.y - y) == pytest.approx(12.0)
        place = min(world.POSITIONS, key=lambda k: math.hypot(b.x - world.POSITIONS[k][0], b.y - world.POSITIONS[k][1]))
        assert place == world.POSITION_NAMES[before.position]


@pytest.mark.parametrize("offset", ["16", "-1", "40"])
def test_an_offset_that_could_reach_another_place_is_refused(capsys, offset):
    from lab.control_check import main

    with pytest.raises(SystemExit) as stop:
        main(["--n", "1", "--offset", offset])
    assert stop.value.code == 2 and f"--offset {offset}" in capsys.readouterr().err
