"""Context extension as GPT-4 did it (8k -> 32k, "a fine-tune of the 8k model", SPEC section 2): validation
loss at a 4x longer context before and after `moekit train --init-from RUN --seq-len N`.

    python bench/context_extension.py [--run runs/tiny] [--factor 4] [--finetune-steps 100]

Without --run (or if it does not exist) a base run of the tiny preset is trained first
(--base-steps). The base's validation stream is cut into windows of the long length and scored:
  1. the base model as it is (positions beyond its training length: extrapolation),
  2. the base weights with RoPE position interpolation (Chen et al. 2023), no training,
  3. after a short fine-tune at the long length with interpolation (what `--init-from` does),
and, for reference, the base and the fine-tuned model at the base length. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.cli import main as moekit_main
from moekit.config import ModelConfig
from moekit.model.transformer import Transformer
from moekit.train.checkpoint import load_model_tensors, model_tensors
from moekit.train.cli import extend_context
from moekit.train.config import TrainConfig
from moekit.train.corpus import resolve_sources
from moekit.train.data import tokenize_cached, val_windows
from moekit.train.loop import amp_dtype, evaluate
from moekit.train.sample import load_run
from moekit.train.tokenizer import token_bytes, tokenizer_hash


def cli(argv: list[str]) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # training logs to stderr; stdout is the JSON
        code = moekit_main(argv)
    if code:
        raise SystemExit(f"`moekit {' '.join(argv)}` failed with exit code {code}")


def with_config(model: Transformer, cfg: ModelConfig) -> Transformer:
    """The same weights under another config (longer context, RoPE scaling): RoPE has no parameters."""
    other = Transformer(cfg)
    load_model_tensors(other, model_tensors(model), "base weights")
    return other.eval()


def score(model: Transformer, run: Path, tok, seq_len: int, eval_tokens: int) -> dict:
    tc = TrainConfig.load(run / "train_config.json")
    th = tokenizer_hash(tok)
    val = {s.name: val_windows(tokenize_cached(s, "val", tc.val_fraction, tok, th, progress=False), seq_len,
                               eval_tokens) for s in resolve_sources(tc.data)}
    dtype = amp_dtype("auto", torch.device("cpu"))
    res = evaluate(model, val, torch.from_numpy(token_bytes(tok)), max(1, 8192 // seq_len), torch.device("cpu"),
                   dtype)
    return {"loss": res["all"]["loss"], "bpb": res["all"]["bpb"], "tokens": res["all"]["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/tiny", help="the base run (trained first if missing)")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--factor", type=int, default=4, help="long length = factor x the base's max_seq_len")
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=32_768, help="validation tokens per source")
    ap.add_argument("--out", help="where the base (if trained) and the fine-tune go (default: temporary)")
    args = ap.parse_args()

    work = Path(args.out or tempfile.mkdtemp(prefix="context_extension-"))
    base_dir = Path(args.run)
    t0 = time.perf_counter()
    if not (base_dir / "config.json").is_file():
        base_dir = work / "base"
        cli(["train", "--steps", str(args.base_steps), "--batch-tokens", str(args.batch_tokens),
             "--batch-tokens-start", str(args.batch_tokens // 4), "--batch-ramp-tokens", str(32 * args.batch_tokens),
             "--no-progress", "--out", str(base_dir)])
    base, tok, base_step = load_run(base_dir, log=lambda m: print(m, file=sys.stderr))
    short = base.cfg.max_seq_len
    long = args.factor * short
    long_dir = work / f"long-{long}"
    data = [a for spec in TrainConfig.load(base_dir / "train_config.json").data for a in ("--data", spec)]
    cli(["train", "--init-from", str(base_dir), *data, "--seq-len", str(long), "--steps", str(args.finetune_steps),
         "--batch-tokens", str(max(args.batch_tokens, long)), "--warmup-steps", "10", "--eval-every", "0",
         "--save-every", "0", "--no-progress", "--out", str(long_dir)])
    tuned, _, _ = load_run(long_dir, log=lambda m: print(m, file=sys.stderr))

    as_is = with_config(base, base.cfg.replace(max_seq_len=long))
    interpolated = with_config(base, extend_context(base.cfg, long))
    result = {
        "bench": "context_extension", "base_run": str(base_dir), "base_step": base_step,
        "base_seq_len": short, "long_seq_len": long, "rope_scaling": tuned.cfg.rope_scaling,
        "finetune_steps": args.finetune_steps, "finetune_tokens": args.finetune_steps * max(args.batch_tokens, long),
        "at_base_length": {"base": score(base, base_dir, tok, short, args.eval_tokens),
                           "finetuned": score(tuned, base_dir, tok, short, args.eval_tokens)},
        "at_long_length": {"base_extrapolating": score(as_is, base_dir, tok, long, args.eval_tokens),
                           "base_interpolated_no_training": score(interpolated, base_dir, tok, long, args.eval_tokens),
                           "finetuned_interpolated": score(tuned, base_dir, tok, long, args.eval_tokens)},
    }
    at_long = result["at_long_length"]
    result["long_loss_drop_from_finetune"] = at_long["base_extrapolating"]["loss"] - \
        at_long["finetuned_interpolated"]["loss"]
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
