"""The 2-rank worker of tests/parallel/test_tensor_parallel.py: spawned by it, one launch for the whole file.

Every rank trains the one-process references itself (same seed, same batches, no communication), then each
tensor-parallel layout from the same seed weights, and writes what it measured to `rank{r}.json`; the test file
asserts on those numbers, so a failure names its check instead of ending a process.

Why float64 as well as float32: AdamW divides each gradient by its own running RMS, so a weight whose gradient is
tiny (a sum that nearly cancels, or the key bias, whose true gradient is zero: softmax ignores a shift common to
every key) moves by ~lr whatever the gradient's size, and the gradient's rounding noise decides how. The fp32
one-process run is itself ~1e-4 (element-wise) away from the fp64 one after 5 steps, and reduction order differs
under TP, so fp32 weights cannot agree element-wise to 1e-5 in any layout. fp64 shows the layouts compute the same
function (~1e-13); fp32 shows the fp32 path gives the same losses and moves the weights no further from the one-
process run than fp32 rounding moves that run itself.
"""

from __future__ import annotations

import torch

STEPS, BATCH, SEQ, LR, CLIP = 5, 2, 16, 1e-2, 1.0
MODES = {"tp": (False, False), "tp_sp": (True, False), "tp_sp_lp": (True, True)}  # (sequence_parallel, loss_parallel)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def configs():
    from moekit.config import ModelConfig

    # MQA, SwiGLU, dense and MoE layers alternating; router losses weighted up so that their gradient path (the
    # 1/tp scaling in MoETensorParallel) matters.
    mqa_moe = ModelConfig(name="mqa_moe", vocab_size=64, n_layer=4, d_model=32, n_head=4, n_kv_head=1, d_ff=48,
                          n_expert=4, top_k=2, moe_every=2, mlp="swiglu", max_seq_len=32, aux_loss_coef=0.1,
                          z_loss_coef=0.01)
    # GQA, dense GELU, LayerNorm and biases, tied embeddings, and a vocabulary tp does not divide (cl100k's is odd).
    gqa_dense = ModelConfig(name="gqa_dense", vocab_size=65, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                            n_expert=1, mlp="gelu", norm="layernorm", bias=True, tie_embeddings=True, max_seq_len=32)
    return {"mqa_moe": mqa_moe, "gqa_dense": gqa_dense}


def build(cfg, dtype=torch.float32, dispatch: str = "auto"):
    from moekit.model.transformer import Transformer

    model = Transformer(cfg)
    model.init_weights(seed=1234)
    for moe in model.moe_layers():
        moe.dispatch = dispatch
    return model.to(dtype)


def batches(cfg):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(model, data, loss_parallel: bool) -> dict:
    from moekit.parallel.tensor import loss_context

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, routing, grad_layouts = [], [], []
    for step, tokens in enumerate(data):
        with loss_context(loss_parallel):
            out = model(tokens[:, :-1], tokens[:, 1:])
            out.loss.backward()
        if step == 0:  # every gradient in its parameter's layout (no Partial left for clipping or DDP)
            grad_layouts = [n for n, p in model.named_parameters()
                            if hasattr(p, "placements") and p.grad.placements != p.placements]
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        routing.append([[*r.tokens_per_expert_E.tolist(), int(r.dropped)] for r in out.routing])  # E counts, dropped
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for n, p in model.named_parameters()}
    return {"losses": losses, "routing": routing, "weights": weights, "bad_grad_layouts": grad_layouts,
            "loss_type": type(out.loss).__name__}


def shards(model, init: dict, rank: int, tp: int) -> dict:
    """Each parameter's local and full shape, and whether the local tensor is this rank's slice of the seed
    weights (torch.chunk along the sharded dimension, as DTensor's Shard splits, uneven sizes included)."""
    report = {}
    for n, p in model.named_parameters():
        local = p.to_local()
        dims = [pl.dim for pl in p.placements if pl.is_shard()]
        expected = init[n].chunk(tp, dims[0])[rank] if dims else init[n]
        report[n] = {"local": list(local.shape), "full": list(p.shape), "dim": dims[0] if dims else None,
                     "own_slice": bool(torch.equal(local, expected))}
    heads = {i: [b.attn.n_head, b.attn.n_kv_head] for i, b in model.blocks.items()}
    return {"params": report, "heads": heads}


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: element-wise, on the tensor's own scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(ref: dict, got: dict) -> dict:
    w0, w1 = ref["weights"], got["weights"]
    return {"loss_rel": [abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"], strict=True)],
            "weight_max": {n: rel_max(w1[n], w) for n, w in w0.items()},
            "weight_fro": {n: rel_fro(w1[n], w) for n, w in w0.items()},
            "routing_equal": ref["routing"] == got["routing"], "routing": got["routing"],
            "bad_grad_layouts": got["bad_grad_layouts"], "loss_type": got["loss_type"]}


def errors(model) -> dict:
    """The calls a tensor-parallel model refuses, with their messages."""
    out = {}
    for name, call in {"odd_seq": lambda: model(torch.zeros(1, 5, dtype=torch.long)),
                       "kv_cache": lambda: model(torch.zeros(1, 4, dtype=torch.long), ctx=object())}.items():
        try:
            call()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from spawn import rank_main

    rank_main(rank, world, init_file, out_dir, lambda result: check_layouts(result, rank, world))


def check_layouts(result: dict, rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from moekit.parallel.tensor import apply_tensor_parallel

    result.update(runs={}, shards={}, errors={})
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    for name, cfg in configs().items():
        data = batches(cfg)
        refs = {dt: train(build(cfg, dtype), data, False) for dt, dtype in DTYPES.items()}
        result["runs"][f"{name}/fp32/control"] = compare(refs["fp64"], refs["fp32"])  # fp32's own distance
        for dt, dtype in DTYPES.items():
            for mode, (sp, lp) in MODES.items():
                model = apply_tensor_parallel(build(cfg, dtype), mesh, sequence_parallel=sp, loss_parallel=lp)
                if dt == "fp32" and mode == "tp_sp":
                    init = {n: p.detach() for n, p in build(cfg).named_parameters()}
                    result["shards"][name] = shards(model, init, rank, world)
                    result["errors"][name] = errors(model)
                result["runs"][f"{name}/{dt}/{mode}"] = compare(refs[dt], train(model, data, lp))
        if cfg.is_moe:  # the other expert kernel (Experts.gather) and capacity dropping, on the full sequence
            cap = cfg.replace(capacity_factor=1.0)
            ref = train(build(cap, torch.float64, "gather"), data, False)
            model = apply_tensor_parallel(build(cap, torch.float64, "gather"), mesh, True, True)
            result["runs"][f"{name}/fp64/tp_sp_lp_gather_capacity"] = compare(ref, train(model, data, True))
