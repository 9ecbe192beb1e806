"""Image-text examples for stage-2 training: a user's folder (`--data-images DIR`), the scene corpus, IO accounting.

A folder holds the images and exactly one JSONL file (name it `DIR/captions.jsonl`, say), one JSON
object per line, with the image's path relative to DIR and either a text or a conversation:

    {"image": "cat.png", "text": "a cat on a mat"}
    {"image": "cat.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                           {"from": "gpt", "value": "A cat."}]}

(`role`/`content` with `user`/`assistant` are accepted too.) Every example's text holds exactly one
`<image>` marker, and it comes first: Flamingo's masking lets each token see the image of the most
recent marker before it, so with several examples packed in a row, text placed before an example's
marker would see the *previous* example's picture. A marker written elsewhere (LLaVA puts it at the
start or end of the first human turn) is moved to the front; a text without one gets it. A
conversation becomes `Q: <human> A: <assistant>` turns, the grammar of the scene corpus:

    <image>Q: What is it? A: A cat.

    examples = load_image_text("data/pets", image_size=32)      # list[ImageTextExample]
    examples = scene_examples("train", 5000, SceneConfig())     # the same, rendered
    write_scene_folder("data/scenes", "val", 100, SceneConfig())  # a folder to look at, or to load
    print(io_stats(examples, encode, n_latents=16, image_size=32).line())

IO accounting (SPEC section 5: image data needs ~150x the IO of text, ~600 bytes per token vs ~4):
`io_stats` counts bytes read per training token, text (UTF-8 bytes / tokens) against images (encoded
file bytes, and decoded pixel bytes at the model's input size, per visual token; an image is
`n_latents` visual tokens, the Perceiver resampler's output).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.images import MAX_BYTES, ImageError, decode_image, pixels_from_array, to_pixels
from moekit.train.scenes import IMAGE, SceneConfig, example_text, make_examples

HUMAN, ASSISTANT = ("human", "user"), ("gpt", "assistant")
FORMS = ("caption", "qa", "full")  # scene texts: the caption; the QA turns alone; the caption then the QA turns


class ImageTextError(ValueError):
    """A folder of images and captions that cannot be used: the message names the file, the line and the fix."""


@dataclass
class ImageTextExample:
    text: str  # exactly one <image> marker, at the start
    pixels_CHW: torch.Tensor  # (3, S, S) float32 in [-1, 1], S = the model's vision.image_size
    file_bytes: int  # encoded image bytes read for it
    source: str  # where it came from: "captions.jsonl:12", "scenes/train/7"


# ---- a user's folder --------------------------------------------------------------------------------------------
def jsonl_file(folder: str | Path) -> Path:
    """The one .jsonl file of an image folder."""
    folder = Path(folder)
    if not folder.exists():
        raise ImageTextError(f"--data-images {folder}: the folder does not exist")
    if not folder.is_dir():
        raise ImageTextError(f"--data-images {folder}: not a folder; give a folder of images with one "
                             "captions.jsonl file")
    found = sorted(folder.glob("*.jsonl"))
    if not found:
        raise ImageTextError(f"--data-images {folder}: no .jsonl file; put one there (captions.jsonl), one JSON "
                             'object per line such as {"image": "cat.png", "text": "a cat on a mat"}')
    if len(found) > 1:
        raise ImageTextError(f"--data-images {folder}: {len(found)} .jsonl files ({', '.join(p.name for p in found)});"
                             " keep exactly one")
    return found[0]


def _with_marker(parts: list[str], where: str) -> str:
    """`<image>` + the parts (marker-free, stripped, joined by spaces)."""
    body = " ".join(p.strip() for p in parts if p.strip())
    if not body:
        raise ImageTextError(f"{where}: the text is empty")
    return IMAGE + body


def _drop_marker(text: str) -> str:
    before, _, after = text.partition(IMAGE)
    return before.strip() + (" " if before.strip() and after.strip() else "") + after.strip()


def line_text(row: dict, where: str) -> str:
    """The training text of one JSONL row (see the module docstring)."""
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise ImageTextError(f"{where}: 'text' must be a string")
        texts = [text]
    elif "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list) or not conv:
            raise ImageTextError(f"{where}: 'conversations' must be a non-empty list of turns such as "
                                 '{"from": "human", "value": "<image>\\nWhat is it?"}')
        texts, labels = [], []
        for j, turn in enumerate(conv):
            role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
            value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
            if role not in HUMAN + ASSISTANT or not isinstance(value, str):
                raise ImageTextError(f"{where}: turn {j} must be an object with 'from' (human or gpt) or 'role' "
                                     f"(user or assistant) and a string 'value' or 'content', got {str(turn)[:80]}")
            texts.append(value)
            labels.append("Q:" if role in HUMAN else "A:")
    else:
        raise ImageTextError(f"{where}: no 'text' or 'conversations' field")
    n = sum(t.count(IMAGE) for t in texts)
    if n > 1:
        raise ImageTextError(f"{where}: the text has {n} {IMAGE} markers; a line has one image, so at most one "
                             f"marker (none: it is put first)")
    texts = [_drop_marker(t) for t in texts]
    if "text" in row:
        return _with_marker(texts, where)
    return _with_marker([f"{label} {t.strip()}" for label, t in zip(labels, texts, strict=True)], where)


def load_image_text(folder: str | Path, image_size: int) -> list[ImageTextExample]:
    """Every example of an image folder (see the module docstring), pixels at image_size x image_size."""
    folder = Path(folder)
    file = jsonl_file(folder)
    root = Path(os.path.normpath(folder.absolute()))
    cache: dict[Path, tuple[torch.Tensor, int]] = {}
    out = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ImageTextError(f"{file}: not UTF-8 text") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ImageTextError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ImageTextError(f"{where}: a line must be a JSON object, got {type(row).__name__}")
        name = row.get("image")
        if not isinstance(name, str) or not name:
            raise ImageTextError(f"{where}: no 'image' field (the image's path relative to {folder})")
        text = line_text(row, where)
        path = Path(os.path.normpath(root / name))  # lexical: a symlink to pictures elsewhere is fine
        if root not in path.parents:
            raise ImageTextError(f"{where}: image {name!r} is outside {folder}; give a path inside the folder")
        if path not in cache:
            if not path.is_file():
                raise ImageTextError(f"{where}: image {name!r} not found in {folder}")
            with open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
            try:
                cache[path] = (to_pixels(decode_image(data), image_size), len(data))
            except ImageError as e:
                raise ImageTextError(f"{where}: image {name!r}: {e}") from None
        pixels, nbytes = cache[path]
        out.append(ImageTextExample(text, pixels, nbytes, f"{file.name}:{lineno}"))
    if not out:
        raise ImageTextError(f"{file}: no examples; add lines such as {{\"image\": \"cat.png\", \"text\": \"a cat\"}}")
    return out


# ---- the scene corpus as image-text examples ------------------------------------------------------------------
def _scene_texts(ex, forms: tuple[str, ...]) -> list[str]:
    texts = {"caption": lambda: example_text(ex, qa=False), "qa": lambda: example_text(ex, caption=False),
             "full": lambda: example_text(ex)}
    return [texts[f]() for f in forms]


def scene_examples(split: str, n: int, cfg: SceneConfig, forms: tuple[str, ...] = ("caption", "qa"),
                   image_size: int | None = None) -> list[ImageTextExample]:
    """n scenes as examples, one per form each. The default pair trains both captioning and answering
    from the picture alone (the `mc_items` prompt); "full" (caption then QA) lets answers be copied."""
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ValueError(f"scene forms {bad or '()'}: choose from {FORMS}")
    size = image_size or cfg.image_size
    out = []
    for ex in make_examples(split, n, cfg):
        if size == cfg.image_size:
            pixels = pixels_from_array(ex.image_HWC)
        else:
            from PIL import Image

            pixels = to_pixels(Image.fromarray(ex.image_HWC), size)
        out += [ImageTextExample(t, pixels, len(ex.png), f"scenes/{split}/{ex.index}") for t in _scene_texts(ex, forms)]
    return out


def write_scene_folder(folder: str | Path, split: str, n: int, cfg: SceneConfig) -> Path:
    """Write n scenes as an image folder: `images/<split>-<i>.png` and `captions.jsonl` with, per scene, a text
    line (the caption, no marker) and a LLaVA conversation line (the QA turns). Loading it gives
    `scene_examples(split, n, cfg)`. Atomic: built in a temporary folder beside `folder`, then renamed; an
    existing non-empty folder is refused (nothing is overwritten)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ImageTextError(f"{folder} exists and is not an empty folder; remove it or choose another")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        (tmp / "images").mkdir()
        lines = []
        for ex in make_examples(split, n, cfg):
            name = f"images/{split}-{ex.index:06d}.png"
            (tmp / name).write_bytes(ex.png)
            conv = []
            for j, q in enumerate(ex.qa):
                conv += [{"from": "human", "value": (IMAGE + "\n" if j == 0 else "") + q.question},  # LLaVA's form
                         {"from": "gpt", "value": f"{q.answer}."}]
            lines.append(json.dumps({"image": name, "text": ex.caption}))
            lines.append(json.dumps({"image": name, "conversations": conv}))
        (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes a 0700 folder
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- IO accounting ----------------------------------------------------------------------------------------------
def _per(a: float, b: float) -> float:
    return a / b if b else math.nan


@dataclass
class IOStats:
    """Bytes read per training token, text against images (SPEC section 5: ~4 vs ~600, ~150x)."""

    text_bytes: int = 0  # UTF-8 bytes of the texts (markers excluded)
    text_tokens: int = 0
    image_file_bytes: int = 0  # encoded (PNG, JPEG...) bytes read
    image_pixel_bytes: int = 0  # decoded H x W x 3 bytes at the model's input size
    images: int = 0
    visual_tokens: int = 0  # images x n_latents

    @property
    def bytes_per_text_token(self) -> float:
        return _per(self.text_bytes, self.text_tokens)

    @property
    def file_bytes_per_visual_token(self) -> float:
        return _per(self.image_file_bytes, self.visual_tokens)

    @property
    def pixel_bytes_per_visual_token(self) -> float:
        return _per(self.image_pixel_bytes, self.visual_tokens)

    @property
    def ratio(self) -> float:
        """Encoded image bytes per visual token / text bytes per text token: the article's ~150x."""
        return _per(self.file_bytes_per_visual_token, self.bytes_per_text_token)

    @property
    def pixel_ratio(self) -> float:
        return _per(self.pixel_bytes_per_visual_token, self.bytes_per_text_token)

    def __add__(self, other: IOStats) -> IOStats:
        return IOStats(*(a + b for a, b in zip(self._values(), other._values(), strict=True)))

    def _values(self) -> tuple[int, ...]:
        return (self.text_bytes, self.text_tokens, self.image_file_bytes, self.image_pixel_bytes, self.images,
                self.visual_tokens)

    def line(self) -> str:
        return (f"io: text {self.bytes_per_text_token:.2f} bytes/token | images {self.images:,} x "
                f"{_per(self.visual_tokens, self.images):.0f} visual tokens: {self.file_bytes_per_visual_token:.1f} "
                f"file bytes/token ({self.ratio:.1f}x text), {self.pixel_bytes_per_visual_token:.1f} pixel "
                f"bytes/token ({self.pixel_ratio:.1f}x) | GPT-4 article: ~600 vs ~4 bytes, ~150x")


def io_stats(examples: Iterable[ImageTextExample], encode: Callable[[str], list[int]], n_latents: int,
             image_size: int) -> IOStats:
    """IO per training token of `examples`: one image and its text each; `encode` is the tokenizer."""
    s = IOStats()
    for ex in examples:
        text = ex.text.replace(IMAGE, "")
        s.text_bytes += len(text.encode("utf-8"))
        s.text_tokens += len(encode(text))
        s.image_file_bytes += ex.file_bytes
        s.image_pixel_bytes += image_size * image_size * 3
        s.images += 1
        s.visual_tokens += n_latents
    return s


__all__ = ["FORMS", "IOStats", "ImageTextError", "ImageTextExample", "io_stats", "jsonl_file", "line_text",
           "load_image_text", "scene_examples", "write_scene_folder"]
