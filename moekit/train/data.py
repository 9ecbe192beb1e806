"""Tokens for training: a memory-mapped token cache, packing into sequences, and the epoch-weighted mixture.

1. `tokenize_cached` encodes a source's split once into `$MOEKIT_CACHE/tokens/<hash>.bin` (uint16 or
   uint32, read back with `np.memmap`); every document is preceded by `<|endoftext|>`, so packed
   sequences carry document separators (GPT-2/3 packing; no cross-document attention mask).
2. `PackedSource` cuts that stream into fixed windows of seq_len + 1 tokens (inputs and shifted
   targets); window j starts at token j x seq_len.
3. `Mixture` draws each training sequence from a source with probability proportional to
   tokens x epochs (GPT-4: 2 epochs of text, 4 of code; SPEC section 3), and within a source walks a
   fresh permutation of its windows every epoch. Its state is two integers per source, so a
   checkpoint restores the data position exactly.

Shape legend: B sequences, T tokens per sequence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from moekit.train.corpus import Source
from moekit.train.tokenizer import EOT, cache_dir
from moekit.util import atomic_write, atomic_write_text

CACHE_VERSION = "tokens-v1"
BLOCK = 1 << 16  # source choices are drawn in blocks of this many sequences, each from its own seed


def tokenize_cached(source: Source, split: str, val_fraction: float, tok: Tokenizer, tok_hash: str,
                    progress: bool = True) -> np.ndarray:
    """The split's token stream (EOT before every document) as a read-only memmap, encoded at most once."""
    key = hashlib.sha256(f"{CACHE_VERSION}\0{source.fingerprint()}\0{split}\0{val_fraction}\0{tok_hash}"
                         .encode()).hexdigest()[:24]
    folder = cache_dir() / "tokens"
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    if meta_path.is_file() and bin_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize > 0:
                return np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt
    docs = source.documents(split, val_fraction)
    eot = tok.token_to_id(EOT)
    n_tokens, n_bytes = 0, 0

    def write(tmp: str) -> None:
        nonlocal n_tokens, n_bytes
        with open(tmp, "wb") as f:
            for i in tqdm(range(0, len(docs), 256), desc=f"tokenize {source.name}/{split}", unit="batch",
                          disable=not progress or None, leave=False):
                batch = docs[i:i + 256]
                for enc in tok.encode_batch(batch, add_special_tokens=False):
                    ids = np.asarray([eot] + enc.ids, dtype=dtype)
                    f.write(ids.tobytes())
                    n_tokens += len(ids)
                n_bytes += sum(len(d.encode("utf-8")) for d in batch)

    try:
        atomic_write(bin_path, write)
        atomic_write_text(meta_path, json.dumps({"source": source.name, "path": source.path, "split": split,
                                                 "n_tokens": n_tokens, "n_bytes": n_bytes, "n_docs": len(docs),
                                                 "dtype": np.dtype(dtype).name}))
    except OSError as e:
        raise ValueError(f"cannot write the token cache {folder} ({e.strerror}): set MOEKIT_CACHE to a "
                         "writable folder") from None
    if n_tokens == 0:  # no documents in this split (np.memmap cannot map an empty file)
        return np.zeros(0, dtype=dtype)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))


@dataclass
class PackedSource:
    """A source's training stream cut into windows of seq_len + 1 tokens."""

    name: str
    epochs: float
    tokens: np.ndarray
    seq_len: int

    def __post_init__(self) -> None:
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(f"data source {self.name!r} has {len(self.tokens):,} training tokens, fewer than "
                             f"one sequence of {self.seq_len + 1:,}: add data or lower --seq-len")

    @property
    def n_seqs(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def window(self, j: int) -> np.ndarray:
        return np.asarray(self.tokens[j * self.seq_len: j * self.seq_len + self.seq_len + 1], dtype=np.int64)


def _seed_of(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


class Mixture:
    """Deterministic epoch-weighted sampling of training sequences (see the module docstring).

    Sequence i's source comes from a counter-based draw (block i // BLOCK has its own generator), so
    the whole state is `next_seq` and how many sequences each source has given (`taken`).
    """

    def __init__(self, sources: list[PackedSource], seed: int):
        if not sources:
            raise ValueError("no training data sources")
        self.sources, self.seed = sources, seed
        weight = np.array([s.n_seqs * s.epochs for s in sources], dtype=np.float64)
        self.probs = weight / weight.sum()  # tokens x epochs, normalized
        self.cum = np.cumsum(self.probs)
        self.cum[-1] = 1.0
        self.next_seq = 0
        self.taken = [0] * len(sources)
        self._block: tuple[int, np.ndarray] | None = None
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    def _choice(self, i: int) -> int:
        b = i // BLOCK
        if self._block is None or self._block[0] != b:
            u = np.random.default_rng([self.seed, 0x6D6978, b]).random(BLOCK)
            self._block = (b, np.searchsorted(self.cum, u, side="right"))
        return int(self._block[1][i % BLOCK])

    def _window_index(self, s: int, k: int) -> int:
        """Which window is source s's k-th: epoch k // n takes a fresh permutation of all n windows."""
        n = self.sources[s].n_seqs
        epoch = k // n
        if s not in self._perm or self._perm[s][0] != epoch:
            rng = np.random.default_rng([self.seed, _seed_of(self.sources[s].name), epoch])
            self._perm[s] = (epoch, rng.permutation(n))
        return int(self._perm[s][1][k % n])

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """n sequences as (inputs x_BT, targets y_BT) int64 tensors, and the source index of each."""
        rows, which = [], []
        for _ in range(n):
            s = self._choice(self.next_seq)
            rows.append(self.sources[s].window(self._window_index(s, self.taken[s])))
            self.taken[s] += 1
            self.next_seq += 1
            which.append(s)
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1], xy[:, 1:], which

    # ---- accounting and state ------------------------------------------------------------------
    def tokens_seen(self) -> dict[str, int]:
        return {s.name: k * s.seq_len for s, k in zip(self.sources, self.taken, strict=True)}

    def epochs_seen(self) -> dict[str, float]:
        return {s.name: k / s.n_seqs for s, k in zip(self.sources, self.taken, strict=True)}

    def state_dict(self) -> dict:
        return {"next_seq": self.next_seq, "taken": {s.name: k for s, k in zip(self.sources, self.taken, strict=True)}}

    def load_state_dict(self, state: dict) -> None:
        names = [s.name for s in self.sources]
        if sorted(state["taken"]) != sorted(names):
            raise ValueError(f"the checkpoint's data sources {sorted(state['taken'])} differ from this run's "
                             f"{sorted(names)}")
        self.next_seq = int(state["next_seq"])
        self.taken = [int(state["taken"][n]) for n in names]


def val_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> list[np.ndarray]:
    """Consecutive, non-overlapping validation windows of up to seq_len + 1 tokens, max_tokens in all.

    The first windows of the held-out stream, always the same ones: evaluations are comparable across
    steps and runs. A stream shorter than one window is used whole.
    """
    out, start = [], 0
    while start + 1 < len(tokens) and start < max_tokens:
        out.append(np.asarray(tokens[start: start + seq_len + 1], dtype=np.int64))
        start += seq_len
    return out

