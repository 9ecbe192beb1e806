"""Training batches for a vision model: image-text examples packed into rows, images in marker order.

    batch = pack(examples, tok_encode, image_token_id, seq_len=128, rows=8)
    image_index(batch.idx_BT, image_token_id)   # moekit.model.vision: which image each token attends to
    sampler = VisionSampler(examples, tok_encode, image_token_id, 128, 8, text_window=..., text_mix=0.25)
    batch = sampler.next_batch()

An example is its text, which begins with the `<image>` marker and holds exactly one, and its pixels.
Examples follow each other in a row, each followed by the end-of-text token (id 0); one that does
not fit in what is left of a row starts the next row (no example is ever split); the rest of a row
is padding (token 0, target -100). The images of the batch are stacked in the order of the markers
in the flattened batch (row 0's first, then row 1's, ...), so the k-th marker is image k.

Targets are the next token over *all* text, not only answers: Flamingo trains on all text tokens,
and a loss on the answers alone leaves too little signal to open the tanh gates (they start at 0).
The marker is never a target (the model is not asked to predict where images go).

`moekit.model.vision.image_index` is Flamingo's masking (Alayrac et al. 2022, section 2.3): each token attends to the
visual tokens of the most recent image at or before it in its row, none before the first.

`VisionSampler` mixes in plain text rows (a fraction `text_mix`, e.g. 0.25) from the stage-1 data so
the language model does not forget; a text row has no image and image index -1 everywhere. All
choices come from counter-seeded generators: the same seed gives the same batches, and the state is
three integers (`state_dict`).

Shape legend: B rows, T tokens per row (seq_len), I images in the batch, C channels, H x W pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

EOT_ID = 0  # <|endoftext|> (moekit.train.tokenizer): separator and padding
IGNORE = -100  # torch.nn.functional.cross_entropy's ignore_index


@dataclass
class VisionBatch:
    idx_BT: torch.Tensor  # long
    targets_BT: torch.Tensor  # long, IGNORE on padding, row ends and markers
    pixels_ICHW: torch.Tensor  # float32, images in marker order
    image_rows: torch.Tensor  # (I,) long: the row of each image
    text_rows: torch.Tensor  # (B,) bool: rows of plain text (no image)
    n_examples: int  # image-text examples packed

    def to(self, device) -> VisionBatch:
        return VisionBatch(self.idx_BT.to(device), self.targets_BT.to(device), self.pixels_ICHW.to(device),
                           self.image_rows.to(device), self.text_rows.to(device), self.n_examples)


def _text_and_pixels(ex) -> tuple[str, torch.Tensor]:
    """An ImageTextExample (`.text`, `.pixels_CHW`) or a (text, pixels_CHW) pair."""
    if hasattr(ex, "text"):
        return ex.text, ex.pixels_CHW
    text, pixels = ex
    return text, pixels


def encode_example(text: str, encode: Callable[[str], list[int]], image_token_id: int, seq_len: int,
                   where: str = "example") -> list[int]:
    """The token ids of one example, checked: the marker first and only once, and room for it in a row."""
    ids = [int(i) for i in encode(text)]
    n = ids.count(image_token_id)
    if n != 1 or ids[0] != image_token_id:
        raise ValueError(f"{where}: its tokens must begin with the image marker (id {image_token_id}) and hold it "
                         f"once, got {n} marker(s){'' if not ids or ids[0] == image_token_id else ', not first'}: "
                         f"is <image> a special token of the tokenizer? ({text[:60]!r})")
    if len(ids) + 1 > seq_len:
        raise ValueError(f"{where}: {len(ids)} tokens + end-of-text do not fit in a row of {seq_len}: raise "
                         "--seq-len or shorten the text")
    return ids


def row_targets(tokens: list[int], seq_len: int, image_token_id: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one row of packed tokens: next-token targets, IGNORE after the last token and on
    markers, padded to seq_len."""
    idx = tokens + [EOT_ID] * (seq_len - len(tokens))
    tgt = tokens[1:] + [IGNORE] * (seq_len - len(tokens[1:]))
    return idx, [IGNORE if t == image_token_id else t for t in tgt]


def _assemble(rows: list[tuple[list[int], list[int]]], images: list[torch.Tensor], image_rows: list[int],
              text_rows: list[bool], pixel_shape: tuple[int, ...], n_examples: int) -> VisionBatch:
    idx_BT = torch.tensor([r[0] for r in rows], dtype=torch.long)
    targets_BT = torch.tensor([r[1] for r in rows], dtype=torch.long)
    pixels_ICHW = (torch.stack([p.to(torch.float32) for p in images]) if images
                   else torch.zeros((0, *pixel_shape), dtype=torch.float32))
    return VisionBatch(idx_BT, targets_BT, pixels_ICHW, torch.tensor(image_rows, dtype=torch.long),
                       torch.tensor(text_rows, dtype=torch.bool), n_examples)


