"""Forward + backward time of moekit's MoE layer against its two baselines, measured in the same run.

    python bench/moe_layer.py [--tokens 4096] [--repeats 7] [--dtypes fp32,bf16]

At the gpt4-mini shape (d_model 512, 16 experts of 2,048 hidden, top-2) and a training-size batch:
- vs a dense MLP with the same *active* parameters (hidden = top_k x d_ff): the ideal a sparse layer
  can approach, since it does the same matmul FLOPs per token with no routing;
- vs Hugging Face transformers' `MixtralSparseMoeBlock` holding identical weights (SwiGLU, since
  Mixtral's experts are gated), in each of its expert implementations available on this machine.
Prints one JSON object: median milliseconds per forward + backward and the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from moekit.model.moe import MLP, MoE
from moekit.presets import get_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of forward + backward per function, measured in turns (A, B, C, A, B, C, ...) so that
    a change in the machine's load hits every candidate alike; two warm-up rounds first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats + 2):
        for name, fn in fns.items():
            x.grad = None
            sync(x.device)
            t0 = time.perf_counter()
            y = fn(x)
            y.backward(torch.ones_like(y))
            sync(x.device)
            if i >= 2:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def hf_block(moe: MoE, implementation: str):
    """transformers' Mixtral sparse-MoE block with the same weights as `moe` (SwiGLU)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, F, D = moe.experts.w1.shape
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=moe.top_k)
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        # HF stores (E, 2F, D) = [gate; up] and (E, D, F): (E, out, in), as moekit does.
        ex = moe.experts
        block.experts.gate_up_proj.copy_(torch.cat([ex.w1, ex.w3], dim=1))
        block.experts.down_proj.copy_(ex.w2)
        x = torch.randn(1, 64, D)  # same weights, same function: check before timing anything
        torch.testing.assert_close(block(x), moe(x)[0], rtol=1e-4, atol=1e-5)
    return block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per batch (e.g. 4 x 1024)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = get_preset("gpt4-mini")
    E, K, D, F = base.n_expert, base.top_k, base.d_model, base.d_ff
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {"shape": {"tokens": args.tokens, "d_model": D, "n_expert": E, "top_k": K, "d_ff": F},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "device": where,
              "ms_fwd_bwd": {}, "ratios": {}}
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        x = torch.randn(args.tokens // 1024 or 1, min(args.tokens, 1024), D)
        x = x.to(device, dtype).requires_grad_()
        fns, ms = {}, {}
        for mlp in ("gelu", "swiglu"):
            cfg = base.replace(mlp=mlp)
            moe = MoE(cfg)
            for p in moe.parameters():
                torch.nn.init.normal_(p, std=0.02)
            # The equal-active dense MLP: same matmul FLOPs per token as top_k experts.
            dense = MLP(cfg.replace(n_expert=1, top_k=1), K * F).to(device, dtype)
            if mlp == "swiglu":
                for impl in ("eager", "grouped_mm", "batched_mm"):
                    gib = args.tokens * K * 3 * D * F * x.element_size() / 2**30
                    if impl == "batched_mm" and gib > 8:  # it copies every token's expert weights
                        ms[f"hf_mixtral_{impl}"] = f"skipped: would gather {gib:.0f} GiB of weight copies"
                        continue
                    try:
                        fns[f"hf_mixtral_{impl}"] = hf_block(moe, impl).to(device, dtype)
                    except Exception as e:  # an implementation this torch/CPU lacks
                        ms[f"hf_mixtral_{impl}"] = f"unavailable: {type(e).__name__}: {str(e)[:80]}"
            moe.to(device, dtype)
            fns[f"moe_{mlp}"] = lambda t, m=moe: m(t)[0]
            fns[f"dense_{mlp}"] = lambda t, m=dense: m(t)[0]
        ms.update(time_round_robin(fns, x, args.repeats))
        result["ms_fwd_bwd"][dname] = {k: round(v, 2) if isinstance(v, float) else v for k, v in ms.items()}
        r = {"moe_over_dense_gelu": ms["moe_gelu"] / ms["dense_gelu"],
             "moe_over_dense_swiglu": ms["moe_swiglu"] / ms["dense_swiglu"]}
        for impl in ("eager", "batched_mm", "grouped_mm"):
            if isinstance(ms.get(f"hf_mixtral_{impl}"), float):
                r[f"speedup_vs_hf_{impl}"] = ms[f"hf_mixtral_{impl}"] / ms["moe_swiglu"]
        result["ratios"][dname] = {k: round(v, 3) for k, v in r.items()}
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
