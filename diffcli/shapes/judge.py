"""Read a shapes image from its pixels alone: background, and each object's colour, shape, size and position."""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from diffcli.shapes import world

PALETTE = np.array(list(world.COLOURS.values()), dtype=np.float32)
MIN_AREA = 60  # px; the smallest object (a small star) covers about 200
LARGE_SIDE = 31.0  # px of the bounding box's longer side between small (<= 24) and large (>= 37)
TEMPLATE = 24  # side of the normalised masks compared with the shape templates


def _normalise(mask: np.ndarray) -> torch.Tensor:
    """Crop a mask to its bounding box and resample it to TEMPLATE x TEMPLATE."""
    ys, xs = np.nonzero(mask)
    crop = torch.from_numpy(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32))
    return F.interpolate(crop[None, None], size=(TEMPLATE, TEMPLATE), mode="area")[0, 0]


@lru_cache(maxsize=1)
def templates() -> torch.Tensor:
    """Each shape rendered large and normalised, one row per entry of world.SHAPES."""
    scenes = [world.Scene(7, [world.Obj(k, 6, 1, 64.0, 64.0)]) for k in range(len(world.SHAPES))]
    t = world.to_tensors(scenes)
    t["x"], t["y"] = t["x"] * 2 - 64, t["y"] * 2 - 64  # same centre, drawn at twice the scale
    img = world.render(t, size=2 * world.SIZE)[:, 0].numpy()
    return torch.stack([_normalise(m > 0.5) for m in img])


def analyze(image) -> dict:
    """Background name and a list of objects (colour, shape, size, position, x, y, area) sorted by area."""
    px = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = px.shape
    dist = ((px[:, :, None, :] - PALETTE) ** 2).sum(-1)
    label = dist.argmin(-1)
    border = np.concatenate([label[:2].ravel(), label[-2:].ravel(), label[:, :2].ravel(), label[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(PALETTE)).argmax())
    far = np.sqrt(((px - PALETTE[bg]) ** 2).sum(-1)) > 60
    comps, n = ndimage.label(far)
    objects = []
    for k in range(1, n + 1):
        region = comps == k
        if region.sum() < MIN_AREA:
            continue
        labels = label[region]
        colour = int(np.bincount(labels[labels != bg], minlength=len(PALETTE)).argmax()) \
            if (labels != bg).any() else bg
        step = PALETTE[colour] - PALETTE[bg]
        alpha = ((px - PALETTE[bg]) @ step) / (step @ step)
        mask = ndimage.binary_dilation(region, iterations=2) & (alpha > 0.5)
        if mask.sum() < MIN_AREA:
            continue
        ys, xs = np.nonzero(mask)
        side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * world.SIZE / w
        x, y = xs.mean() * world.SIZE / w + 0.5, ys.mean() * world.SIZE / h + 0.5
        norm = _normalise(mask)
        tpl = templates()
        iou = torch.minimum(tpl, norm).sum((1, 2)) / torch.maximum(tpl, norm).sum((1, 2))
        pos = min(world.POSITIONS, key=lambda p: (world.POSITIONS[p][0] - x) ** 2 + (world.POSITIONS[p][1] - y) ** 2)
        objects.append({"colour": world.COLOUR_NAMES[colour], "shape": world.SHAPES[int(iou.argmax())],
                        "size": "large" if side > LARGE_SIDE else "small", "position": pos,
                        "x": float(x), "y": float(y), "area": int(mask.sum())})
    objects.sort(key=lambda o: -o["area"])
    return {"background": world.COLOUR_NAMES[bg], "objects": objects}


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def relation_holds(a: dict, b: dict, relation: str) -> bool:
    """Whether object a stands in `relation` to object b, judged from centroids (dominant axis)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    return {"left of": dx > abs(dy), "right of": -dx > abs(dy), "above": dy > abs(dx), "below": -dy > abs(dx)}[relation]


def truth(scene: world.Scene) -> dict:
    """What the caption of a scene asks for, in the judge's vocabulary (unsaid attributes left out)."""
    said = scene.said
    objs = []
    for k, o in enumerate(scene.objects):
        want = {"colour": world.COLOUR_NAMES[o.colour], "shape": world.SHAPES[o.shape], "size": world.SIZES[o.size]}
        objs.append({a: v for a, v in want.items() if said.get(f"{a}{k}", True)})
    out = {"objects": objs}
    if said.get("background", True):
        out["background"] = world.COLOUR_NAMES[scene.background]
    if len(objs) == 1 and said.get("position", True):
        out["position"] = world.POSITION_NAMES[scene.position]
    if len(objs) == 2 and said.get("relation", True):
        out["relation"] = world.RELATIONS[scene.relation]
    return out


def score(found: dict, want: dict) -> dict:
    """Per-attribute correctness (booleans) of one analysed image against what was asked, and `exact`."""
    objs = found["objects"]
    res = {"count": len(objs) == len(want["objects"])}
    if "background" in want:
        res["background"] = found["background"] == want["background"]
    if len(want["objects"]) == 1:
        o = objs[0] if objs else {}
        for a, v in want["objects"][0].items():
            res[a] = o.get(a) == v
        if "position" in want:
            res["position"] = o.get("position") == want["position"]
    else:
        a, b = want["objects"]
        match = lambda o, t: all(o.get(k) == v for k, v in t.items())  # noqa: E731
        pairs = [(p, q) for p in objs for q in objs if p is not q and match(p, a) and match(q, b)]
        res["colours"] = sorted(o["colour"] for o in objs) == sorted(t.get("colour", "?") for t in (a, b)) \
            if all("colour" in t for t in (a, b)) else True
        res["objects"] = bool(pairs)
        if "relation" in want:
            res["relation"] = any(relation_holds(p, q, want["relation"]) for p, q in pairs)
    res["exact"] = all(res.values())
    if "relation" in want and len(want["objects"]) == 2:  # diagnostic, implied by relation: the axis, order aside
        either = (want["relation"], OPPOSITE[want["relation"]])
        res["relation_axis"] = any(relation_holds(p, q, r) for p, q in pairs for r in either)
    return res