def pack(examples: Sequence, encode: Callable[[str], list[int]], image_token_id: int, seq_len: int,
         rows: int) -> VisionBatch:
    """Pack examples, in order, into `rows` rows of `seq_len` tokens; `n_examples` says how many fitted (the
    caller continues from there)."""
    if not examples:
        raise ValueError("pack: no examples")
    if rows < 1 or seq_len < 2:
        raise ValueError(f"pack: rows ({rows}) must be >= 1 and seq_len ({seq_len}) >= 2")
    packed: list[list[int]] = [[] for _ in range(rows)]
    images, image_rows = [], []
    r = 0
    for i, ex in enumerate(examples):
        text, pixels = _text_and_pixels(ex)
        ids = encode_example(text, encode, image_token_id, seq_len, getattr(ex, "source", f"example {i}"))
        if len(packed[r]) + len(ids) + 1 > seq_len:
            r += 1
            if r == rows:
                break
        packed[r] += ids + [EOT_ID]
        images.append(pixels)
        image_rows.append(r)
    out = [row_targets(t, seq_len, image_token_id) for t in packed]
    return _assemble(out, images, image_rows, [False] * rows, tuple(images[0].shape), len(images))


class VisionSampler:
    """Endless batches: image-text rows packed from shuffled examples (a fresh permutation per epoch), and with
    probability `text_mix` per row a plain-text row from `text_window()`, a callable returning one
    (idx_T, targets_T) window of seq_len tokens, e.g. from the stage-1 Mixture:

        text_window = lambda: tuple(t[0] for t in mixture.next_batch(1)[:2])
    """

    def __init__(self, examples: Sequence, encode: Callable[[str], list[int]], image_token_id: int, seq_len: int,
                 rows: int, text_window: Callable[[], tuple] | None = None, text_mix: float = 0.0, seed: int = 0):
        if not examples:
            raise ValueError("VisionSampler: no image-text examples")
        if not 0.0 <= text_mix < 1.0:
            raise ValueError(f"text_mix must be in [0, 1), got {text_mix!r}")
        if text_mix > 0 and text_window is None:
            raise ValueError("text_mix > 0 needs text_window, a callable giving (idx_T, targets_T) text windows")
        if rows < 1 or seq_len < 2:
            raise ValueError(f"VisionSampler: rows ({rows}) must be >= 1 and seq_len ({seq_len}) >= 2")
        self.examples, self.image_token_id, self.seq_len, self.rows = examples, image_token_id, seq_len, rows
        self.text_window, self.text_mix, self.seed = text_window, text_mix, seed
        self.ids = [encode_example(_text_and_pixels(ex)[0], encode, image_token_id, seq_len,
                                   getattr(ex, "source", f"example {i}")) for i, ex in enumerate(examples)]
        self.pixel_shape = tuple(_text_and_pixels(examples[0])[1].shape)
        self.step = self.epoch = self.pos = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, np.random.default_rng([self.seed, 0x5EE1, self.epoch]).permutation(len(self.ids)))
        return self._perm[1]

    def _image_row(self, images: list, image_rows: list[int], r: int) -> list[int]:
        tokens: list[int] = []
        while True:
            i = int(self._order()[self.pos])
            if len(tokens) + len(self.ids[i]) + 1 > self.seq_len:
                return tokens  # never empty: every example fits in an empty row (checked in __init__)
            tokens += self.ids[i] + [EOT_ID]
            images.append(_text_and_pixels(self.examples[i])[1])
            image_rows.append(r)
            self.pos += 1
            if self.pos == len(self.ids):
                self.epoch, self.pos = self.epoch + 1, 0

    def _text_row(self) -> tuple[list[int], list[int]]:
        idx_T, targets_T = (torch.as_tensor(np.asarray(t)).long().reshape(-1) for t in self.text_window())
        if idx_T.numel() != self.seq_len or targets_T.numel() != self.seq_len:
            raise ValueError(f"text_window gave {idx_T.numel()} inputs and {targets_T.numel()} targets; each row "
                             f"needs seq_len = {self.seq_len}")
        if bool((idx_T == self.image_token_id).any()):
            raise ValueError(f"a text row holds the image marker (id {self.image_token_id}) with no image: the "
                             "text data was tokenized with <image> in it; remove it from the text")
        tgt = targets_T.masked_fill(targets_T == self.image_token_id, IGNORE)
        return idx_T.tolist(), tgt.tolist()

    def next_batch(self) -> VisionBatch:
        is_text = np.random.default_rng([self.seed, 0x7E27, self.step]).random(self.rows) < self.text_mix
        rows, images, image_rows = [], [], []
        for r in range(self.rows):
            if is_text[r]:
                rows.append(self._text_row())
            else:
                rows.append(row_targets(self._image_row(images, image_rows, r), self.seq_len, self.image_token_id))
        self.step += 1
        return _assemble(rows, images, image_rows, is_text.tolist(), self.pixel_shape, len(images))

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.pos = int(state["step"]), int(state["epoch"]), int(state["pos"])


__all__ = ["EOT_ID", "IGNORE", "VisionBatch", "VisionSampler", "encode_example", "pack",
           "row_targets"]
