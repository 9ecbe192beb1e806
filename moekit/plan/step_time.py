"""A training step's time from its parts: matmuls, attention, memory-bound ops, recomputation, pipeline bubble,
exposed communication and the optimizer (Megatron's and Calculon's way: Narayanan et al. 2021, Korthikanti et al.
2022, Isaev et al. 2023). `moekit plan train` runs it unless `--mfu`/`--days` are given; MFU is then an output.

    from moekit.plan.step_time import step_time
    st = step_time(cfg, get_gpu("A100-80GB"), tp=8, pp=15, dp=208, micro_batches=36, seq_len=8192, ...)
    st.seconds, st.shares()       # one optimizer step, and the share of each part

Per pipeline rank and micro-batch of t = micro_batch x seq_len tokens (one tensor rank's view):
- matmuls: each layer's GEMMs at their shapes (fused QKV, output projection, MLP or the MoE's grouped experts with
  t x top_k x ep / E rows each, lm_head on the last stage) through moekit/plan/gemm.py's efficiency curve; the
  backward runs each as two GEMMs of the same FLOPs (input gradient, weight gradient) at their own shapes.
- attention: FlashAttention (causal, 2 b s^2 q_dim / tp FLOPs forward, 2.5x that backward: Dao 2023 section 3.2's
  five matmuls against two) at its achieved efficiency; or, `attention="unfused"` (Megatron before FlashAttention),
  the QK^T and AV batched GEMMs plus the s x s softmax/dropout traffic, 13 bytes per score forward (scores written
  and read 2 + 2, probabilities written and read 2 + 2, dropout mask 1, its output 2 + 2: the tensors of
  Korthikanti et al.'s 5 a s^2 b activation term), twice that backward.
- memory-bound ops (norms, activations, residuals, dropout, RoPE, router, MoE gather/scatter): `memory_traffic`
  (fitted) x the bytes autograd saves per token and layer (moekit/plan/activations.py) over HBM bandwidth
  forward, twice that backward; the last stage's fp32 vocabulary-parallel logits, 3 x 4 B x V / tp per token.
- recomputation (Korthikanti et al. 2022): full = one more forward of every layer (6ND -> 8ND); selective = the
  attention core again when unfused (their selective recomputation), the memory-bound ops again with FlashAttention
  (torchtitan's and moekit's op-level policy: matmul outputs kept); none = nothing.
- communication, from the bytes moekit/plan/comm.py counts for the rank and the links they cross (NVLink inside a
  node, the inter-node network across) at `comm_efficiency` (fitted) of the hardware table's bandwidth, plus a
  latency per call: tensor/sequence-parallel, expert all-to-all and pipeline sends are exposed (not overlapped:
  Megatron's default); the data-parallel gradient reduction overlaps the last micro-batch's backward except its
  last bucket (DDP's 25 MB); FSDP's weight gathers overlap the micro-batch they feed, except the first layer's;
  ZeRO-1's weight broadcast after the optimizer is exposed.
- pipeline: m micro-batches of the slowest rank's time, stretched by the schedule's bubble (train.py
  `pipeline_bubble`): step = m x t_micro / (1 - bubble).
- optimizer: memory-bound, the states each rank updates read and written once (2 x optimizer + gradient + weight
  bytes per parameter) over HBM bandwidth.
The fitted constants (`StepConstants`: a GEMM scale per GPU generation, the memory-traffic factor, the link
efficiency) live in moekit/plan/train_constants.json, written by moekit/plan/calibrate_train.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from moekit.config import ModelConfig
from moekit.plan.activations import activation_bytes
from moekit.plan.comm import StepComm, stage_layers, step_collectives
from moekit.plan.gemm import MAMF, flash_efficiency, gemm_seconds, generation
from moekit.plan.hardware import DTYPE_BYTES, GPU
from moekit.plan.layout import kv_heads_per_gpu, rank_stages
from moekit.plan.shards import get_precision

CONSTANTS_PATH = Path(__file__).with_name("train_constants.json")
ATTENTION = ("flash", "unfused")
BUCKET_BYTES = 25e6  # DDP's default bucket_cap_mb: the last bucket's reduction cannot overlap the backward
UNFUSED_SCORE_BYTES = 13  # bytes moved per attention score element forward (module docstring)
LOGIT_BYTES = 3 * 4  # fp32 logits written, read by the cross-entropy, their gradient written
PARTS = ("matmul", "attention", "memory_bound", "overhead", "recompute", "bubble", "tp_comm", "ep_comm", "pp_comm",
         "dp_comm", "optimizer")


@dataclass(frozen=True)
class StepConstants:
    """The model's few free constants (module docstring), fitted on published runs."""

    gemm_scale: dict[str, float]  # per GPU generation: achieved / MAMF of a training GEMM
    memory_traffic: float = 1.0  # bytes moved by memory-bound ops per byte of saved activations, forward
    comm_efficiency: float = 0.8  # achieved share of the table's link bandwidth
    fitted: str = ""  # when and on what (calibrate_train.py)
    rows: tuple[str, ...] = ()

    def scale(self, hw: GPU) -> float:
        """The GEMM scale for `hw`: its generation's; a generation without calibration rows gets their mean."""
        gen = generation(hw)
        if gen is None:
            return 1.0  # measured or user-given ceilings are used as they are
        if gen in self.gemm_scale:
            return self.gemm_scale[gen]
        return sum(self.gemm_scale.values()) / len(self.gemm_scale) if self.gemm_scale else 1.0

    def to_dict(self) -> dict:
        return {"gemm_scale": dict(self.gemm_scale), "memory_traffic": self.memory_traffic,
                "comm_efficiency": self.comm_efficiency, "fitted": self.fitted, "rows": list(self.rows)}


