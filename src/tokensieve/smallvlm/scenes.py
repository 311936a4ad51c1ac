"""Deterministic synthetic scenes and single-word questions for the small VLM.

Every sample is a pure function of an integer seed: a 192x192 RGB image (24x24 patches of 8 px),
2-6 objects (circle/square/triangle, 6 colours, 3 sizes, each object wholly inside one quadrant,
exactly one small object of 12 px, 1.5 patches wide), a question of one of five kinds, its answer word and
the objects that answer it, and per-patch labels for dense supervision of the vision tower.
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
SIZES = {"small": 12, "medium": 18, "large": 24}
SIZE_NAMES = list(SIZES)
QUADRANTS = ["topleft", "topright", "bottomleft", "bottomright"]
KINDS = ["color", "count", "exists", "quadrant", "small"]
LABELS = ["color", "shape", "quadrant", "size", "anchor", "owner"]  # rows of patch_labels

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


@dataclass(frozen=True)
class Question:
    """A question, its one-word answer, its kind, and the evidence: the objects whose tokens answer it.

    For counting the evidence is each matching object's centre patch (`anchors` True); for a 'no'
    or a zero count it is empty.
    """
    text: str
    answer: str
    kind: str
    evidence: tuple[int, ...] = ()
    anchors: bool = False


@dataclass
class Sample:
    """image: PIL RGB 192x192; labels: int64 (6, 24, 24), rows named by LABELS (-1 = ignore)."""
    seed: int
    image: Image.Image
    question: str
    answer: str
    kind: str
    labels: np.ndarray
    scene: Scene = field(repr=False)
    evidence: tuple[int, ...] = ()
    anchors: bool = False


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
    """mask (192, 192) -> int64 (6, 24, 24): colour, shape, quadrant, size, anchor, owner.

    A patch belongs to the object covering most of its pixels if that is >= 16 of 64 pixels.
    colour is 0 on background else 1 + colour index, shape likewise; quadrant and size are -1 on
    background; anchor is 1 on the patch holding an object's centre; owner is the object index or -1.
    """
    n = len(scene.objects)
    blocks = mask.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID, GRID, PATCH * PATCH)
    counts = np.stack([(blocks == i + 1).sum(-1) for i in range(n)], 0)  # (n, 24, 24)
    best = counts.argmax(0)
    owned = counts.max(0) >= 16
    out = np.full((len(LABELS), GRID, GRID), -1, np.int64)
    out[[0, 1, 4]] = 0
    for i, o in enumerate(scene.objects):
        sel = owned & (best == i)
        out[0][sel] = 1 + COLOR_NAMES.index(o.color)
        out[1][sel] = 1 + SHAPES.index(o.shape)
        out[2][sel] = o.quadrant
        out[3][sel] = SIZE_NAMES.index(o.size)
        out[5][sel] = i
        out[4].reshape(-1)[centre_patch(o)] = 1
    return out


def centre_patch(o: Obj) -> int:
    """Flat index (into the 576 patches) of the patch holding the object's centre."""
    cx, cy = o.center
    return int(cy) // PATCH * GRID + int(cx) // PATCH


def evidence_patches(scene: Scene, labels: np.ndarray, question: Question) -> np.ndarray:
    """Flat patch indices of the question's evidence: its objects' patches, or their centres for counts."""
    if question.anchors:
        return np.array(sorted(centre_patch(scene.objects[i]) for i in question.evidence), np.int64)
    return np.flatnonzero(np.isin(labels[5].reshape(-1), question.evidence))


# ---------------------------------------------------------------- questions

