"""The shapes world: scenes, captions from a small grammar, and a vectorised anti-aliased renderer."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field


SIZE = 128  # rendered image side in pixels
COLOURS = {  # distinct hues, RGB 0-255
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 225), "yellow": (245, 220, 30),
    "purple": (135, 40, 175), "orange": (245, 135, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "star", "cross"]
SIZES = ["small", "large"]
RADIUS = (12.0, 22.0)  # half extent in px per size: two large objects still leave a 20 px gap
POSITIONS = {"left": (32, 64), "right": (96, 64), "top": (64, 32), "bottom": (64, 96), "center": (64, 64)}
POSITION_NAMES = list(POSITIONS)
RELATIONS = ["left of", "right of", "above", "below"]
JITTER = 4.0  # px of random offset around an anchor

SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
POSITION_WORDS = {
    "left": ["on the left", "at the left", "to the left"], "right": ["on the right", "at the right", "to the right"],
    "top": ["at the top", "on top"], "bottom": ["at the bottom", "on the bottom"],
    "center": ["in the center", "in the middle"],
}
RELATION_WORDS = {
    "left of": ["to the left of", "left of"], "right of": ["to the right of", "right of"],
    "above": ["above", "over"], "below": ["below", "under"],
}
BACKGROUND_WORDS = ["on a {} background", "on {}", "with a {} background", "on a {} backdrop"]


@dataclass
class Obj:
    """One object: indices into SHAPES, COLOUR_NAMES, SIZES and its centre in pixels."""

    shape: int
    colour: int
    size: int
    x: float
    y: float


@dataclass
class Scene:
    """A background colour, one or two objects, the relation of a two-object scene and what the caption names."""

    background: int
    objects: list
    relation: int = -1
    position: int = -1
    said: dict = field(default_factory=dict)


def heldout(key) -> bool:
    """Whether a fully specified attribute tuple is kept out of training (one in ten, stable hash)."""
    return zlib.crc32(repr(key).encode()) % 10 == 0


def _jit(rng):
    """Uniform jitter in [-JITTER, JITTER] px."""
    return rng.uniform(-JITTER, JITTER)


def sample_scene(rng: random.Random, two: bool) -> Scene:
    """Draw a random scene; object colours differ from the background and from each other."""
    bg = rng.randrange(len(COLOURS))
    colours = rng.sample([c for c in range(len(COLOURS)) if c != bg], 2)
    if not two:
        pos = rng.randrange(len(POSITIONS))
        ax, ay = POSITIONS[POSITION_NAMES[pos]]
        obj = Obj(rng.randrange(len(SHAPES)), colours[0], rng.randrange(2), ax + _jit(rng), ay + _jit(rng))
        return Scene(bg, [obj], position=pos)
    rel = rng.randrange(len(RELATIONS))
    first, second = (32.0, 96.0) if rel in (0, 2) else (96.0, 32.0)
    objs = []
    for k, (c, a) in enumerate(zip(colours, (first, second))):
        x, y = (a, 64.0 + 2 * _jit(rng)) if rel < 2 else (64.0 + 2 * _jit(rng), a)
        objs.append(Obj(rng.randrange(len(SHAPES)), c, rng.randrange(2), x + _jit(rng), y + _jit(rng)))
    return Scene(bg, objs, relation=rel)


def _phrase(rng, o: Obj, said: dict, k: int) -> str:
    """Noun phrase for object k, naming only what `said` allows."""
    words = [rng.choice(["a", "a", "one"])] if rng.random() < 0.7 else []
    if said[f"size{k}"]:
        words.append(rng.choice(SIZE_WORDS[SIZES[o.size]]))
    if said[f"colour{k}"]:
        words.append(COLOUR_NAMES[o.colour])
    words.append(SHAPES[o.shape] if said[f"shape{k}"] else rng.choice(["shape", "object"]))
    return " ".join(words)


def caption(rng: random.Random, s: Scene, full: bool = False, train: bool = True, drop=()) -> str:
    """Caption a scene, leaving attributes out at random (or all but `drop` when `full`); fills `s.said`."""
    p = (lambda q: True) if full else (lambda q: rng.random() < q)
    said = {"background": p(0.6)}
    for k, o in enumerate(s.objects):
        said.update({f"colour{k}": p(0.9), f"shape{k}": p(0.9), f"size{k}": p(0.5 if len(s.objects) == 1 else 0.35)})
    if len(s.objects) == 1:
        said["position"] = p(0.6)
        o = s.objects[0]
        key = (o.colour, o.shape, o.size, s.position, s.background)
        if train and all(said.values()) and heldout(key):
            said[rng.choice(["position", "size0", "background"])] = False
    else:
        said["relation"] = p(0.9)
        a, b = s.objects
        key = (a.colour, a.shape, s.relation, b.colour, b.shape, s.background)
        if train and all(said[k] for k in ("colour0", "shape0", "colour1", "shape1", "relation", "background")) \
                and heldout(key):
            said[rng.choice(["relation", "background", "shape1"])] = False
    said.update({k: False for k in drop})
    s.said = said
    text = _phrase(rng, s.objects[0], said, 0)
    if len(s.objects) == 1 and said["position"]:
        text += " " + rng.choice(POSITION_WORDS[POSITION_NAMES[s.position]])
    if len(s.objects) == 2:
        joint = rng.choice(RELATION_WORDS[RELATIONS[s.relation]]) if said["relation"] else "and"
        text += f" {joint} {_phrase(rng, s.objects[1], said, 1)}"
    if said["background"]:
        text += " " + rng.choice(BACKGROUND_WORDS).format(COLOUR_NAMES[s.background])
    return text


def vocabulary() -> list:
    """Every word the grammar can produce."""
    words = {"a", "one", "and", "shape", "object", *COLOUR_NAMES, *SHAPES}
    for group in (SIZE_WORDS, POSITION_WORDS, RELATION_WORDS):
        words.update(w for v in group.values() for phrase in v for w in phrase.split())
    words.update(w for t in BACKGROUND_WORDS for w in t.replace("{}", "").split())
    return sorted(words)


def to_tensors(scenes: list, device="cpu") -> dict:
    """Pack scenes into tensors for `render`: shape/colour/size/x/y/present per object slot, background."""
    import torch  # here, not at the top: the vocabulary (plan time, --dry-run) needs no torch
    none = Obj(0, 0, 0, 0.0, 0.0)
    slots = [(s.objects + [none])[:2] for s in scenes]
    t = {k: torch.tensor([[getattr(o, k) for o in pair] for pair in slots]) for k in ("shape", "colour", "size")}
    t.update({k: torch.tensor([[float(getattr(o, k)) for o in pair] for pair in slots]) for k in ("x", "y")})
    t["present"] = torch.tensor([[1, len(s.objects) > 1] for s in scenes], dtype=torch.long)
    t["background"] = torch.tensor([s.background for s in scenes])
    return {k: v.to(device) for k, v in t.items()}


def _box(px, py, bx, by):
    """Signed distance to an axis-aligned box (Inigo Quilez)."""
    import torch
    dx, dy = px.abs() - bx, py.abs() - by
    return torch.hypot(dx.clamp(min=0), dy.clamp(min=0)) + torch.maximum(dx, dy).clamp(max=0)


def _triangle(px, py, r):
    """Signed distance to an upward equilateral triangle of half side r, y up (Inigo Quilez)."""
    import torch
    k = 3 ** 0.5
    x, y = px.abs() - r, py + r / k
    flip = x + k * y > 0
    x, y = torch.where(flip, (x - k * y) / 2, x), torch.where(flip, (-k * x - y) / 2, y)
    x = x - torch.maximum(torch.minimum(x, torch.zeros_like(x)), -2 * r)
    return -torch.hypot(x, y) * torch.sign(y)


def _star(px, py, r, rf=0.5):
    """Signed distance to an upward five-pointed star of outer radius r, y up (Inigo Quilez sdStar5)."""
    import torch
    k1x, k1y = 0.809016994375, -0.587785252292
    x, y = px.abs(), py
    for kx, ky in ((k1x, k1y), (-k1x, k1y)):
        d = 2 * (kx * x + ky * y).clamp(min=0)
        x, y = x - d * kx, y - d * ky
    x, y = x.abs(), y - r
    bax, bay = -rf * k1y, rf * k1x - 1
    h = torch.minimum(((x * bax + y * bay) / (bax * bax + bay * bay)).clamp(min=0), r)
    return torch.hypot(x - bax * h, y - bay * h) * torch.sign(y * bax - x * bay)


def shape_sdf(shape, px, py, r):
    """Signed distance (px) of each pixel to the shape; px, py relative to the centre, image y down."""
    import torch
    up = -py
    sdfs = torch.stack([
        torch.hypot(px, py) - r,
        _box(px, py, 0.85 * r, 0.85 * r),
        _triangle(px, up, r),
        _star(px, up, r),
        torch.minimum(_box(px, py, r, 0.3 * r), _box(px, py, 0.3 * r, r)),
    ])
    return sdfs.gather(0, shape[None].expand_as(sdfs[:1]))[0]


def render(t: dict, size: int = SIZE) -> torch.Tensor:
    """Render packed scenes to (N, 3, size, size) floats in [0, 1], anti-aliased over one pixel."""
    import torch
    dev = t["background"].device
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=dev) / 255
    scale = size / SIZE
    grid = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / scale
    yy, xx = grid[None, :, None], grid[None, None, :]
    img = palette[t["background"]][:, :, None, None].expand(-1, -1, size, size)
    for k in range(2):
        r = torch.tensor(RADIUS, device=dev)[t["size"][:, k]][:, None, None]
        d = shape_sdf(t["shape"][:, k][:, None, None].expand(-1, size, size),
                      xx - t["x"][:, k, None, None], yy - t["y"][:, k, None, None], r.expand(-1, size, size))
        alpha = ((0.5 - d * scale).clamp(0, 1) * t["present"][:, k, None, None])[:, None]
        img = img * (1 - alpha) + palette[t["colour"][:, k]][:, :, None, None] * alpha
    return img