@lru_cache(maxsize=4)
def load_constants(path: str | Path = CONSTANTS_PATH) -> StepConstants:
    """The fitted constants (moekit/plan/train_constants.json); generic ones, 1 and 0.8, if it is missing."""
    p = Path(path)
    if not p.is_file():
        return StepConstants(gemm_scale={g: 1.0 for g in MAMF}, fitted="not fitted (no train_constants.json)")
    d = json.loads(p.read_text())
    return StepConstants(gemm_scale={k: float(v) for k, v in d["gemm_scale"].items()},
                         memory_traffic=float(d["memory_traffic"]), comm_efficiency=float(d["comm_efficiency"]),
                         fitted=str(d.get("fitted", "")), rows=tuple(d.get("rows", ())))


@dataclass
class StepTime:
    seconds: float  # one optimizer step
    micro_seconds: float  # the slowest pipeline rank's time per micro-batch
    parts: dict[str, float]  # seconds per step of each part (PARTS), on the slowest rank; they sum to `seconds`
    gemm_efficiency: float  # FLOP-weighted achieved / peak of that rank's matmuls, forward and backward
    rank: int  # that pipeline rank
    notes: list[str] = field(default_factory=list)

    def shares(self) -> dict[str, float]:
        return {k: v / self.seconds for k, v in self.parts.items()} if self.seconds else {}

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "micro_seconds": self.micro_seconds, "parts": self.parts,
                "shares": self.shares(), "gemm_efficiency": self.gemm_efficiency, "rank": self.rank,
                "notes": self.notes}


@dataclass
class _Micro:
    """One micro-batch's compute on one rank, seconds (communication apart)."""

    gemm_fwd: float = 0.0
    gemm_bwd: float = 0.0
    gemm_flops: float = 0.0  # forward + backward
    attn_fwd: float = 0.0
    attn_bwd: float = 0.0
    mem_fwd: float = 0.0
    mem_bwd: float = 0.0
    recompute: float = 0.0
    overhead: float = 0.0

    @property
    def total(self) -> float:
        return (self.gemm_fwd + self.gemm_bwd + self.attn_fwd + self.attn_bwd + self.mem_fwd + self.mem_bwd
                + self.recompute + self.overhead)

    @property
    def backward(self) -> float:
        return self.gemm_bwd + self.attn_bwd + self.mem_bwd + self.recompute


