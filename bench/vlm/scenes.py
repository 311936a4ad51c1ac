"""Deterministic synthetic scenes and single-word questions for the small VLM.

Every sample is a pure function of an integer seed: a 192x192 RGB image (24x24 patches of 8 px),
2-6 objects (circle/square/triangle, 6 colours, 3 sizes, each object wholly inside one quadrant,
exactly one small object of 16 px = 2x2 patches), a question of one of five kinds and its answer word,
and per-patch labels for dense supervision of the vision tower.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 192
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 24 -> 576 visual tokens

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIZES = {"small": 16, "medium": 28, "large": 40}
SIZE_NAMES = list(SIZES)
QUADRANTS = ["topleft", "topright", "bottomleft", "bottomright"]
KINDS = ["color", "count", "exists", "quadrant", "small"]
N_CLASSES = 1 + len(COLOR_NAMES) * len(SHAPES)  # 0 = background, 1 + colour*3 + shape

# Held-out splits are disjoint seed ranges.
SPLITS = {
    "train": (0, 1_000_000_000),
    "val": (1_000_000_000, 1_001_000_000),
    "test": (2_000_000_000, 2_001_000_000),
}


@dataclass(frozen=True)
class Obj:
    """One object: colour and shape names, size name, top-left corner (x, y) in px, quadrant index."""
    color: str
    shape: str
    size: str
    x: int
    y: int

    @property
    def px(self) -> int:
        return SIZES[self.size]

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.px / 2, self.y + self.px / 2)

    @property
    def quadrant(self) -> int:
        cx, cy = self.center
        return int(cy >= IMAGE_SIZE / 2) * 2 + int(cx >= IMAGE_SIZE / 2)


@dataclass
class Scene:
    """Objects plus background parameters (grey level, noise seed, noise std)."""
    objects: list[Obj]
    bg_level: int = 120
    noise_seed: int = 0
    noise_std: float = 4.0


@dataclass
class Sample:
    """image: PIL RGB 192x192; labels: int64 (4, 24, 24) = class, quadrant, size, anchor (-1 = ignore)."""
    seed: int
    image: Image.Image
    question: str
    answer: str
    kind: str
    labels: np.ndarray
    scene: Scene = field(repr=False)


# ---------------------------------------------------------------- scenes

def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int], gap: int = 4) -> bool:
    """a, b: (x, y, size) boxes; True if they are closer than gap px."""
    ax, ay, asz = a
    bx, by, bsz = b
    return not (ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay)


def random_scene(rng: np.random.Generator) -> Scene:
    """2-6 objects, distinct (colour, shape) pairs, exactly one small, each inside one quadrant."""
    while True:
        n = int(rng.integers(2, 7))
        pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
        idx = rng.choice(len(pairs), size=n, replace=False)
        sizes = ["small"] + [SIZE_NAMES[1 + int(rng.integers(0, 2))] for _ in range(n - 1)]
        order = rng.permutation(n)
        objs: list[Obj] = []
        boxes: list[tuple[int, int, int]] = []
        ok = True
        for k in order:
            color, shape = pairs[idx[k]]
            size = sizes[k]
            px = SIZES[size]
            for _ in range(60):
                q = int(rng.integers(0, 4))
                qx, qy = (q % 2) * IMAGE_SIZE // 2, (q // 2) * IMAGE_SIZE // 2
                x = qx + 2 + int(rng.integers(0, IMAGE_SIZE // 2 - px - 3))
                y = qy + 2 + int(rng.integers(0, IMAGE_SIZE // 2 - px - 3))
                if not any(_overlaps((x, y, px), b) for b in boxes):
                    break
            else:
                ok = False
                break
            boxes.append((x, y, px))
            objs.append(Obj(color, shape, size, x, y))
        if ok:
            return Scene(objs, bg_level=int(rng.integers(95, 150)), noise_seed=int(rng.integers(0, 2**31)),
                         noise_std=float(rng.uniform(0.0, 8.0)))


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x, y, p = o.x, o.y, o.px
    if o.shape == "circle":
        draw.ellipse([x, y, x + p - 1, y + p - 1], fill=fill)
    elif o.shape == "square":
        draw.rectangle([x, y, x + p - 1, y + p - 1], fill=fill)
    else:
        draw.polygon([(x + (p - 1) / 2, y), (x, y + p - 1), (x + p - 1, y + p - 1)], fill=fill)


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """Returns (PIL RGB image 192x192, object-id mask uint8 (192, 192), 0 = background, i+1 = object i)."""
    rng = np.random.default_rng(scene.noise_seed)
    bg = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.bg_level, np.float32)
    bg += rng.normal(0.0, scene.noise_std, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d_img, d_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[o.color], jitter))
        _draw_shape(d_img, o, fill)
        _draw_shape(d_mask, o, i + 1)
    return img, np.asarray(mask)


def patch_labels(scene: Scene, mask: np.ndarray) -> np.ndarray:
    """mask (192, 192) -> int64 (4, 24, 24): class (0 bg, 1+colour*3+shape), quadrant, size, anchor.

    A patch belongs to the object covering most of its pixels if that is >= 16 of 64 pixels.
    Quadrant and size are -1 on background; anchor is 1 on the patch holding an object's centre.
    """
    n = len(scene.objects)
    blocks = mask.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID, GRID, PATCH * PATCH)
    counts = np.stack([(blocks == i + 1).sum(-1) for i in range(n)], 0)  # (n, 24, 24)
    best = counts.argmax(0)
    owned = counts.max(0) >= 16
    out = np.full((4, GRID, GRID), -1, np.int64)
    out[0] = 0
    out[3] = 0
    for i, o in enumerate(scene.objects):
        sel = owned & (best == i)
        out[0][sel] = 1 + COLOR_NAMES.index(o.color) * len(SHAPES) + SHAPES.index(o.shape)
        out[1][sel] = o.quadrant
        out[2][sel] = SIZE_NAMES.index(o.size)
        cx, cy = o.center
        out[3][int(cy) // PATCH, int(cx) // PATCH] = 1
    return out


# ---------------------------------------------------------------- questions

def ask(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of the given kind for the scene, or None if the kind cannot be asked."""
    objs = scene.objects
    colors = [o.color for o in objs]
    shapes = [o.shape for o in objs]
    if kind == "color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        s = unique[int(rng.integers(0, len(unique)))]
        return f"what color is the {s} ?", colors[shapes.index(s)]
    if kind == "count":
        if rng.random() < 0.5:
            c = COLOR_NAMES[int(rng.integers(0, len(COLOR_NAMES)))] if rng.random() < 0.2 else colors[int(rng.integers(0, len(objs)))]
            return f"how many {c} objects ?", str(colors.count(c))
        s = SHAPES[int(rng.integers(0, 3))] if rng.random() < 0.2 else shapes[int(rng.integers(0, len(objs)))]
        return f"how many {PLURAL[s]} ?", str(shapes.count(s))
    if kind == "exists":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            o = objs[int(rng.integers(0, len(objs)))]
            return f"is there a {o.color} {o.shape} ?", "yes"
        adversarial = [(c, s) for c in set(colors) for s in set(shapes) if (c, s) not in present]
        if adversarial and rng.random() < 0.5:
            c, s = sorted(adversarial)[int(rng.integers(0, len(adversarial)))]
        else:
            absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
            c, s = absent[int(rng.integers(0, len(absent)))]
        return f"is there a {c} {s} ?", "no"
    if kind == "quadrant":
        o = objs[int(rng.integers(0, len(objs)))]
        return f"where is the {o.color} {o.shape} ?", QUADRANTS[o.quadrant]
    if kind == "small":
        o = next(o for o in objs if o.size == "small")
        if rng.random() < 0.5:
            return "what color is the smallest object ?", o.color
        return "what shape is the smallest object ?", o.shape
    raise ValueError(kind)


