"""What each of moekit's own serving workers holds and moves: `moekit plan serve --workers`.

    layout = worker_layout(cfg, tp=2, pp=2, dtype_bytes=4, kv_cache_gb=1.0)
    layout.ranks[3].weight_bytes, layout.num_blocks       # exact: tests/parallel/test_plan_serve_workers.py
    step_comm(cfg, tp=2, pp=2, tokens=16, logit_rows=16)  # payload bytes per stage rank, by kind
    prompt_comm(cfg, tp=2, pp=2, prompt_len=6000, chunk=2048)  # a whole prefill, chunk by chunk

`serve.py` models a GPU deployment (its expert parallelism adds attention-data-parallel groups, GPT-4's reported
layout); this module describes exactly what `moekit serve --tp T --pp P [--ep E]` runs (moekit/infer/worker.py,
driven by moekit/infer/executor.py), so that a test can compare it with the real workers byte for byte:

- world = tp x pp, global rank = stage x tp + tensor rank; stage p holds `layers_per_stage` consecutive layers
  (layout.py: the end stages fewer); stage 0 the embedding, the last stage the final norm and lm_head (its own
  copy when tied and pp > 1).
- tensor parallel as training's `apply_tensor_parallel` without sequence parallelism: wq/wo and the dense MLPs split,
  wk/wv split unless there is one KV head (MQA: replicated), norms and the router replicated, the embedding and
  lm_head split on the vocabulary, the experts on F, or with --ep (= tp) whole experts on E. Uneven splits follow
  torch's `chunk` (DTensor's Shard): ceil(n / tp) rows per rank, the last ranks fewer.
- KV cache: each worker fits `kv_cache_gb` to its own stage (its layers x its KV heads); the engine uses the
  fewest blocks any stage holds, capped at max_num_seqs full-length requests; each layer's cache has one extra
  slot (the CUDA-graph scratch slot, kv_cache.py).
- per step of N tokens and R logit rows, each rank of a stage: two all-reduces of N x D per layer (attention's wo,
  the MLP's or MoE's output), one more on the first stage (the vocabulary-split embedding), an all-gather of the
  logits on the last stage (R x V padded to tp x ceil(V / tp), DTensor's uneven all-gather); between stages each
  rank sends N x D to the same tensor rank of the next stage. Payloads as CollectiveCounter counts them.
- biased models (GPT-3 style, always dense) are the exception, measured: see `_row_parallel`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from moekit.config import ModelConfig
from moekit.plan.layout import check_parallel, layers_per_stage


def chunk(n: int, parts: int, r: int) -> int:
    """Rows of `n` that part `r` of `parts` holds under torch.chunk / DTensor Shard."""
    size = math.ceil(n / parts)
    return max(0, min(size, n - r * size))


def check_workers(cfg: ModelConfig, tp: int, pp: int, ep: int = 1) -> None:
    """The planner's degree checks plus the two the workers add (moekit/infer/worker.py `check_layout`)."""
    check_parallel(cfg, tp, pp, ep)
    # check_parallel lets tp be a multiple of a GQA model's KV heads (serve.py replicates them); the workers'
    # apply_tensor_parallel only splits KV heads tp divides, or replicates a single one (MQA).
    if cfg.n_kv_head > 1 and cfg.n_kv_head % tp:
        ok = [d for d in range(1, cfg.n_kv_head + 1)
              if all(x % d == 0 for x in (cfg.n_kv_head, cfg.n_head, cfg.d_ff, cfg.dense_d_ff))]
        raise ValueError(f"--tp {tp}: moekit's workers split the {cfg.n_kv_head} KV heads, so --tp must divide "
                         f"them: choose --tp from {', '.join(map(str, ok))}")
    if ep > 1 and ep != tp:
        raise ValueError(f"--ep {ep}: moekit's workers split the experts across the tensor-parallel ranks of each "
                         f"stage, so --ep must be 1 or equal --tp ({tp})")


@dataclass(frozen=True)
class WorkerRank:
    rank: int
    stage: int
    tensor_rank: int
    layers: tuple[int, int]  # [first, last + 1)
    params: int  # parameters held by this rank
    weight_bytes: int
    kv_heads: int  # KV heads this rank caches (MQA: 1 on every rank)
    kv_bytes_per_block: int
    kv_capacity_blocks: int  # blocks kv_cache_gb holds for this stage


