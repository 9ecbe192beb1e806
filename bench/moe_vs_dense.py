"""The article's case for MoE: more parameters for the same FLOPs. A tiny MoE against a dense model with
the same *active* parameters, trained for the same steps on the same tokens of the embedded corpus.

    python bench/moe_vs_dense.py [--steps 300] [--batch-tokens 4096] [--preset tiny]

The dense model replaces each layer's E experts of hidden size F (top-k routed) by one MLP of
hidden size k x F: per token it does the same matmul FLOPs as the MoE (SPEC section 1: "sparsity
is the way out: total parameters grow, the parameters read per token do not"), but has E/k times
fewer MLP parameters. Both runs use `moekit train` itself (same seed, data order, schedule), so
they see exactly the same tokens. Prints one JSON object with both validation losses; whichever
way it goes is the result.
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
from moekit.counts import count_params
from moekit.presets import get_preset
from moekit.resolve import apply_overrides
from moekit.train.metrics import read_metrics, train_flops_per_token


def train(out: Path, overrides: list[str], args: argparse.Namespace) -> dict:
    argv = ["train", "--preset", args.preset, *overrides, "--steps", str(args.steps), "--batch-tokens",
            str(args.batch_tokens), "--batch-tokens-start", str(args.batch_tokens // 4), "--batch-ramp-tokens",
            str(args.batch_tokens * 32), "--lr", str(args.lr), "--eval-every", "0", "--save-every", "0",
            "--log-every", "50", "--no-progress", "--out", str(out), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # training logs to stderr; stdout is the JSON
        code = moekit_main(argv)
    if code:
        raise SystemExit(f"training failed with exit code {code}: {' '.join(argv)}")
    records = read_metrics(out / "metrics.jsonl")
    final_eval = [r["eval"] for r in records if "eval" in r][-1]
    end = [r for r in records if r.get("event") == "end"][-1]
    return {"val_loss": final_eval["all"]["loss"], "val_bpb": final_eval["all"]["bpb"],
            "val_bpb_per_source": {k: v["bpb"] for k, v in final_eval.items() if k != "all"},
            "train_tokens": end["tokens"], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="folder for the two runs (default: a temporary one)")
    args = ap.parse_args()

    moe_cfg = get_preset(args.preset)
    if not moe_cfg.is_moe:
        raise SystemExit(f"--preset {args.preset} is not an MoE model")
    dense_over = {"n_expert": "1", "top_k": "1", "d_ff": str(moe_cfg.top_k * moe_cfg.d_ff)}
    dense_cfg = apply_overrides(moe_cfg, dense_over)
    root = Path(args.out or tempfile.mkdtemp(prefix="moe_vs_dense-"))
    result = {"bench": "moe_vs_dense", "preset": args.preset, "steps": args.steps,
              "batch_tokens": args.batch_tokens, "threads": torch.get_num_threads()}
    for name, cfg, over in (("moe", moe_cfg, []), ("dense", dense_cfg, [f"--{k}={v}" for k, v in dense_over.items()])):
        c = count_params(cfg)
        result[name] = {"params_total": c.total, "params_active": c.active,
                        "train_flops_per_token": train_flops_per_token(cfg, cfg.max_seq_len),
                        **train(root / name, over, args)}
    m, d = result["moe"], result["dense"]
    result["flops_ratio_moe_over_dense"] = m["train_flops_per_token"] / d["train_flops_per_token"]
    result["params_ratio_moe_over_dense"] = m["params_total"] / d["params_total"]
    result["val_loss_moe_minus_dense"] = m["val_loss"] - d["val_loss"]
    result["val_bpb_ratio_moe_over_dense"] = m["val_bpb"] / d["val_bpb"]
    result["wall_ratio_moe_over_dense"] = m["seconds"] / d["seconds"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
