"""The procedural data of the built-in `shapes-sd` model: flat shapes on a plain
background, each image with its exact ground truth, captions in varied
sentence shapes, and the judge that reads the attributes back from pixels.

Used by tools/train_shapes_model.py (training, export, evaluation).  The Rust
evaluation (tests/shapes_model.rs) re-implements `judge` and reads the
held-out captions with their ground truth from tests/data/shapes-eval.json;
the two judges are kept in step by hand (same thresholds, same anchors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIDE = 64  # native size in pixels
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered: smooth edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Centre of each position, as fractions of the side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Radius (half the bounding box side) as a fraction of the side.
SIZES: dict[str, float] = {"small": 0.11, "medium": 0.155, "large": 0.2}
JITTER = 0.03  # of the side, uniform, on each axis

COLOUR_NAMES = list(COLOURS)
POSITION_NAMES = list(POSITIONS)
SIZE_NAMES = list(SIZES)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene as uint8 RGB [SIDE, SIDE, 3]; `rng` draws the jitter."""
    s = SIDE * SUPERSAMPLE
    img = Image.new("RGB", (s, s), COLOURS[scene.background])
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        fx, fy = POSITIONS[o.position]
        cx = (fx + rng.uniform(-JITTER, JITTER)) * s
        cy = (fy + rng.uniform(-JITTER, JITTER)) * s
        r = SIZES[o.size] * s
        c = COLOURS[o.colour]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
        elif o.shape == "square":
            h = r * 0.85
            d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=c)
        else:  # upright triangle filling its 2r x 2r box
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=c)
    return np.asarray(img.resize((SIDE, SIDE), Image.BOX), dtype=np.uint8)


# ---------------------------------------------------------------- captions

