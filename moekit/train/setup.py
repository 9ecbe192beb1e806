"""The set-up both training stages share: the run folder checked before anything is written, then created;
the text data prepared (sources -> tokenizer -> token caches -> packed mixture + validation windows).

Used by `moekit train` (moekit/train/cli.py) and its stage 2, `--vision` (moekit/train/vision_stage.py).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch

from moekit.train.checkpoint import CKPT_DIR
from moekit.train.config import TrainConfig
from moekit.train.corpus import resolve_sources
from moekit.train.data import Mixture, PackedSource, tokenize_cached, val_windows
from moekit.train.tokenizer import cached_tokenizer, load_tokenizer, token_bytes, tokenizer_hash


# ---- checks before anything is written -----------------------------------------------------------------
def is_run(path: Path) -> bool:
    return (path / "train_config.json").is_file() or (path / CKPT_DIR).is_dir()


def check_out_dir(out: Path, overwrite: bool) -> None:
    """`out` must be a new or empty folder (or an old run with --overwrite) under a writable parent."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not (overwrite and is_run(out)):
            what = "holds a run" if is_run(out) else "is not empty"
            raise ValueError(f"--out {out} {what}: continue it with --resume {out}, choose another --out, or "
                             "pass --overwrite to replace a run")
        target = out
    else:
        target = out.parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise ValueError(f"cannot create --out {out}: {target} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {target}: choose a writable --out")


def create_out_dir(out: Path, overwrite: bool) -> None:
    if overwrite and out.is_dir() and is_run(out):
        for name in ("checkpoints", "metrics.jsonl", "model.safetensors", "config.json", "train_config.json",
                     "tokenizer.json"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to --out {out} ({e.strerror}): choose a writable folder") from None


@dataclasses.dataclass
class Prepared:
    tokenizer: object
    tokenizer_json: str
    mixture: Mixture
    val: dict
    token_bytes_V: torch.Tensor
    fingerprints: dict


def prepare_data(tc: TrainConfig, seq_len: int, vocab_size: int, tokenizer_path: str | None, log) -> Prepared:
    """Sources -> tokenizer -> token caches -> packed mixture + validation windows (writes only the cache)."""
    sources = resolve_sources(tc.data)
    t0 = time.perf_counter()
    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
    else:
        tok, _ = cached_tokenizer(sources, tc.val_fraction, vocab_size, log=log)
    th = tokenizer_hash(tok)
    packed, val = [], {}
    for s in sources:
        train_tokens = tokenize_cached(s, "train", tc.val_fraction, tok, th)
        val_tokens = tokenize_cached(s, "val", tc.val_fraction, tok, th)
        packed.append(PackedSource(s.name, s.epochs, train_tokens, seq_len))
        val[s.name] = val_windows(val_tokens, seq_len, tc.eval_tokens)
        log(f"data {s.name}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens, {s.epochs:g} epochs "
            f"({s.path})")
    mixture = Mixture(packed, tc.seed)
    log("mixture: " + ", ".join(f"{p.name} {100 * w:.1f}%" for p, w in zip(packed, mixture.probs, strict=True))
        + f" of sequences (tokens x epochs); data ready in {time.perf_counter() - t0:.1f}s")
    return Prepared(tok, tok.to_str(pretty=True), mixture, val, torch.from_numpy(token_bytes(tok)),
                    {s.name: s.fingerprint() for s in sources})