def layer_gemms(cfg: ModelConfig, moe: bool, t: int, tp: int, ep: int) -> list[tuple[float, float, float, int]]:
    """(m, n, k, count) of one layer's forward GEMMs on one tensor rank, m = t tokens."""
    d = cfg.d_model
    qkv = cfg.q_dim // tp + 2 * kv_heads_per_gpu(cfg, tp) * cfg.head_dim
    out = [(t, qkv, d, 1), (t, d, cfg.q_dim // tp, 1)]
    up = 2 if cfg.mlp == "swiglu" else 1  # w1 and w3 as one GEMM
    if moe:
        local = max(1, cfg.n_expert // ep)
        rows = max(1, round(t * cfg.top_k * ep / cfg.n_expert))  # tokens per local expert (balanced routing)
        f = cfg.d_ff // tp
        out += [(t, cfg.n_expert, d, 1), (rows, up * f, d, local), (rows, d, f, local)]
    else:
        f = cfg.dense_d_ff // tp
        out += [(t, up * f, d, 1), (t, d, f, 1)]
    return out


def _gemms_time(gemms: list, hw: GPU, scale: float, dtype: str) -> tuple[float, float, float]:
    """(forward, backward, FLOPs of both) of a list of forward GEMMs (m, n, k, count)."""
    fwd = bwd = flops = 0.0
    for m, n, k, c in gemms:
        fwd += gemm_seconds(m, n, k, hw, dtype=dtype, scale=scale, count=c)
        # backward: input gradient (m x n) @ (n x k) and weight gradient (k x m) @ (m x n)
        bwd += (gemm_seconds(m, k, n, hw, dtype=dtype, scale=scale, count=c)
                + gemm_seconds(k, n, m, hw, dtype=dtype, scale=scale, count=c))
        flops += 6 * m * n * k * c
    return fwd, bwd, flops


def _attention(cfg: ModelConfig, hw: GPU, b: int, s: int, tp: int, kind: str, scale: float,
               dtype: str) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's attention core for b sequences of s tokens on one tensor rank."""
    heads = cfg.n_head // tp
    if kind == "flash":
        flops = 2 * b * s * s * heads * cfg.head_dim  # QK^T and AV, 2 FLOPs per multiply-add, causal half
        rates = hw.attention_tflops.get(dtype) if generation(hw) is None else None
        if rates:  # a measured entry that timed this machine's attention (moekit/train_profile.py)
            return flops / (rates["fwd"] * 1e12), 2.5 * flops / (rates["bwd"] * 1e12)
        fwd = flops / (hw.peak_flops(dtype) * flash_efficiency(hw))
        return fwd, 2.5 * fwd
    hd, count = cfg.head_dim, b * heads
    gemm_f = (gemm_seconds(s, s, hd, hw, dtype=dtype, scale=scale, count=count)
              + gemm_seconds(s, hd, s, hw, dtype=dtype, scale=scale, count=count))
    scores = count * s * s * UNFUSED_SCORE_BYTES / (hw.bandwidth * hw.bandwidth_efficiency)
    return gemm_f + scores, 2 * (gemm_f + scores)


def _micro(cfg: ModelConfig, hw: GPU, layers: list[int], last: bool, *, b: int, s: int, tp: int, ep: int, sp: bool,
           recompute: str, attention: str, k: StepConstants, dtype: str) -> _Micro:
    scale, t, bw = k.scale(hw), b * s, hw.memory_bound_bandwidth
    act = DTYPE_BYTES[dtype] / 2  # activation_bytes counts bf16 activations; fp32 training keeps twice the bytes
    r = _Micro()
    for moe in (False, True):
        n = sum(cfg.is_moe_layer(i) == moe for i in layers)
        if not n:
            continue
        f, bk, fl = _gemms_time(layer_gemms(cfg, moe, t, tp, ep), hw, scale, dtype)
        af, ab = _attention(cfg, hw, b, s, tp, attention, scale, dtype)
        mf = k.memory_traffic * act * activation_bytes(cfg, moe, tp, sp) * t / bw
        r.gemm_fwd, r.gemm_bwd, r.gemm_flops = r.gemm_fwd + n * f, r.gemm_bwd + n * bk, r.gemm_flops + n * fl
        r.attn_fwd, r.attn_bwd = r.attn_fwd + n * af, r.attn_bwd + n * ab
        r.mem_fwd, r.mem_bwd = r.mem_fwd + n * mf, r.mem_bwd + 2 * n * mf
        if recompute == "full":
            r.recompute += n * (f + af + mf)
        elif recompute == "selective":
            r.recompute += n * (af if attention == "unfused" else mf)
    if last:
        vocab = math.ceil(cfg.vocab_size / tp)
        f, bk, fl = _gemms_time([(t, vocab, cfg.d_model, 1)], hw, scale, dtype)
        r.gemm_fwd, r.gemm_bwd, r.gemm_flops = r.gemm_fwd + f, r.gemm_bwd + bk, r.gemm_flops + fl
        r.mem_fwd += LOGIT_BYTES * vocab * t / bw
    r.overhead = 3 * len(layers) * hw.layer_overhead_us * 1e-6  # forward, backward: ~2 passes of kernels more
    return r


def _links(hw: GPU, *, tp: int, dp: int, pp: int, ep: int, eff: float) -> dict[str, float]:
    """Bytes/s per GPU, one direction, of the link each group's ring crosses (tp innermost, then dp, then pp:
    moekit/parallel/mesh.py): a group whose ranks fit in one node (the NVLink domain) uses NVLink."""
    node, nv, net = hw.gpus_per_node, hw.nvlink_gb_s * 1e9 * eff, hw.internode_gb_s * 1e9 * eff
    inside = {"tp": tp <= node, "dp": tp * dp <= node, "ep": tp * ep <= node, "edp": tp * dp <= node,
              "pp": tp * dp * pp <= node, "embedding": tp * dp * pp <= node}
    return {g: (nv if ok else net) for g, ok in inside.items()}


def _comm(c: StepComm, links: dict[str, float], hw: GPU) -> dict[str, float]:
    """Seconds per step of each class of the rank's collectives: tp, ep, pp (sends and the tied embedding), and the
    data-parallel ones apart: grad (gradient reductions), gather (FSDP weight gathers), after (ZeRO-1's broadcast
    and the small statistics reductions). Each call also costs its latency."""
    out = dict.fromkeys(("tp", "ep", "pp", "grad", "gather", "after", "grad_payload"), 0.0)
    for x in c.collectives:
        bw = links.get(x.group) or 0.0
        if not bw:
            continue
        latency = (hw.hop_latency_us if x.kind == "p2p" else hw.allreduce_latency_us) * 1e-6
        calls = x.calls if x.calls is not None else max(1, math.ceil(x.payload / BUCKET_BYTES))
        sec = x.wire / bw + calls * latency
        if x.group in ("tp", "ep"):
            out[x.group] += sec
        elif x.group in ("pp", "embedding"):
            out["pp"] += sec
        elif "gradients" in x.what and "norm" not in x.what and x.kind in ("all_reduce", "reduce_scatter"):
            out["grad"] += sec
            out["grad_payload"] += x.payload
        elif x.kind == "all_gather":
            out["gather"] += sec
        else:
            out["after"] += sec
    return out


def step_time(cfg: ModelConfig, hw: GPU, *, tp: int, pp: int, dp: int, ep: int = 1, zero: int = 1,
              micro_batches: int, micro_batch: int = 1, seq_len: int, recompute: str = "full",
              sequence_parallel: bool = True, schedule: str = "1f1b", stages_per_rank: int = 1,
              attention: str = "flash", precision: str = "mixed", optimizer_bytes: float = 0.0,
              bubble: float = 0.0, constants: StepConstants | None = None, dtype: str = "bf16") -> StepTime:
    """One optimizer step of `micro_batches` micro-batches per replica (module docstring). `optimizer_bytes`: the
    optimizer state on the fullest GPU (it updates it once per step); `bubble`: the schedule's idle share; `dtype`:
    the matmuls' and activations' (bf16 mixed precision; fp32 for a run without autocast)."""
    if attention not in ATTENTION:
        raise ValueError(f"--attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    k = constants or load_constants()
    prec = get_precision(precision)
    m, t = micro_batches, micro_batch * seq_len
    n_stages = pp * (2 if schedule == "zero-bubble" else stages_per_rank)
    links = _links(hw, tp=tp, dp=dp, pp=pp, ep=ep, eff=k.comm_efficiency)
    bw = hw.bandwidth * hw.bandwidth_efficiency
    # The optimizer: each updated parameter's states read and written, its gradient read, its weight written.
    opt = optimizer_bytes / prec.optimizer * (2 * prec.optimizer + prec.gradients + prec.weights) / bw

    ranks, seen = [], {}
    for r in range(pp):
        owned = rank_stages(pp, r, stages_per_rank, schedule)
        layers = [i for s in owned for i in stage_layers(cfg, n_stages, s)]
        key = (len(layers), sum(cfg.is_moe_layer(i) for i in layers), 0 in owned, n_stages - 1 in owned)
        if key not in seen:  # ranks alike in layers and ends cost alike: plan one of each
            micro = _micro(cfg, hw, layers, key[3], b=micro_batch, s=seq_len, tp=tp, ep=ep, sp=sequence_parallel,
                           recompute=recompute, attention=attention, k=k, dtype=dtype)
            comm = _comm(step_collectives(cfg, dp=dp, tp=tp, zero=zero, precision=precision, micro_batches=m,
                                          tokens_per_micro=t, sequence_parallel=sequence_parallel,
                                          recompute=recompute, pp=pp, stage=r, ep=ep,
                                          stages_per_rank=stages_per_rank, schedule=schedule), links, hw)
            seen[key] = (r, micro, comm, max(1, len(layers)))
        ranks.append(seen[key])
    # The pipeline runs at its slowest rank's pace (compute plus the exposed per-micro-batch communication).
    per_micro = [mi.total + (c["tp"] + c["ep"] + c["pp"]) / m for _, mi, c, _ in ranks]
    t_micro = max(per_micro)
    pipeline = m * t_micro / (1 - bubble)

    best = None
    for (r, mi, c, n_layers), own in zip(ranks, per_micro, strict=True):
        # Data parallelism: the gradient reduction hides behind the last micro-batch's backward but for its last
        # bucket; FSDP's gathers behind the micro-batch they feed but for the first layer's; the rest is exposed.
        last_bucket = c["grad"] * min(1.0, BUCKET_BYTES / c["grad_payload"]) if c["grad_payload"] else 0.0
        grad = max(last_bucket, c["grad"] - mi.backward)
        gather = m * (max(0.0, c["gather"] / m - mi.total) + c["gather"] / m / n_layers)
        dp_exposed = grad + gather + c["after"]
        total = pipeline + dp_exposed + opt
        if best is None or total > best[0]:
            best = (total, r, mi, c, dp_exposed, own)
    total, r, mi, c, dp_exposed, own = best
    parts = {"matmul": m * (mi.gemm_fwd + mi.gemm_bwd), "attention": m * (mi.attn_fwd + mi.attn_bwd),
             "memory_bound": m * (mi.mem_fwd + mi.mem_bwd), "overhead": m * mi.overhead,
             "recompute": m * mi.recompute, "bubble": pipeline - m * own, "tp_comm": c["tp"], "ep_comm": c["ep"],
             "pp_comm": c["pp"], "dp_comm": dp_exposed, "optimizer": opt}
    gemm_time = mi.gemm_fwd + mi.gemm_bwd
    eff = mi.gemm_flops / (gemm_time * hw.peak_flops(dtype)) if gemm_time else 0.0
    return StepTime(seconds=total, micro_seconds=t_micro, parts=parts, gemm_efficiency=eff, rank=r)


__all__ = ["ATTENTION", "CONSTANTS_PATH", "PARTS", "StepConstants", "StepTime", "load_constants", "step_time"]