@dataclass
class WorkerLayout:
    model: str
    tp: int
    pp: int
    ep: int
    dtype_bytes: int
    block_size: int
    num_blocks: int  # what the engine allocates on every worker
    ranks: list[WorkerRank] = field(default_factory=list)

    def kv_cache_bytes(self, rank: int) -> int:
        """Bytes of rank `rank`'s part of the cache: per owned layer K and V of (num_blocks x block + 1) slots."""
        w = self.ranks[rank]
        return w.kv_bytes_per_block // self.block_size * (self.num_blocks * self.block_size + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        for r, w in zip(d["ranks"], self.ranks, strict=True):
            r["kv_cache_bytes"] = self.kv_cache_bytes(w.rank)
        return d


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)  # RMSNorm: a weight; LayerNorm: + bias


def _rank_params(cfg: ModelConfig, tp: int, ep: int, t: int, layers: range, first: bool, last: bool) -> int:
    D, V = cfg.d_model, cfg.vocab_size
    kv_split = cfg.n_kv_head > 1
    n = 0
    if first:
        n += chunk(V, tp, t) * D
    if last:
        n += _norm_params(cfg)  # the final norm, replicated
        if not (cfg.tie_embeddings and first):
            n += chunk(V, tp, t) * D
    norm = _norm_params(cfg)
    q_local = chunk(cfg.q_dim, tp, t)
    kv_local = chunk(cfg.kv_dim, tp, t) if kv_split else cfg.kv_dim
    mats = 3 if cfg.mlp == "swiglu" else 2
    for i in layers:
        n += 2 * norm
        n += q_local * D + 2 * kv_local * D + D * q_local
        if cfg.bias:
            n += q_local + 2 * kv_local + D  # wo's bias is replicated (RowwiseParallel)
        if cfg.is_moe_layer(i):
            n += cfg.n_expert * D  # router
            if ep > 1:
                n += chunk(cfg.n_expert, ep, t) * mats * cfg.d_ff * D
            else:
                n += cfg.n_expert * mats * chunk(cfg.d_ff, tp, t) * D
        else:
            f = chunk(cfg.dense_d_ff, tp, t)
            n += mats * f * D
            if cfg.bias:
                n += (mats - 1) * f + D
    return n


