"""Packing image-text examples into rows: markers and images in one order, whole examples only, next-token
targets with padding and markers ignored, Flamingo's image index against a plain loop, and the sampler that
mixes plain text rows in at the asked fraction, deterministically."""

import pytest
import torch

from moekit.model.vision import image_index as image_index_BT
from moekit.train.image_text import ImageTextExample, scene_examples
from moekit.train.scenes import IMAGE, SceneConfig, example_text, make_examples
from moekit.train.tokenizer import train_bpe
from moekit.train.vision_batch import IGNORE, VisionSampler, pack

CFG = SceneConfig(seed=2)


@pytest.fixture(scope="module")
def tok():
    """A tiny BPE trained on scene texts, with <image> added as a special token (what stage 2 does)."""
    t = train_bpe([example_text(ex) for ex in make_examples("train", 300, CFG)], 320)
    t.add_special_tokens([IMAGE])
    return t


@pytest.fixture(scope="module")
def marker(tok):
    return tok.token_to_id(IMAGE)


def encoder(tok):
    return lambda s: tok.encode(s, add_special_tokens=False).ids


def numbered(n: int, forms=("caption", "qa")) -> list[ImageTextExample]:
    """Scene examples whose pixels say which example they are (every value = its index)."""
    out = scene_examples("train", n, CFG, forms=forms)[:n]
    for i, ex in enumerate(out):
        ex.pixels_CHW = torch.full_like(ex.pixels_CHW, float(i))
    return out


# ---- oracles ------------------------------------------------------------------------------------------------------
def image_index_loop(idx_BT: torch.Tensor, marker: int) -> torch.Tensor:
    out = torch.full_like(idx_BT, -1)
    k = -1
    for b in range(idx_BT.shape[0]):
        current = -1
        for t in range(idx_BT.shape[1]):
            if int(idx_BT[b, t]) == marker:
                k += 1
                current = k
            out[b, t] = current
    return out


def row_examples(idx_T: torch.Tensor, target_T: torch.Tensor) -> list[list[int]]:
    """The examples of a packed row: token runs ended by end-of-text (0), up to the first ignored target run."""
    ids = idx_T.tolist()
    n = len(ids)
    while n > 0 and int(target_T[n - 1]) == IGNORE and ids[n - 1] == 0:
        n -= 1  # padding and the row's final end-of-text have no target
    out, cur = [], []
    for i in ids[:n + 1]:
        if i == 0:
            out.append(cur)
            cur = []
        else:
            cur.append(i)
    assert not cur
    return out


# ---- pack ---------------------------------------------------------------------------------------------------------
def test_marker_is_one_special_token(tok, marker):
    enc = encoder(tok)
    assert marker >= 257 and enc(IMAGE) == [marker]
    ids = enc(example_text(make_examples("val", 1, CFG)[0]))
    assert ids[0] == marker and ids.count(marker) == 1


def test_pack_whole_examples_in_order_with_their_images(tok, marker):
    examples, enc = numbered(30), encoder(tok)
    b = pack(examples, enc, marker, seq_len=96, rows=6)
    assert b.idx_BT.shape == b.targets_BT.shape == (6, 96) and b.idx_BT.dtype == b.targets_BT.dtype == torch.long
    n = b.n_examples
    assert 6 < n < 30  # several per row, and more than fit
    assert b.pixels_ICHW.shape == (n, 3, 32, 32) and b.pixels_ICHW.dtype == torch.float32
    # rows hold whole examples, in order, each beginning with its marker; concatenated they are the first n
    got, rows_of = [], []
    for r in range(6):
        for ids in row_examples(b.idx_BT[r], b.targets_BT[r]):
            assert ids[0] == marker and ids.count(marker) == 1
            got.append(ids)
            rows_of.append(r)
    assert got == [enc(ex.text) for ex in examples[:n]]
    assert b.image_rows.tolist() == rows_of
    # the k-th marker of the flattened batch is image k, and image k is example k's picture
    assert int((b.idx_BT == marker).sum()) == n
    assert b.pixels_ICHW[:, 0, 0, 0].tolist() == list(range(n))
    # an example that did not fit starts the next row: the space left in each row was too small for the next one
    for r in range(5):
        free = 96 - sum(len(ids) + 1 for ids, row in zip(got, rows_of, strict=True) if row == r)
        assert len(got[rows_of.index(r + 1)]) + 1 > free


def test_pack_targets(tok, marker):
    b = pack(numbered(12), encoder(tok), marker, seq_len=128, rows=3)
    for r in range(3):
        idx, tgt = b.idx_BT[r].tolist(), b.targets_BT[r].tolist()
        last = max(i for i, t in enumerate(tgt) if t != IGNORE) + 1  # the row's final end-of-text
        assert idx[last] == 0 and all(t == 0 for t in idx[last:]) and all(t == IGNORE for t in tgt[last:])
        for t in range(last):
            want = IGNORE if idx[t + 1] == marker else idx[t + 1]
            assert tgt[t] == want
        assert marker not in tgt
        n_here = int((b.image_rows == r).sum())
        assert tgt.count(0) == idx[:last + 1].count(0) == n_here  # every example's last token learns to end
    assert int((b.targets_BT != IGNORE).sum()) > 0.7 * int((b.idx_BT != 0).sum())  # all text, not only answers