def ask(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    """One question of the given kind for the scene, or None if the kind cannot be asked."""
    objs = scene.objects
    colors = [o.color for o in objs]
    shapes = [o.shape for o in objs]
    if kind == "color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        s = unique[int(rng.integers(0, len(unique)))]
        i = shapes.index(s)
        return Question(f"what color is the {s} ?", colors[i], kind, (i,))
    if kind == "count":
        if rng.random() < 0.5:
            c = COLOR_NAMES[int(rng.integers(0, len(COLOR_NAMES)))] if rng.random() < 0.2 else colors[int(rng.integers(0, len(objs)))]
            match = tuple(i for i, x in enumerate(colors) if x == c)
            return Question(f"how many {c} objects ?", str(len(match)), kind, match, anchors=True)
        s = SHAPES[int(rng.integers(0, 3))] if rng.random() < 0.2 else shapes[int(rng.integers(0, len(objs)))]
        match = tuple(i for i, x in enumerate(shapes) if x == s)
        return Question(f"how many {PLURAL[s]} ?", str(len(match)), kind, match, anchors=True)
    if kind == "exists":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            i = int(rng.integers(0, len(objs)))
            return Question(f"is there a {colors[i]} {shapes[i]} ?", "yes", kind, (i,))
        adversarial = [(c, s) for c in set(colors) for s in set(shapes) if (c, s) not in present]
        if adversarial and rng.random() < 0.5:
            c, s = sorted(adversarial)[int(rng.integers(0, len(adversarial)))]
        else:
            absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
            c, s = absent[int(rng.integers(0, len(absent)))]
        return Question(f"is there a {c} {s} ?", "no", kind)
    if kind == "quadrant":
        i = int(rng.integers(0, len(objs)))
        return Question(f"where is the {colors[i]} {shapes[i]} ?", QUADRANTS[objs[i].quadrant], kind, (i,))
    if kind == "small":
        i = next(i for i, o in enumerate(objs) if o.size == "small")
        if rng.random() < 0.5:
            return Question("what color is the smallest object ?", colors[i], kind, (i,))
        return Question("what shape is the smallest object ?", shapes[i], kind, (i,))
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def make_sample(seed: int, kind: str | None = None) -> Sample:
    """The sample for a seed; kind defaults to KINDS[seed % 5] so every split is balanced by kind."""
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[seed % len(KINDS)]
    while True:
        scene = random_scene(rng)
        q = ask(scene, kind, rng)
        if q is not None:
            break
    img, mask = render(scene)
    return Sample(seed, img, q.text, q.answer, kind, patch_labels(scene, mask), scene, q.evidence, q.anchors)


def split_seed(split: str, index: int) -> int:
    """The seed of the index-th sample of a split."""
    lo, hi = SPLITS[split]
    assert 0 <= index < hi - lo
    return lo + index


def split_samples(split: str, n: int, start: int = 0) -> list[Sample]:
    """The first n samples (from start) of a split."""
    return [make_sample(split_seed(split, start + i)) for i in range(n)]


def training_item(seed: int, n_questions: int = 4, kind_weights: dict[str, float] | None = None
                  ) -> tuple[Image.Image, list[Question], np.ndarray, Scene]:
    """A training scene with several distinct questions: (image, questions, labels (6, 24, 24), scene).

    Question kinds are drawn uniformly, or in proportion to `kind_weights` (kind -> weight, missing
    kinds weigh 0).
    """
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    questions: list[Question] = []
    for _ in range(50):
        if len(questions) == n_questions:
            break
        q = ask(scene, draw_kind(rng, kind_weights), rng)
        if q is not None and all(q.text != p.text for p in questions):
            questions.append(q)
    img, mask = render(scene)
    return img, questions, patch_labels(scene, mask), scene


def draw_kind(rng: np.random.Generator, kind_weights: dict[str, float] | None) -> str:
    """One question kind: uniform over KINDS, or in proportion to kind_weights."""
    if kind_weights is None:
        return KINDS[int(rng.integers(0, len(KINDS)))]
    unknown = set(kind_weights) - set(KINDS)
    if unknown or sum(kind_weights.values()) <= 0:
        raise ValueError(f"kind weights {kind_weights} must name kinds among {KINDS} with a positive total")
    weights = np.array([kind_weights.get(k, 0.0) for k in KINDS], np.float64)
    return KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]


def vocabulary() -> list[str]:
    """Every word a question or an answer can use (sorted, deterministic)."""
    words = {"what", "color", "is", "the", "how", "many", "objects", "is", "there", "a", "where", "?",
             "smallest", "object", "shape", "yes", "no"}
    words |= set(COLOR_NAMES) | set(SHAPES) | set(PLURAL.values()) | set(QUADRANTS)
    words |= {str(i) for i in range(7)}
    return sorted(words)