POS_PHRASES = {
    "left": ["on the left", "at the left", "to the left", "on the left side", "at the left edge"],
    "right": ["on the right", "at the right", "to the right", "on the right side", "at the right edge"],
    "top": ["at the top", "near the top", "on top", "at the top edge", "in the top part"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom edge", "in the bottom part", "down at the bottom"],
    "center": ["in the center", "in the middle", "at the center", "in the centre", "right in the middle"],
}
POS_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center"}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["", "", "medium"], "large": ["large", "big", "huge"]}
ARTICLE_STARTS = "aeiou"


def _a(word: str) -> str:
    return ("an " if word[:1] in ARTICLE_STARTS else "a ") + word


def _np(o: Obj, rng: np.random.Generator, article: bool = True) -> str:
    """Noun phrase: 'a small red circle' (adjectives in varied order)."""
    size = SIZE_WORDS[o.size][rng.integers(3)]
    form = rng.integers(4)
    if form == 0 and size:
        words = f"{o.colour} {size} {o.shape}" if rng.integers(2) else f"{size} {o.colour} {o.shape}"
    elif form == 1:
        words = f"{size + ' ' if size else ''}{o.shape} in {o.colour}"
    else:
        words = f"{size + ' ' if size else ''}{o.colour} {o.shape}"
    return _a(words) if article else words


def _pos(o: Obj, rng: np.random.Generator) -> str:
    p = POS_PHRASES[o.position]
    return p[rng.integers(len(p))]


def _bg(b: str, rng: np.random.Generator) -> tuple[str, str]:
    """(trailing phrase, leading phrase) for the background."""
    tails = [f"on a {b} background", f"on {b}", f"over a {b} background", f"against {b}",
             f"with a {b} background", f"on a plain {b} background"]
    heads = [f"a {b} background with", f"on a {b} background,", f"{b} background,", f"plain {b} background:",
             f"a {b} canvas with"]
    return tails[rng.integers(len(tails))], heads[rng.integers(len(heads))]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption for `scene`, sentence shape drawn from `rng`."""
    parts = []
    for o in scene.objects:
        form = rng.integers(4)
        if form == 0:
            parts.append(f"{_np(o, rng)} {_pos(o, rng)}")
        elif form == 1:
            parts.append(f"{_pos(o, rng)}, {_np(o, rng)}")
        elif form == 2:
            parts.append(f"{_np(o, rng)} placed {_pos(o, rng)}")
        else:
            parts.append(f"{_np(o, rng)} {_pos(o, rng)}")
    if len(parts) == 1:
        objs = parts[0]
    else:
        objs = ", ".join(parts[:-1]) + (" and " if rng.integers(2) else ", ") + parts[-1]
    tail, head = _bg(scene.background, rng)
    shape = rng.integers(5)
    if shape == 0:
        text = f"{objs} {tail}"
    elif shape == 1:
        text = f"{head} {objs}"
    elif shape == 2:
        text = f"there is {objs}; the background is {scene.background}"
    elif shape == 3:
        text = f"draw {objs} {tail}"
    else:
        text = f"{scene.background} background. {objs}"
    return text


# ---------------------------------------------------------------- scenes

def single_key(scene: Scene) -> tuple:
    o = scene.objects[0]
    return (scene.background, o.colour, o.shape, o.position, o.size)


def random_scene(rng: np.random.Generator, n_objects: int) -> Scene:
    bg = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    positions = rng.permutation(len(POSITION_NAMES))[:n_objects]
    objs = []
    for p in positions:
        colour = bg
        while colour == bg:
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        sizes = SIZE_NAMES if n_objects == 1 else SIZE_NAMES[:2]
        objs.append(Obj(colour, SHAPES[rng.integers(len(SHAPES))], POSITION_NAMES[p], sizes[rng.integers(len(sizes))]))
    return Scene(bg, tuple(objs))


def all_single_keys() -> list[tuple]:
    return [
        (b, c, s, p, z)
        for b in COLOUR_NAMES
        for c in COLOUR_NAMES
        if c != b
        for s in SHAPES
        for p in POSITION_NAMES
        for z in SIZE_NAMES
    ]


def held_out_keys(seed: int, n: int = 200) -> list[tuple]:
    """The single-object scenes never shown in training (evaluation only)."""
    keys = all_single_keys()
    rng = np.random.default_rng([seed, 7])
    idx = rng.choice(len(keys), size=n, replace=False)
    return [keys[i] for i in idx]


def training_scene(rng: np.random.Generator, held: set) -> Scene:
    """A training scene: one object in half of them, two or three otherwise;
    a one-object scene never matches a held-out one."""
    u = rng.random()
    n = 1 if u < 0.5 else (2 if u < 0.8 else 3)
    while True:
        sc = random_scene(rng, n)
        if n > 1 or single_key(sc) not in held:
            return sc


# ---------------------------------------------------------------- judge

ANCHORS = {k: (fx * SIDE, fy * SIDE) for k, (fx, fy) in POSITIONS.items()}
MASK_DISTANCE = 60.0  # RGB distance from the background that counts as object
SQUARE_FILL = 0.89  # fill of the bounding box: square ~0.95, circle ~0.79, triangle ~0.5
TRIANGLE_FILL = 0.65
MIN_PIXELS = 12


def nearest_colour(rgb: np.ndarray) -> str:
    d = {k: float(np.sum((rgb - np.array(v, dtype=np.float64)) ** 2)) for k, v in COLOURS.items()}
    return min(d, key=d.get)


def judge(img: np.ndarray) -> dict:
    """Reads background colour, and the largest object's colour, position and
    shape, from an RGB uint8 [SIDE, SIDE, 3] image."""
    a = img.astype(np.float64)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg_rgb = np.median(border, axis=0)
    out = {"background": nearest_colour(bg_rgb), "colour": None, "position": None, "shape": None}
    mask = np.sqrt(np.sum((a - bg_rgb) ** 2, axis=2)) > MASK_DISTANCE
    comp = largest_component(mask)
    if comp is None or comp.sum() < MIN_PIXELS:
        return out
    ys, xs = np.nonzero(comp)
    out["colour"] = nearest_colour(np.median(a[comp], axis=0))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    out["position"] = min(ANCHORS, key=lambda k: (ANCHORS[k][0] - cx) ** 2 + (ANCHORS[k][1] - cy) ** 2)
    fill = comp.sum() / ((x1 - x0) * (y1 - y0))
    out["shape"] = "square" if fill > SQUARE_FILL else ("circle" if fill > TRIANGLE_FILL else "triangle")
    out["fill"] = float(fill)
    return out


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected component of `mask` (scan order ties: first)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best, best_n = None, 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                stack, pix = [(y, x)], []
                seen[y, x] = True
                while stack:
                    py, px = stack.pop()
                    pix.append((py, px))
                    for qy, qx in ((py - 1, px), (py + 1, px), (py, px - 1), (py, px + 1)):
                        if 0 <= qy < h and 0 <= qx < w and mask[qy, qx] and not seen[qy, qx]:
                            seen[qy, qx] = True
                            stack.append((qy, qx))
                if len(pix) > best_n:
                    best_n = len(pix)
                    best = np.zeros_like(mask)
                    for py, px in pix:
                        best[py, px] = True
    return best


def score(results: list[tuple[dict, tuple]]) -> dict[str, float]:
    """Fraction right per attribute; `results` pairs judge output with the key
    (background, colour, shape, position, size)."""
    n = len(results)
    right = {"background": 0, "colour": 0, "position": 0, "shape": 0}
    for j, (b, c, s, p, _z) in results:
        right["background"] += j["background"] == b
        right["colour"] += j["colour"] == c
        right["position"] += j["position"] == p
        right["shape"] += j["shape"] == s
    return {k: v / n for k, v in right.items()}


def _self_check() -> None:
    """The judge reads every held-out scene right from the renderer's pixels."""
    rng = np.random.default_rng(0)
    keys = all_single_keys()
    res = []
    for k in keys:
        b, c, s, p, z = k
        img = render(Scene(b, (Obj(c, s, p, z),)), rng)
        res.append((judge(img), k))
    sc = score(res)
    print("judge on rendered ground truth:", sc)
    fails = [(j, k) for j, k in res if (j["shape"], j["colour"], j["position"], j["background"]) != (k[2], k[1], k[3], k[0])]
    for j, k in fails[:10]:
        print("  miss", k, j)
    assert all(v == 1.0 for v in sc.values()), sc


if __name__ == "__main__":
    _self_check()
    rng = np.random.default_rng(1)
    for _ in range(12):
        print(caption(training_scene(rng, set()), rng))