def test_pack_too_long_and_bad_examples(tok, marker):
    enc, px = encoder(tok), torch.zeros(3, 32, 32)
    with pytest.raises(ValueError, match="do not fit in a row of 8"):
        pack(numbered(2), enc, marker, seq_len=8, rows=2)
    for text, match in [("a cat", "0 marker"), ("a <image> cat", "not first"), ("<image>a <image>", "2 marker")]:
        with pytest.raises(ValueError, match=match):
            pack([(text, px)], enc, marker, seq_len=64, rows=1)
    with pytest.raises(ValueError, match="no examples"):
        pack([], enc, marker, 64, 1)
    b = pack([("<image>a cat", px)], enc, marker, seq_len=64, rows=3)  # (text, pixels) pairs are accepted too
    assert b.n_examples == 1 and (b.targets_BT[1:] == IGNORE).all() and (b.idx_BT[1:] == 0).all()


def test_image_index_matches_the_loop(tok, marker):
    b = pack(numbered(40), encoder(tok), marker, seq_len=80, rows=8)
    got = image_index_BT(b.idx_BT, marker)
    assert got.dtype == torch.long and torch.equal(got, image_index_loop(b.idx_BT, marker))
    # every token of an example sees that example's own image (the marker comes first), padding the row's last
    for r in range(8):
        imgs = got[r][b.idx_BT[r] == marker].tolist()
        assert imgs == [i for i, row in enumerate(b.image_rows.tolist()) if row == r]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # random layouts: rows without markers, markers back to back, at the very end
        idx = torch.randint(0, 6, (5, 17), generator=g)
        idx[torch.rand(5, 17, generator=g) < 0.15] = 99
        idx[int(torch.randint(0, 5, (1,), generator=g))] = 1
        assert torch.equal(image_index_BT(idx, 99), image_index_loop(idx, 99))


# ---- the mixing sampler ------------------------------------------------------------------------------------------
def text_source(seq_len: int):
    """A text-window callable with its own counter (like the stage-1 Mixture): window k holds k."""
    k = [0]

    def window():
        k[0] += 1
        x = torch.arange(seq_len + 1) % 50 + 10 + k[0]
        return x[:-1], x[1:]
    return window


def make_sampler(tok, marker, seed=0, mix=0.25, examples=None):
    return VisionSampler(examples or numbered(50), encoder(tok), marker, seq_len=96, rows=8,
                         text_window=text_source(96), text_mix=mix, seed=seed)


def test_sampler_mixes_text_rows_at_the_fraction(tok, marker):
    s = make_sampler(tok, marker, mix=0.25)
    n_text = n_rows = 0
    for _ in range(60):
        b = s.next_batch()
        idx = image_index_BT(b.idx_BT, marker)
        for r in range(8):
            has_marker = bool((b.idx_BT[r] == marker).any())
            assert has_marker != bool(b.text_rows[r])
            if b.text_rows[r]:
                assert (idx[r] == -1).all()
                assert torch.equal(b.targets_BT[r, :-1], b.idx_BT[r, 1:])  # the window's own shifted targets
        assert b.pixels_ICHW.shape[0] == int((b.idx_BT == marker).sum()) == b.n_examples == len(b.image_rows)
        assert torch.equal(idx, image_index_loop(b.idx_BT, marker))
        n_text += int(b.text_rows.sum())
        n_rows += 8
    assert abs(n_text / n_rows - 0.25) < 0.06  # 480 rows: 4 standard deviations
    none = make_sampler(tok, marker, mix=0.0)
    assert not any(none.next_batch().text_rows.any() for _ in range(10))


def test_sampler_is_deterministic_and_resumes(tok, marker):
    a, b, c = make_sampler(tok, marker, seed=1), make_sampler(tok, marker, seed=1), make_sampler(tok, marker, seed=2)
    batches = [a.next_batch() for _ in range(6)]
    for x in batches:
        y = b.next_batch()
        assert torch.equal(x.idx_BT, y.idx_BT) and torch.equal(x.pixels_ICHW, y.pixels_ICHW)
    assert not all(torch.equal(x.idx_BT, c.next_batch().idx_BT) for x in batches)
    # resume from a state: the image rows continue exactly (the text source keeps its own state)
    state = a.state_dict()
    want = a.next_batch()
    d = make_sampler(tok, marker, seed=1)
    d.load_state_dict(state)
    got = d.next_batch()
    assert torch.equal(got.text_rows, want.text_rows) and torch.equal(got.pixels_ICHW, want.pixels_ICHW)
    assert torch.equal(got.idx_BT[~got.text_rows], want.idx_BT[~want.text_rows])


def test_sampler_epochs_cover_every_example_once(tok, marker):
    examples = numbered(30)
    s = VisionSampler(examples, encoder(tok), marker, seq_len=96, rows=4, seed=3)
    seen = []
    while len(seen) < 90:
        seen += s.next_batch().pixels_ICHW[:, 0, 0, 0].long().tolist()
    for e in range(3):
        assert sorted(seen[30 * e:30 * (e + 1)]) == list(range(30))
    assert seen[:30] != seen[30:60] != list(range(30))  # shuffled, afresh each epoch


def test_sampler_bad_input(tok, marker):
    enc, ex = encoder(tok), numbered(3)
    with pytest.raises(ValueError, match="needs text_window"):
        VisionSampler(ex, enc, marker, 96, 2, text_mix=0.5)
    with pytest.raises(ValueError, match="text_mix"):
        VisionSampler(ex, enc, marker, 96, 2, text_window=text_source(96), text_mix=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        VisionSampler(ex, enc, marker, 10, 2)
    short = VisionSampler(ex, enc, marker, 96, 4, text_window=text_source(50), text_mix=0.9)
    with pytest.raises(ValueError, match="seq_len = 96"):
        short.next_batch()
    marked = VisionSampler(ex, enc, marker, 96, 4, text_window=lambda: (torch.full((96,), marker),) * 2,
                           text_mix=0.9)
    with pytest.raises(ValueError, match="holds the image marker"):
        marked.next_batch()