def make_sample(seed: int, kind: str | None = None) -> Sample:
    """The sample for a seed; kind defaults to KINDS[seed % 5] so every split is balanced by kind."""
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[seed % len(KINDS)]
    while True:
        scene = random_scene(rng)
        qa = ask(scene, kind, rng)
        if qa is not None:
            break
    img, mask = render(scene)
    return Sample(seed, img, qa[0], qa[1], kind, patch_labels(scene, mask), scene)


def split_seed(split: str, index: int) -> int:
    """The seed of the index-th sample of a split."""
    lo, hi = SPLITS[split]
    assert 0 <= index < hi - lo
    return lo + index


def split_samples(split: str, n: int, start: int = 0) -> list[Sample]:
    """The first n samples (from start) of a split."""
    return [make_sample(split_seed(split, start + i)) for i in range(n)]


def training_item(seed: int, n_questions: int = 4) -> tuple[Image.Image, list[tuple[str, str, str]], np.ndarray]:
    """A training scene with several questions: (image, [(question, answer, kind)], labels (4, 24, 24))."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    qas = []
    for _ in range(50):
        if len(qas) == n_questions:
            break
        kind = KINDS[int(rng.integers(0, len(KINDS)))]
        qa = ask(scene, kind, rng)
        if qa is not None and all(qa[0] != q for q, _, _ in qas):
            qas.append((qa[0], qa[1], kind))
    img, mask = render(scene)
    return img, qas, patch_labels(scene, mask)


def vocabulary() -> list[str]:
    """Every word a question or an answer can use (sorted, deterministic)."""
    words = {"what", "color", "is", "the", "how", "many", "objects", "is", "there", "a", "where", "?",
             "smallest", "object", "shape", "yes", "no"}
    words |= set(COLOR_NAMES) | set(SHAPES) | set(PLURAL.values()) | set(QUADRANTS)
    words |= {str(i) for i in range(7)}
    return sorted(words)
