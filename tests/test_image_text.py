"""Image folders for stage 2: the scene corpus written to a folder and loaded back, the text forms the loader
accepts, one clear message for each kind of bad input, and the IO accounting."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from moekit.train import image_text
from moekit.train.image_text import (
    ImageTextError,
    ImageTextExample,
    IOStats,
    io_stats,
    load_image_text,
    scene_examples,
    write_scene_folder,
)
from moekit.train.scenes import IMAGE, SceneConfig, encode_png, make_examples

CFG = SceneConfig(seed=5)


def char_encode(text: str) -> list[int]:
    """A fake tokenizer: one token per character, `<image>` one token."""
    out, i = [], 0
    while i < len(text):
        if text.startswith(IMAGE, i):
            out.append(1)
            i += len(IMAGE)
        else:
            out.append(2 + ord(text[i]) % 200)
            i += 1
    return out


def make_folder(root, lines, images=("cat.png",)):
    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(root / name)
    (root / "captions.jsonl").write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                                                 for ln in lines))
    return root


# ---- the scene corpus as a folder ------------------------------------------------------------------------------
def test_scene_folder_round_trip(tmp_path):
    folder = write_scene_folder(tmp_path / "scenes", "val", 12, CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]  # no temporary folder left behind
    assert len(list((folder / "images").glob("*.png"))) == 12
    loaded = load_image_text(folder, CFG.image_size)
    rendered = scene_examples("val", 12, CFG)
    assert [e.text for e in loaded] == [e.text for e in rendered]
    for a, b in zip(loaded, rendered, strict=True):
        assert torch.equal(a.pixels_CHW, b.pixels_CHW) and a.file_bytes == b.file_bytes
        assert a.text.count(IMAGE) == 1 and a.text.startswith(IMAGE)
    # the two forms of each scene: its caption, then its QA turns as a LLaVA conversation
    ex = make_examples("val", 1, CFG)[0]
    assert loaded[0].text == IMAGE + ex.caption
    assert loaded[1].text == IMAGE + " ".join(f"Q: {q.question} A: {q.answer}." for q in ex.qa)
    rows = [json.loads(x) for x in (folder / "captions.jsonl").read_text().splitlines()]
    assert rows[1]["conversations"][0]["value"].startswith(IMAGE + "\n")


def test_scene_folder_never_overwrites_and_is_atomic(tmp_path, monkeypatch):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ImageTextError, match="not an empty folder"):
        write_scene_folder(busy, "train", 2, CFG)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    write_scene_folder(tmp_path / "empty", "train", 2, CFG)  # an empty folder is filled
    assert (tmp_path / "empty" / "captions.jsonl").is_file()

    def broken(split, n, cfg):  # fails half-way through writing
        yield from make_examples(split, 1, cfg)
        raise OSError("disk full")

    monkeypatch.setattr(image_text, "make_examples", broken)
    with pytest.raises(OSError, match="disk full"):
        write_scene_folder(tmp_path / "half", "train", 3, CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]  # neither a half folder nor a temp one


def test_scene_examples_forms_and_size():
    full = scene_examples("train", 3, CFG, forms=("full",), image_size=48)
    assert len(full) == 3 and full[0].pixels_CHW.shape == (3, 48, 48)
    assert " Q: " in full[0].text and full[0].source == "scenes/train/0"
    assert full[0].pixels_CHW.min() >= -1 and full[0].pixels_CHW.max() <= 1
    with pytest.raises(ValueError, match="forms"):
        scene_examples("train", 1, CFG, forms=("poem",))


# ---- what a user's folder may hold ------------------------------------------------------------------------------
def test_text_forms(tmp_path):
    lines = [
        {"image": "cat.png", "text": "a cat on a mat"},
        {"image": "cat.png", "text": "a photo: <image> of a cat"},
        {"image": "cat.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                               {"from": "gpt", "value": "A cat."},
                                               {"from": "human", "value": "Where?"},
                                               {"from": "gpt", "value": "On a mat."}]},
        {"image": "cat.png", "conversations": [{"role": "user", "content": "What is it?\n<image>"},
                                               {"role": "assistant", "content": "A cat."}]},
        "",  # blank lines are skipped
        {"image": "sub/dog.png", "text": "<image>a dog", "extra": "ignored"},
    ]
    folder = make_folder(tmp_path / "pets", lines)
    (folder / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "sub" / "dog.png")
    got = load_image_text(folder, 32)
    assert [e.text for e in got] == [
        "<image>a cat on a mat", "<image>a photo: of a cat", "<image>Q: What is it? A: A cat. Q: Where? A: On a mat.",
        "<image>Q: What is it? A: A cat.", "<image>a dog"]
    assert [e.source for e in got] == [f"captions.jsonl:{i}" for i in (1, 2, 3, 4, 6)]
    assert all(e.pixels_CHW.shape == (3, 32, 32) for e in got)  # resized from 50 x 40
    assert torch.allclose(got[0].pixels_CHW, torch.full((3, 32, 32), 200 / 127.5 - 1))
    assert torch.equal(got[-1].pixels_CHW, torch.full((3, 32, 32), -1.0))
    assert got[0].file_bytes == (folder / "cat.png").stat().st_size


BAD_LINES = [
    ('{"image": "cat.png", "text": "a cat"', r"captions.jsonl:1: not valid JSON"),
    ('["cat.png"]', r"captions.jsonl:1: a line must be a JSON object"),
    ({"text": "a cat"}, r"captions.jsonl:1: no 'image' field"),
    ({"image": "cat.png"}, r"captions.jsonl:1: no 'text' or 'conversations'"),
    ({"image": "cat.png", "text": 3}, r"'text' must be a string"),
    ({"image": "cat.png", "conversations": []}, r"'conversations' must be a non-empty list"),
    ({"image": "cat.png", "conversations": [{"from": "system", "value": "hi"}]}, r"turn 0 must be"),
    ({"image": "dog.png", "text": "a dog"}, r"captions.jsonl:1: image 'dog.png' not found in"),
    ({"image": "../cat.png", "text": "a cat"}, r"is outside"),
    ({"image": "notes.png", "text": "a cat"}, r"captions.jsonl:1: image 'notes.png': the data is not an image"),
    ({"image": "cut.png", "text": "a cat"}, r"captions.jsonl:1: image 'cut.png': .*(truncated|corrupt)"),
    ({"image": "cat.png", "text": "<image> a <image>"}, r"captions.jsonl:1: the text has 2 <image> markers"),
    ({"image": "cat.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                            {"from": "gpt", "value": "<image>"}]}, r"has 2 <image> markers"),
    ({"image": "cat.png", "text": "  <image>\n "}, r"captions.jsonl:1: the text is empty"),
]


@pytest.mark.parametrize("line, match", BAD_LINES)
def test_bad_lines(tmp_path, line, match):
    folder = make_folder(tmp_path / "d", [line])
    (folder / "notes.png").write_text("not a picture")
    (folder / "cut.png").write_bytes(encode_png(np.full((32, 32, 3), 7, np.uint8))[:60])
    with pytest.raises(ImageTextError, match=match) as e:
        load_image_text(folder, 32)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_bad_folders(tmp_path):
    with pytest.raises(ImageTextError, match="does not exist"):
        load_image_text(tmp_path / "nope", 32)
    (tmp_path / "file.jsonl").write_text("")
    with pytest.raises(ImageTextError, match="not a folder"):
        load_image_text(tmp_path / "file.jsonl", 32)
    (tmp_path / "none").mkdir()
    with pytest.raises(ImageTextError, match="no .jsonl file"):
        load_image_text(tmp_path / "none", 32)
    two = make_folder(tmp_path / "two", [{"image": "cat.png", "text": "a cat"}])
    (two / "more.jsonl").write_text("")
    with pytest.raises(ImageTextError, match=r"2 .jsonl files \(captions.jsonl, more.jsonl\); keep exactly one"):
        load_image_text(two, 32)
    with pytest.raises(ImageTextError, match="no examples"):
        load_image_text(make_folder(tmp_path / "empty", ["", "  "]), 32)


def test_error_names_the_line(tmp_path):
    good = {"image": "cat.png", "text": "a cat"}
    folder = make_folder(tmp_path / "d", [good, good, "", "{oops"])
    with pytest.raises(ImageTextError, match=r"captions.jsonl:4: not valid JSON"):
        load_image_text(folder, 32)


# ---- IO accounting ----------------------------------------------------------------------------------------------
def test_io_stats_arithmetic():
    px = torch.zeros(3, 32, 32)
    examples = [ImageTextExample("<image>abcd", px, 600, "a"), ImageTextExample("<image>héllo", px, 1000, "b")]
    s = io_stats(examples, char_encode, n_latents=16, image_size=32)
    assert (s.text_bytes, s.text_tokens) == (4 + 6, 4 + 5)  # é is two UTF-8 bytes; markers are not text
    assert (s.image_file_bytes, s.image_pixel_bytes, s.images, s.visual_tokens) == (1600, 2 * 3072, 2, 32)
    assert s.bytes_per_text_token == pytest.approx(10 / 9)
    assert s.file_bytes_per_visual_token == 50.0 and s.pixel_bytes_per_visual_token == 192.0
    assert s.ratio == pytest.approx(50 / (10 / 9)) and s.pixel_ratio == pytest.approx(192 / (10 / 9))
    twice = s + s
    assert twice.text_tokens == 18 and twice.visual_tokens == 64 and twice.ratio == pytest.approx(s.ratio)
    assert "45.0x text" in s.line()
    assert math.isnan(IOStats().ratio) and math.isnan(IOStats(text_bytes=4, text_tokens=1).file_bytes_per_visual_token)
    # the article's figures: 600 bytes per visual token against 4 per text token is 150x
    assert IOStats(400, 100, 600 * 64, 0, 1, 64).ratio == pytest.approx(150.0)


def test_io_stats_of_scenes(tmp_path):
    examples = scene_examples("train", 20, CFG)
    s = io_stats(examples, char_encode, n_latents=16, image_size=32)
    assert s.images == 40 and s.pixel_bytes_per_visual_token == 32 * 32 * 3 / 16
    assert s.bytes_per_text_token == 1.0  # ASCII, one character per token
    pngs = [len(ex.png) for ex in make_examples("train", 20, CFG)]
    assert s.file_bytes_per_visual_token == pytest.approx(2 * sum(pngs) / (40 * 16))
    folder = write_scene_folder(tmp_path / "s", "train", 20, CFG)
    assert io_stats(load_image_text(folder, 32), char_encode, 16, 32) == s  # the folder reads the same bytes
