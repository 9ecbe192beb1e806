"""Byte-level BPE: trained with Hugging Face `tokenizers`, saved as `tokenizer.json`, cached by corpus hash.

The pre-tokenizer is GPT-4's (cl100k_base) split pattern followed by GPT-2's byte-level mapping,
the layout of Llama 3's tokenizer.json, so the file loads in Hugging Face as
`PreTrainedTokenizerFast(tokenizer_file=...)`. Every string round-trips: any byte sequence has a
spelling in the 256 byte tokens. `<|endoftext|>` (id 0) separates documents.

Trained tokenizers are cached under `$MOEKIT_CACHE/tokenizers/<hash>/` (default ~/.cache/moekit),
where the hash covers the training documents' fingerprints and the vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.util import atomic_write_text

EOT = "<|endoftext|>"
TOKENIZER_VERSION = "bpe-v1"
# cl100k_base's pre-tokenization regex (tiktoken): words, 1-3 digit groups, punctuation runs,
# newlines, whitespace runs; it keeps code indentation apart from the identifiers that follow.
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def cache_dir() -> Path:
    """Where tokenizers and token caches live: $MOEKIT_CACHE, else ~/.cache/moekit."""
    return Path(os.environ.get("MOEKIT_CACHE") or Path.home() / ".cache" / "moekit").expanduser()


def new_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` tokens at most (fewer if the corpus has fewer merges)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOT}) for a byte-level BPE, got {vocab_size}")
    tok = new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
    if tok.token_to_id(EOT) is None:
        raise ValueError(f"tokenizer {path} has no {EOT} token, which moekit needs to separate documents")
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def _capped(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    total = 0
    for d in docs:
        if total >= max_bytes:
            return
        total += len(d)
        yield d


def cached_tokenizer(sources: list, val_fraction: float, vocab_size: int, max_bytes: int = 64 << 20,
                     log=print) -> tuple[Tokenizer, Path]:
    """Train a BPE on the sources' training split, or reuse the one cached for the same inputs."""
    h = hashlib.sha256(f"{TOKENIZER_VERSION}\0{vocab_size}\0{val_fraction}\0{max_bytes}".encode())
    for s in sources:
        h.update(f"{s.name}\0{s.fingerprint()}\0".encode())
    path = cache_dir() / "tokenizers" / h.hexdigest()[:16] / "tokenizer.json"
    if path.is_file():
        try:
            return load_tokenizer(path), path
        except ValueError:
            log(f"tokenizer cache {path} is damaged; training again")
    t0 = time.perf_counter()

    def docs() -> Iterator[str]:
        # Round-robin over sources, so that a byte cap keeps every source represented.
        per_source = [iter(s.documents("train", val_fraction)) for s in sources]
        while per_source:
            for it in list(per_source):
                d = next(it, None)
                if d is None:
                    per_source.remove(it)
                else:
                    yield d

    tok = train_bpe(_capped(docs(), max_bytes), vocab_size)
    try:
        atomic_write_text(path, tok.to_str(pretty=True))
    except OSError as e:
        raise ValueError(f"cannot write the tokenizer cache {path.parent} ({e.strerror}): "
                         "set MOEKIT_CACHE to a writable folder") from None
    log(f"tokenizer: byte-level BPE of {tok.get_vocab_size():,} tokens trained in {time.perf_counter() - t0:.1f}s "
        f"-> {path}")
    return tok, path


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens): the denominator of bits per byte.

    For a byte-level BPE every character of a token's string is one byte (GPT-2's byte-to-unicode
    map), so the count is exact; for other tokenizers it falls back to decoding each id alone.
    """
    spec = json.loads(tok.to_str())
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    n = tok.get_vocab_size()
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if i in special:
            continue
        piece = tok.id_to_token(i)
        if piece is None:
            continue
        out[i] = len(piece) if byte_level else len(tok.decode([i]).encode("utf-8"))
    return out
