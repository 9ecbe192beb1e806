"""A procedurally rendered image-text corpus for stage-2 (vision) training: offline, seeded, cheap.

GPT-4's vision side was trained after text-only pre-training (SPEC section 5); moekit's stage 2 needs
pictures with text about them that a tiny model can learn in minutes on a CPU, so it draws its own:
a plain background, a 2 x 2 grid of cells, 1-3 coloured shapes in distinct cells, and sometimes a
digit in a free cell. Every example has a caption and question/answer pairs with a small, regular
grammar, and each answer comes with the list of answers of its kind (multiple-choice scoring):

    cfg = SceneConfig(image_size=32, seed=0)
    ex = make_examples("train", 1000, cfg)[0]
    ex.caption   # 'a red circle at the top left and the digit seven at the bottom right.'
    ex.qa[0]     # QA('what colour is the circle?', 'red', 'colour', ('red', 'green', ...))
    example_text(ex)      # '<image>a red circle at ... Q: what colour is the circle? A: red.'
    mc_items("heldout", 200, cfg)   # (image, '<image>Q: what colour is the triangle? A:', 'blue', choices)

Compositional generalization is measured on a held-out set of (colour, shape) pairs (`HELDOUT`): no
object of the `train` or `val` split has one; every `heldout` scene has exactly one such object and
asks only about it. Each seen shape and colour still appears in training with other partners.

Determinism: example i of a split comes from numpy's PCG64 seeded with (seed, split, i), a stream
numpy keeps stable across versions and platforms, and the shapes are rasterized here with plain
float comparisons (no anti-aliasing, no font files, no Pillow drawing code whose output may change
between versions): the pixels are the same on every machine. Pillow only encodes the PNG bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from functools import cache

import numpy as np

SCENES_VERSION = "scenes-v1"  # bump when rendering or grammar changes (golden hashes in tests/test_scenes.py)
IMAGE = "<image>"  # the marker token's text (the tokenizer's special token)
SPLITS = ("train", "val", "heldout")

# Six colours far apart in RGB (nearest pair, blue-purple, ~115 apart) and none close to the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 60, 235),
    "yellow": (235, 215, 25), "white": (240, 240, 240), "purple": (150, 50, 210),
}
BACKGROUND = (0, 0, 0)
DIGIT_COLOUR = (140, 140, 140)  # grey: not one of COLOURS, so a digit is never mistaken for a shape
SHAPES = ("circle", "square", "triangle", "cross", "bar")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cells of the 2 x 2 grid, row-major
NUMBERS = ("zero", "one", "two", "three")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELDOUT = (("blue", "triangle"), ("red", "square"), ("green", "circle"), ("yellow", "cross"))

# 3 x 5 digit glyphs (rows top to bottom), scaled up by an integer factor: no font file, identical everywhere.
GLYPHS = {d: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool) for d, rows in enumerate([
    "### #.# #.# #.# ###", ".#. ##. .#. .#. ###", "### ..# ### #.. ###", "### ..# ### ..# ###",
    "#.# #.# ### ..# ..#", "### #.. ### ..# ###", "### #.. ### #.# ###", "### ..# ..# ..# ..#",
    "### #.# ### #.# ###", "### #.# ### ..# ###"])}


@dataclass
class SceneConfig:
    image_size: int = 32  # pixels per side; use the model's vision.image_size
    seed: int = 0
    max_objects: int = 3  # shapes per scene, 1..3 (a digit may take a fourth cell)
    digit_prob: float = 0.5  # chance that a scene shows a digit
    qa_per_scene: int = 3  # question/answer pairs per scene (drawn from the scene's candidates)
    heldout: tuple[tuple[str, str], ...] = HELDOUT  # (colour, shape) pairs never in train or val

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"scenes: image_size must be an integer >= 16 (a digit glyph needs 8 pixels per "
                             f"cell), got {self.image_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"scenes: seed must be an integer >= 0, got {self.seed!r}")
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"scenes: max_objects must be 1, 2 or 3, got {self.max_objects!r}")
        if not 0.0 <= self.digit_prob <= 1.0:
            raise ValueError(f"scenes: digit_prob must be in [0, 1], got {self.digit_prob!r}")
        if self.qa_per_scene < 1:
            raise ValueError(f"scenes: qa_per_scene must be >= 1, got {self.qa_per_scene!r}")
        self.heldout = tuple((str(c), str(s)) for c, s in self.heldout)
        for c, s in self.heldout:
            if c not in COLOURS or s not in SHAPES:
                raise ValueError(f"scenes: held-out pair ({c}, {s}) must be a colour of {list(COLOURS)} and a "
                                 f"shape of {list(SHAPES)}")
        for s in SHAPES:  # every shape keeps enough colours for a scene of distinct colours
            if sum((c, s) not in self.heldout for c in COLOURS) < self.max_objects:
                raise ValueError(f"scenes: too many held-out pairs with shape {s!r}: fewer than max_objects "
                                 f"({self.max_objects}) colours are left for it")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # colour | shape | position | count | digit
    choices: tuple[str, ...]  # every answer of this kind (the answer is one of them)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cell: int  # index into POSITIONS

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass
class SceneExample:
    image_HWC: np.ndarray  # uint8 (S, S, 3)
    caption: str
    qa: list[QA]
    objects: list[SceneObject] = field(default_factory=list)  # what was drawn, in cell order
    digit: tuple[int, int] | None = None  # (value, cell) of the digit, if any
    split: str = "train"
    index: int = 0
    _png: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def png(self) -> bytes:
        """The same pixels, PNG-encoded (lossless); encoded on first use: it is 40% of the rendering time
        and training reads the pixels, not the file."""
        if self._png is None:
            self._png = encode_png(self.image_HWC)
        return self._png


# ---- rendering --------------------------------------------------------------------------------------------------
@cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a size x size image."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return ys, xs


def shape_mask(shape: str, size: int, cy: float, cx: float, h: float) -> np.ndarray:
    """(size, size) bool: `shape` centred at (cy, cx) reaching h pixels from its centre."""
    ys, xs = _grid(size)
    dy, dx = ys - cy, xs - cx
    ady, adx = np.abs(dy), np.abs(dx)
    if shape == "circle":  # 0.9: at 16 x 16 a radius in [2.83, 3) would fill its 5 x 5 box (a square)
        r = 0.9 * h
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (adx <= 0.8 * h) & (ady <= 0.8 * h)  # a bit smaller: about the circle's area
    if shape == "triangle":  # apex up, base at the bottom as wide as the triangle is tall
        return (dy >= -h) & (dy <= h) & (adx <= (dy + h) / 2)
    if shape == "cross":  # a plus sign with arms a third of the size wide
        w = h / 3
        return ((adx <= h) & (ady <= w)) | ((ady <= h) & (adx <= w))
    if shape == "bar":  # horizontal
        return (adx <= h) & (ady <= h / 3)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


@cache
def _glyph(value: int, k: int) -> np.ndarray:
    return np.kron(GLYPHS[value], np.ones((k, k), dtype=bool))


def _cell_box(cell: int, size: int) -> tuple[int, int, int]:
    c = size // 2
    return (cell // 2) * c, (cell % 2) * c, c  # top, left, side


def _render(objects: list[tuple[SceneObject, float, float, float]], digit: tuple[int, int, int, int] | None,
            size: int) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj, cy, cx, h in objects:
        top, left, c = _cell_box(obj.cell, size)
        mask = shape_mask(obj.shape, size, cy, cx, h)
        inside = np.zeros_like(mask)
        inside[top:top + c, left:left + c] = True  # never spill into a neighbour's cell
        img[mask & inside] = COLOURS[obj.colour]
    if digit is not None:
        value, cell, oy, ox = digit
        k = max(1, size // 16)  # glyph scale: 3 x 5 -> 6 x 10 pixels at 32 x 32
        glyph = _glyph(value, k)
        top, left, _ = _cell_box(cell, size)
        y0, x0 = top + oy, left + ox
        img[y0:y0 + glyph.shape[0], x0:x0 + glyph.shape[1]][glyph] = DIGIT_COLOUR
    return img


def encode_png(image_HWC: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_HWC).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ---- one scene --------------------------------------------------------------------------------------------------
def _phrase_list(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _choose_objects(rng: np.random.Generator, cfg: SceneConfig, cells: np.ndarray, k: int,
                    first: tuple[str, str] | None) -> list[SceneObject]:
    """k objects with distinct shapes and distinct colours (so every question has one answer), none of them a
    held-out pair except `first` if given."""
    heldout = set(cfg.heldout)
    objs: list[SceneObject] = []
    if first is not None:
        objs.append(SceneObject(first[1], first[0], int(cells[0])))
    while len(objs) < k:
        used_s, used_c = {o.shape for o in objs}, {o.colour for o in objs}
        shapes = [s for s in SHAPES if s not in used_s]
        shape = shapes[int(rng.integers(len(shapes)))]
        colours = [c for c in COLOURS if c not in used_c and (c, shape) not in heldout]
        objs.append(SceneObject(shape, colours[int(rng.integers(len(colours)))], int(cells[len(objs)])))
    return sorted(objs, key=lambda o: o.cell)


def _questions(objs: list[SceneObject], digit: int | None, cfg: SceneConfig, about: SceneObject | None) -> list[QA]:
    colours, count = tuple(COLOURS), NUMBERS[1:cfg.max_objects + 1]
    out = []
    for o in objs if about is None else [about]:
        out += [QA(f"what colour is the {o.shape}?", o.colour, "colour", colours),
                QA(f"what shape is at the {o.position}?", o.shape, "shape", SHAPES),
                QA(f"where is the {o.colour} {o.shape}?", o.position, "position", POSITIONS)]
    if about is None:
        out.append(QA("how many shapes are there?", NUMBERS[len(objs)], "count", count))
        if digit is not None:
            out.append(QA("which digit is shown?", DIGITS[digit], "digit", DIGITS))
    return out


def make_scene(split: str, index: int, cfg: SceneConfig) -> SceneExample:
    """Example `index` of `split`: a pure function of (cfg, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown scenes split {split!r}; use one of {SPLITS}")
    if split == "heldout" and not cfg.heldout:
        raise ValueError("scenes: the heldout split needs held-out pairs (SceneConfig.heldout is empty)")
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    size = cfg.image_size
    k = int(rng.integers(1, cfg.max_objects + 1))
    has_digit = bool(rng.random() < cfg.digit_prob)
    cells = rng.permutation(4)
    first = cfg.heldout[int(rng.integers(len(cfg.heldout)))] if split == "heldout" and cfg.heldout else None
    objs = _choose_objects(rng, cfg, cells, k, first)
    about = next(o for o in objs if (o.colour, o.shape) == first) if first is not None else None

    c = size // 2
    placed = []
    for o in objs:
        h = float(rng.uniform(0.28, 0.38)) * c
        margin = max(0.0, c / 2 - h - 1)  # keeps the whole shape one pixel inside its cell
        top, left, _ = _cell_box(o.cell, size)
        jy, jx = rng.uniform(-margin, margin, size=2)
        # Centred on a pixel centre: a shape a few pixels wide stays symmetric (a small cross off-centre
        # draws arms of uneven width and looks like a blob).
        cy, cx = math.floor(top + c / 2 + jy) + 0.5, math.floor(left + c / 2 + jx) + 0.5
        placed.append((o, cy, cx, h))
    digit = None
    if has_digit:
        value, cell = int(rng.integers(10)), int(cells[k])
        gk = max(1, size // 16)
        oy = int(rng.integers(0, c - 5 * gk + 1))
        ox = int(rng.integers(0, c - 3 * gk + 1))
        digit = (value, cell, oy, ox)
    image = _render(placed, digit, size)

    phrases = {o.cell: f"a {o.colour} {o.shape} at the {o.position}" for o in objs}
    if digit is not None:
        phrases[digit[1]] = f"the digit {DIGITS[digit[0]]} at the {POSITIONS[digit[1]]}"
    caption = _phrase_list([phrases[i] for i in sorted(phrases)]) + "."

    candidates = _questions(objs, None if digit is None else digit[0], cfg, about)
    pick = rng.permutation(len(candidates))[:cfg.qa_per_scene]
    qa = [candidates[i] for i in pick]
    return SceneExample(image, caption, qa, objs,
                        None if digit is None else (digit[0], digit[1]), split, index)


def make_examples(split: str, n: int, cfg: SceneConfig, start: int = 0) -> list[SceneExample]:
    """Examples start .. start + n - 1 of `split` (train, val or heldout)."""
    return [make_scene(split, i, cfg) for i in range(start, start + n)]


# ---- text -------------------------------------------------------------------------------------------------------
def qa_text(q: QA) -> str:
    return f"Q: {q.question} A: {q.answer}."


def example_text(ex: SceneExample, qa_index: int | None = None, *, caption: bool = True, qa: bool = True) -> str:
    """The training text: the `<image>` marker, then the caption, then the QA turns (all of them, or only
    `qa_index`). `caption=False` gives the form `mc_items` asks in: the answer must come from the picture,
    not be copied from a caption just before it."""
    if not (caption or qa):
        raise ValueError("example_text: ask for the caption, the QA turns or both")
    turns = ex.qa if qa_index is None else [ex.qa[qa_index]]
    parts = ([ex.caption] if caption else []) + ([qa_text(q) for q in turns] if qa else [])
    return IMAGE + " ".join(parts)


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: score each choice as the continuation `" " + choice` of `prompt`."""

    image_HWC: np.ndarray
    png: bytes
    prompt: str  # '<image>Q: what colour is the circle? A:'
    answer: str
    choices: tuple[str, ...]
    kind: str


def mc_items(split: str, n: int, cfg: SceneConfig) -> list[MCItem]:
    """n multiple-choice items of `split`: every QA of scenes 0, 1, 2, ... until there are n."""
    out: list[MCItem] = []
    i = 0
    while len(out) < n:
        ex = make_scene(split, i, cfg)
        for q in ex.qa[:n - len(out)]:
            out.append(MCItem(ex.image_HWC, ex.png, f"{IMAGE}Q: {q.question} A:", q.answer, q.choices, q.kind))
        i += 1
    return out


__all__ = ["COLOURS", "DIGITS", "HELDOUT", "IMAGE", "POSITIONS", "QA", "SHAPES", "SPLITS", "MCItem",
           "SceneConfig", "SceneExample", "SceneObject", "encode_png", "example_text", "make_examples",
           "make_scene", "mc_items", "qa_text", "shape_mask"]
