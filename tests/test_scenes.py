"""The rendered scene corpus: deterministic by seed, held-out pairs never in training, and every caption and
answer true of the pixels, read back from the picture by a classifier that knows nothing of the renderer."""

import hashlib
import io
import re

import numpy as np
import pytest
from PIL import Image

from moekit.images import decode_image, pixels_from_array, to_pixels
from moekit.train.scenes import (
    COLOURS,
    DIGIT_COLOUR,
    DIGITS,
    GLYPHS,
    HELDOUT,
    IMAGE,
    NUMBERS,
    POSITIONS,
    SHAPES,
    SceneConfig,
    example_text,
    make_examples,
    make_scene,
    mc_items,
)

CFG = SceneConfig()


# ---- reading a scene back from its pixels ----------------------------------------------------------------------
def classify(mask: np.ndarray) -> str:
    """The shape of a one-object mask, from its bounding box: proportions and row widths only."""
    ys, xs = np.nonzero(mask)
    m = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = m.shape
    rows = m.sum(1)
    if w >= 2 * h:
        return "bar"
    if m.mean() > 0.97:
        return "square"
    if rows[h // 4] >= 0.6 * w:  # a quarter of the way down: a circle is nearly full width there
        return "circle"
    if rows[-1] >= 0.7 * w:  # a wide base under a narrow top
        return "triangle"
    if rows[-1] <= 0.5 * w and rows[h // 2] == w:
        return "cross"
    return "unknown"


def cell_of(ys: np.ndarray, xs: np.ndarray, size: int) -> set[int]:
    c = size // 2
    return set(((ys // c) * 2 + xs // c).tolist())


def read_scene(img: np.ndarray) -> tuple[dict[int, tuple[str, str]], tuple[str, int] | None]:
    """{cell: (colour, shape)} and (digit word, cell) as the picture shows them."""
    size = img.shape[0]
    known = np.array(list(COLOURS.values()) + [DIGIT_COLOUR, (0, 0, 0)], dtype=np.uint8)
    assert (img[:, :, None, :] == known).all(-1).any(-1).all(), "a pixel of no known colour"
    objects = {}
    for name, rgb in COLOURS.items():
        mask = np.all(img == rgb, axis=-1)
        if mask.any():
            cells = cell_of(*np.nonzero(mask), size)
            assert len(cells) == 1, f"{name} pixels in cells {cells}"
            assert mask.sum() >= 5
            objects[cells.pop()] = (name, classify(mask))
    digit = None
    mask = np.all(img == DIGIT_COLOUR, axis=-1)
    if mask.any():
        ys, xs = np.nonzero(mask)
        (cell,) = cell_of(ys, xs, size)
        m = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        k = m.shape[0] // 5
        glyph = m[::k, ::k]
        matches = [d for d, g in GLYPHS.items() if g.shape == glyph.shape and (g == glyph).all()]
        assert len(matches) == 1 and np.array_equal(np.kron(glyph, np.ones((k, k), bool)), m)
        digit = (DIGITS[matches[0]], cell)
    return objects, digit


CAPTION_PART = re.compile(r"(?:a (\w+) (\w+)|the digit (\w+)) at the (top left|top right|bottom left|bottom right)")


def parse_caption(caption: str):
    assert caption.endswith(".")
    objects, digit, cells = {}, None, []
    for p in re.split(r", | and ", caption[:-1]):
        m = CAPTION_PART.fullmatch(p)
        assert m, f"caption part {p!r} is outside the grammar"
        cells.append(POSITIONS.index(m[4]))
        if m[3]:
            digit = (m[3], cells[-1])
        else:
            objects[cells[-1]] = (m[1], m[2])
    assert cells == sorted(set(cells)), "one thing per cell, told in reading order"
    return objects, digit


def expected_answer(question: str, objects: dict, digit) -> str:
    """The answer to a question, worked out from the picture's objects."""
    by_shape = {s: (c, cell) for cell, (c, s) in objects.items()}
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        return by_shape[m[1]][0]
    if m := re.fullmatch(r"what shape is at the (.+)\?", question):
        return objects[POSITIONS.index(m[1])][1]
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        assert by_shape[m[2]][0] == m[1]
        return POSITIONS[by_shape[m[2]][1]]
    if question == "how many shapes are there?":
        return NUMBERS[len(objects)]
    if question == "which digit is shown?":
        return digit[0]
    raise AssertionError(f"question {question!r} is outside the grammar")


# ---- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 32, 48])
def test_captions_and_answers_match_the_pixels(size):
    cfg = SceneConfig(image_size=size, seed=3)
    n_digits = 0
    for split in ("train", "val", "heldout"):
        for ex in make_examples(split, 300, cfg):
            assert ex.image_HWC.shape == (size, size, 3) and ex.image_HWC.dtype == np.uint8
            seen_objects, seen_digit = read_scene(ex.image_HWC)
            objects, digit = parse_caption(ex.caption)
            assert objects == seen_objects, ex.caption
            assert digit == seen_digit, ex.caption
            n_digits += digit is not None
            assert 1 <= len(objects) <= 3 and len({s for _, s in objects.values()}) == len(objects)
            assert 1 <= len(ex.qa) <= cfg.qa_per_scene
            for q in ex.qa:
                assert q.answer == expected_answer(q.question, objects, digit), (ex.caption, q)
                assert q.answer in q.choices
    assert 0.3 < n_digits / 900 < 0.7  # digit_prob 0.5


def test_deterministic_by_seed_and_split():
    a, b = make_examples("train", 50, CFG), make_examples("train", 50, CFG)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image_HWC, y.image_HWC) and x.caption == y.caption and x.qa == y.qa
        assert x.png == y.png
    assert make_examples("train", 5, CFG, start=20)[0].caption == a[20].caption  # example i is a pure function
    other = make_examples("train", 50, SceneConfig(seed=1))
    val = make_examples("val", 50, CFG)
    for different in (other, val):
        same = sum(np.array_equal(x.image_HWC, y.image_HWC) for x, y in zip(a, different, strict=True))
        assert same <= 2  # new seeds give new scenes (a one-object scene can recur by chance)


def test_pixels_identical_across_machines():
    """Golden hashes: numpy's PCG64 stream and the float rasterization are platform-independent, so these hold
    on every machine; a change here must bump SCENES_VERSION (the pictures of a dataset changed)."""
    h = hashlib.sha256()
    for ex in make_examples("train", 20, CFG) + make_examples("heldout", 5, CFG):
        h.update(ex.image_HWC.tobytes())
        h.update(example_text(ex).encode())
    assert h.hexdigest()[:16] == GOLDEN


GOLDEN = "d58eb4476bbae495"  # SCENES_VERSION scenes-v1


def test_heldout_pairs_never_in_train_or_val():
    heldout = set(HELDOUT)
    colours_of = {s: set() for s in SHAPES}
    for split in ("train", "val"):
        for ex in make_examples(split, 3000, CFG):
            objects, _ = read_scene(ex.image_HWC)  # what is drawn, not only what is said
            for colour, shape in objects.values():
                assert (colour, shape) not in heldout, f"{split} {ex.index} draws a held-out {colour} {shape}"
                colours_of[shape].add(colour)
            text = example_text(ex)
            assert not any(f"{c} {s}" in text for c, s in heldout)
    # every shape and colour of a held-out pair still appears in training, with the other partners
    for colour, shape in heldout:
        assert colours_of[shape] == set(COLOURS) - {c for c, s in heldout if s == shape}
        assert any(colour in cs for s, cs in colours_of.items() if s != shape)


def test_heldout_split_asks_about_the_heldout_object():
    kinds = set()
    for ex in make_examples("heldout", 300, CFG):
        objects, _ = read_scene(ex.image_HWC)
        held = [(cell, c, s) for cell, (c, s) in objects.items() if (c, s) in set(HELDOUT)]
        assert len(held) == 1
        cell, colour, shape = held[0]
        for q in ex.qa:
            kinds.add(q.kind)
            assert shape in q.question or POSITIONS[cell] in q.question, q
            assert q.answer in (colour, shape, POSITIONS[cell])
    assert kinds == {"colour", "shape", "position"}


def test_png_decodes_to_the_same_pixels():
    for ex in make_examples("val", 20, CFG):
        with Image.open(io.BytesIO(ex.png)) as im:
            assert im.format == "PNG" and np.array_equal(np.asarray(im.convert("RGB")), ex.image_HWC)
        img = decode_image(ex.png)  # the path the loader and the server take
        assert np.array_equal(to_pixels(img, CFG.image_size).numpy(), pixels_from_array(ex.image_HWC).numpy())


def test_texts_and_mc_items():
    ex = make_scene("train", 0, CFG)
    full, cap, qa = example_text(ex), example_text(ex, qa=False), example_text(ex, caption=False)
    assert full.startswith(IMAGE + ex.caption + " Q: ") and full.count(IMAGE) == 1
    assert cap == IMAGE + ex.caption
    q0 = ex.qa[0]
    assert qa.startswith(f"{IMAGE}Q: {q0.question} A: {q0.answer}.")
    assert example_text(ex, 1) == f"{IMAGE}{ex.caption} Q: {ex.qa[1].question} A: {ex.qa[1].answer}."
    with pytest.raises(ValueError, match="caption"):
        example_text(ex, caption=False, qa=False)

    items = mc_items("heldout", 40, CFG)
    assert len(items) == 40
    for it in items:
        assert re.fullmatch(r"<image>Q: .+\? A:", it.prompt)
        assert it.answer in it.choices and len(set(it.choices)) == len(it.choices) >= 3
        assert it.kind in ("colour", "shape", "position")
    # the prompt is the training text up to the answer: each choice is scored as " " + choice
    ex0 = make_scene("heldout", 0, CFG)
    assert example_text(ex0, 0, caption=False).startswith(items[0].prompt + " " + items[0].answer + ".")
    assert np.array_equal(items[0].image_HWC, ex0.image_HWC)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=8), "image_size"), (dict(max_objects=4), "max_objects"), (dict(digit_prob=1.5), "digit_prob"),
    (dict(seed=-1), "seed"), (dict(heldout=(("pink", "circle"),)), "held-out pair"),
    (dict(heldout=tuple((c, "bar") for c in COLOURS)), "too many held-out"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SceneConfig(**kwargs)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        make_scene("test", 0, CFG)
    with pytest.raises(ValueError, match="heldout"):
        make_scene("heldout", 0, SceneConfig(heldout=()))