def worker_layout(cfg: ModelConfig, tp: int = 1, pp: int = 1, ep: int = 1, *, dtype_bytes: int = 4,
                  kv_cache_gb: float = 1.0, block_size: int = 16, max_num_seqs: int = 256,
                  max_model_len: int | None = None) -> WorkerLayout:
    """Every rank's weights and KV cache for `moekit serve --tp tp --pp pp --ep ep` (engine defaults)."""
    check_workers(cfg, tp, pp, ep)
    ranks, first_layer = [], 0
    for p, n_layers in enumerate(layers_per_stage(cfg.n_layer, pp)):
        layers = range(first_layer, first_layer + n_layers)
        first_layer += n_layers
        kv_heads = cfg.n_kv_head // tp if cfg.n_kv_head % tp == 0 else 1
        per_block = 2 * n_layers * kv_heads * cfg.head_dim * dtype_bytes * block_size
        for t in range(tp):
            params = _rank_params(cfg, tp, ep, t, layers, p == 0, p == pp - 1)
            ranks.append(WorkerRank(p * tp + t, p, t, (layers.start, layers.stop), params, params * dtype_bytes,
                                    kv_heads, per_block, int(kv_cache_gb * 2**30 // per_block)))
    full = -(-min(cfg.max_seq_len, max_model_len or cfg.max_seq_len) // block_size)
    num_blocks = min(min(r.kv_capacity_blocks for r in ranks), max_num_seqs * full)
    return WorkerLayout(cfg.name, tp, pp, ep, dtype_bytes, block_size, num_blocks, ranks)


@dataclass(frozen=True)
class StageComm:
    stage: int
    payload: dict[str, int]  # bytes by kind (all_reduce, all_gather, p2p), one rank of the stage
    calls: dict[str, int]


def _row_parallel(cfg: ModelConfig, n_layers: int, tokens: int, b: int) -> list[tuple[str, int, int]]:
    """(kind, bytes, calls) of a stage's row-parallel outputs: attention's wo and the MLP's w2 (or the MoE's combine).

    Measured, not designed: a row-parallel nn.Linear *with a bias* under torch.inference_mode() (Worker.step) makes
    torch 2.14's DTensor all-gather both its input (N x in) and its weight (D x in) and compute the whole output on
    every rank, instead of one all-reduce of N x D (under torch.no_grad it is the all-reduce). Biased models are
    dense (config.py: experts have no bias), so that is wo (in = q_dim) and w2 (in = dense_d_ff), 4 gathers a layer.
    """
    if cfg.bias:
        return [("all_gather", n_layers * (tokens + cfg.d_model) * (cfg.q_dim + cfg.dense_d_ff) * b, 4 * n_layers)]
    return [("all_reduce", n_layers * 2 * tokens * cfg.d_model * b, 2 * n_layers)]


def step_comm(cfg: ModelConfig, tp: int, pp: int, ep: int = 1, *, tokens: int, logit_rows: int,
              dtype_bytes: int = 4) -> list[StageComm]:
    """The collectives one rank of each stage issues in a step of `tokens` tokens with `logit_rows` logits."""
    check_workers(cfg, tp, pp, ep)
    act = tokens * cfg.d_model * dtype_bytes  # the hidden states (1, N, D), in the model's dtype
    out = []
    for p, n_layers in enumerate(layers_per_stage(cfg.n_layer, pp)):
        ops: list[tuple[str, int, int]] = []  # (kind, bytes, calls)
        if tp > 1:
            if p == 0:  # the vocabulary-split embedding: each rank looks up its rows, the rest are zeros
                ops.append(("all_reduce", act, 1))
            ops += _row_parallel(cfg, n_layers, tokens, dtype_bytes)
            if p == pp - 1:  # lm_head's column-split logits, gathered (padded to equal shards) on every rank
                ops.append(("all_gather", logit_rows * math.ceil(cfg.vocab_size / tp) * tp * dtype_bytes, 1))
        ops += [("p2p", act, 1)] * ((p > 0) + (p < pp - 1))  # hidden states in from p - 1, out to p + 1
        payload: dict[str, int] = {}
        calls: dict[str, int] = {}
        for kind, nbytes, n in ops:
            payload[kind] = payload.get(kind, 0) + nbytes
            calls[kind] = calls.get(kind, 0) + n
        out.append(StageComm(p, payload, calls))
    return out


def prompt_comm(cfg: ModelConfig, tp: int, pp: int, ep: int = 1, *, prompt_len: int, chunk: int = 2048,
                dtype_bytes: int = 4) -> list[StageComm]:
    """One prompt's prefill, summed over its steps: the engine's chunked prefill (max_num_batched_tokens, 2048)
    computes at most `chunk` tokens a step, and only the last chunk asks for a logit row."""
    steps = [min(chunk, prompt_len - s) for s in range(0, prompt_len, chunk)]
    total = [StageComm(p, {}, {}) for p in range(pp)]
    for i, n in enumerate(steps):
        for acc, c in zip(total, step_comm(cfg, tp, pp, ep, tokens=n, logit_rows=int(i == len(steps) - 1),
                                           dtype_bytes=dtype_bytes), strict=True):
            for kind, v in c.payload.items():
                acc.payload[kind] = acc.payload.get(kind, 0) + v
                acc.calls[kind] = acc.calls.get(kind, 0) + c.calls[kind]
    return total


def _moved(c: StageComm) -> str:
    return ", ".join(f"{k} {v:,} ({c.calls[k]})" for k, v in c.payload.items()) or "none"


def format_workers(layout: WorkerLayout, decode: list[StageComm], tokens: int,
                   prefill: list[StageComm] | None = None, prompt_len: int = 0) -> str:
    """One line per stage (its tensor ranks differ only by the vocabulary's uneven split: the largest is shown)."""
    lines = [f"moekit workers: {layout.model}, tp {layout.tp} x pp {layout.pp}"
             + (f", ep {layout.ep}" if layout.ep > 1 else "") + f" = {layout.tp * layout.pp} processes, "
             f"{layout.num_blocks:,} KV blocks of {layout.block_size} tokens on every worker",
             "  stage layers  weights MiB/rank  KV MiB/rank   per step, one rank: payload bytes by kind (calls)"]
    for p in range(layout.pp):
        ws = [w for w in layout.ranks if w.stage == p]
        w = max(ws, key=lambda w: w.weight_bytes)
        lines.append(f"  {p:>5} {w.layers[0]:>3}-{w.layers[1] - 1:<3} {w.weight_bytes / 2**20:>16.2f} "
                     f"{layout.kv_cache_bytes(w.rank) / 2**20:>12.2f}   decode of {tokens}: {_moved(decode[p])}")
        if prefill is not None:
            lines.append(f"  {'':>36}   prefill of {prompt_len:,}: {_moved(prefill[p])}")
    return "\n".join(lines)


__all__ = ["StageComm", "WorkerLayout", "WorkerRank", "check_workers", "format_workers", "prompt_comm", "step_comm",
           "worker_layout"]
