"""Serving time from its parts on a datasheet GPU: the decode and prefill step of one pipeline stage, with the floors
and efficiencies real serving engines reach (vLLM, TensorRT-LLM; Databricks, "LLM Inference Performance Engineering:
Best Practices", 2023). `moekit plan serve` uses it for every datasheet entry; a measured entry (`moekit bench
hardware`, `is_measured`) is planned with its own figures by serve.py's plain roofline instead.

    from moekit.plan.serve_time import load_serve_constants, is_measured
    k = load_serve_constants()          # the fitted constants (serve_constants.json, calibrate_serve.py)
    k.stage_step(setup, stage, seqs=8, new_tokens=1, context=6144)   # a serve.StageStep

Per stage and micro-batch, on one GPU (s = the stage's share of the model; tokens = sequences x new tokens):
- memory = weights read / (HBM x `bandwidth` x the weight format's GEMV factor) + K/V read / (HBM x `attention` x
  occupancy). Weight-only int8/int4 GEMV dequantizes on the fly and reaches less of the bandwidth than bf16
  (`int8_gemv`, `int4_gemv`; gpt-fast's A100 table: int8 1.5x, int4 1.9x bf16's tokens/s, not 2x and 4x). Paged
  attention runs one thread block per (sequence, KV head, 512-token partition) (vLLM paged_attention_v2's grid):
  below one block per SM the kernel leaves SMs idle, so occupancy = min(1, blocks / SMs).
- compute = matmul FLOPs / (peak x matmul efficiency) + attention FLOPs / (peak x FlashAttention's share). The
  matmul efficiency is gemm.py's: the generation's measured ceiling (MAMF) x tile/wave quantization at the step's
  shape, so a 2k-token prefill chunk runs near the ceiling and a narrow expert GEMM far below it (batched prefill
  is compute-bound: no flat 0.7). FP8 W8A8 runs at `fp8` x the FP8 peak (less than twice bf16 in practice:
  quantize/dequantize and scaling around every GEMM).
- floors: `launch_us` per layer (the kernels of a CUDA-graph-launched decoder layer: norms, QKV, rotary, attention,
  projections, MLP), `expert_us` per expert a MoE layer runs (MoE dispatch: routing, permute, one grouped-GEMM
  group per expert touched), and each tensor-parallel all-reduce's latency `allreduce_us` x (1 + log2 tp) (NCCL's
  small-message latency grows with the steps of its ring/tree; gpt-fast's Llama-2-7B speeds up only 3.1x on 8
  GPUs), plus the roofline's bytes / link bandwidth; an expert-parallel all-to-all pays the latency of a 2 x ep
  all-reduce.
- per step: `step_us` (sampling, scheduling, detokenizing) once per token period.
The hardware entry's own overhead fields (`layer_overhead_us`, `expert_overhead_us`, `step_overhead_us`,
`seq_overhead_us`; 0 in the datasheet table) are added on top, so a user file can state more.
The constants are fitted on published measurements (calibration/serve.jsonl) by moekit/plan/calibrate_serve.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

from moekit.plan.gemm import MAMF, ceiling, flash_efficiency, generation, wave_efficiency
from moekit.plan.hardware import GPU
from moekit.plan.layout import Stage, kv_heads_per_gpu
from moekit.plan.stage_step import StageStep, expert_coverage, transfer

CONSTANTS_PATH = Path(__file__).with_name("serve_constants.json")
PARTITION = 512  # tokens per paged-attention partition (vLLM csrc/attention paged_attention_v2: PARTITION_SIZE 512)
ACT_BYTES = 2


def is_measured(hw: GPU) -> bool:
    """A `moekit bench hardware` entry (or a user file written like one): its figures are achieved, not peaks, so
    both efficiencies are 1; it is planned with them as they are, no datasheet floors or fitted factors on top."""
    return hw.flops_efficiency == 1 and hw.bandwidth_efficiency == 1


@dataclass(frozen=True)
class ServeConstants:
    """The serving model's free constants (module docstring), fitted on published measurements."""

    bandwidth: float = 0.8  # share of peak HBM bandwidth a bf16 decode GEMV reaches
    attention: float = 0.7  # share of peak HBM bandwidth paged attention reaches at full occupancy
    int8_gemv: float = 0.75  # weight-only int8 GEMV's bandwidth share relative to bf16's
    int4_gemv: float = 0.5  # weight-only int4 (grouped scales) relative to bf16's
    fp8: float = 0.7  # FP8 W8A8 matmul rate as a share of the FP8 peak, relative to bf16's share of its peak
    launch_us: float = 20.0  # per decoder layer per step
    expert_us: float = 5.0  # per expert a MoE layer runs per step
    allreduce_us: float = 8.0  # x (1 + log2 tp) per tensor-parallel all-reduce
    step_us: float = 100.0  # per token period
    fitted: str = ""
    rows: tuple[str, ...] = ()

    FREE = ("bandwidth", "attention", "int8_gemv", "int4_gemv", "fp8", "launch_us", "expert_us", "allreduce_us",
            "step_us")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = list(self.rows)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ServeConstants:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["rows"] = tuple(kw.get("rows", ()))
        return cls(**kw)

    def replace(self, **changes) -> ServeConstants:
        return ServeConstants(**{**asdict(self), "rows": self.rows, **changes})

    # ---- the parts ---------------------------------------------------------------------------------------
    def gemv_factor(self, dtype: str) -> float:
        return {"int8": self.int8_gemv, "int4": self.int4_gemv}.get(dtype, 1.0)

    def allreduce_s(self, tp: int) -> float:
        return self.allreduce_us * (1 + math.log2(tp)) * 1e-6 if tp > 1 else 0.0

    def matmul_rate(self, hw: GPU, dtype: str) -> float:
        """FLOP/s a large matmul reaches in `dtype` before wave quantization."""
        return hw.peak_flops(dtype) * ceiling(hw) * (self.fp8 if dtype == "fp8" else 1.0)

    def stage_step(self, s, st: Stage, seqs: float, new_tokens: int, context: float):
        """serve.stage_step's counterpart for a datasheet GPU (`s` is serve's _Setup)."""

        cfg, hw, tp, ep = s.cfg, s.hw, s.tp, s.ep
        tokens = seqs * new_tokens
        group_tokens = tokens / ep
        touched = expert_coverage(cfg.n_expert, cfg.top_k, tokens) / ep if cfg.is_moe else 0.0
        w_read = ((st.lm_head + st.dense) / tp + st.moe_layers * touched * st.expert_layer / tp) * s.w_bytes
        if st.embedding:
            w_read += group_tokens * cfg.d_model / tp * s.w_bytes
        kvh = kv_heads_per_gpu(cfg, tp)
        kv_read = (seqs / ep) * (context + new_tokens) * st.layers * 2 * kvh * cfg.head_dim * s.kv_bytes
        spec = MAMF.get(generation(hw) or "")
        sms = spec.sms if spec else 108
        blocks = (seqs / ep) * kvh * math.ceil((context + new_tokens) / PARTITION)
        occupancy = min(1.0, blocks / sms) if new_tokens == 1 else 1.0  # prefill runs FlashAttention's tiles
        memory_s = (w_read / (hw.bandwidth * self.bandwidth * self.gemv_factor(s.weight_dtype))
                    + kv_read / (hw.bandwidth * self.attention * max(occupancy, 1e-3)))
        # Matmuls at the step's shape: dense layers see the group's tokens, each expert its share of all of them.
        rate = self.matmul_rate(hw, s.compute_dtype)
        dense_flops = 2 * group_tokens * (st.lm_head + st.dense) / tp
        expert_flops = 2 * tokens * cfg.top_k / ep * st.moe_layers * st.expert_layer / tp
        attn_flops = group_tokens * 4 * st.layers * (context + new_tokens / 2) * cfg.q_dim / tp
        width = max(1, int(cfg.d_ff / tp))
        compute_s = dense_flops / (rate * _waves(group_tokens, width, spec.sms if spec else 0))
        if expert_flops:
            per_expert = tokens * cfg.top_k / max(cfg.n_expert, 1)
            n_groups = max(1, round(touched))
            compute_s += expert_flops / (rate * _waves(per_expert, width, spec.sms if spec else 0, n_groups))
        compute_s += attn_flops / (hw.peak_flops(s.compute_dtype) * flash_efficiency(hw)
                                   * (self.fp8 if s.compute_dtype == "fp8" else 1.0))
        lat = self.allreduce_s(tp)
        act = group_tokens * cfg.d_model * ACT_BYTES
        comm = 0.0
        if tp > 1:
            comm += 2 * st.layers * transfer(2 * (tp - 1) / tp * act, s.link(tp * ep), lat)
        if ep > 1:
            comm += 2 * st.moe_layers * transfer(act * cfg.top_k * (ep - 1) / ep / tp, s.link(tp * ep),
                                                  self.allreduce_s(2 * ep))
        hop = transfer(act / tp, s.link(tp * ep * s.pp), hw.hop_latency_us * 1e-6) if s.pp > 1 else 0.0
        overhead = (st.layers * (self.launch_us + hw.layer_overhead_us)
                    + st.moe_layers * touched * (self.expert_us + hw.expert_overhead_us)) * 1e-6
        flops = dense_flops + expert_flops + attn_flops
        return StageStep(stage=st.index, compute_s=compute_s, memory_s=memory_s, comm_s=comm, hop_s=hop,
                         flops=flops, bytes=w_read + kv_read, overhead_s=overhead)

    def step_s(self, hw: GPU, seqs: float) -> float:
        """Once per token period: the fitted floor plus the entry's own step and per-sequence fields."""
        return (self.step_us + hw.step_overhead_us + seqs * hw.seq_overhead_us) * 1e-6


def _waves(m: float, n: int, sms: int, count: int = 1) -> float:
    """Useful share of the tiles' work of `count` GEMMs of m x n outputs (gemm.py's wave model). Below 128 rows
    the kernel's tile shrinks to the rows (16, 32, 64: the skinny tiles cuBLAS and CUTLASS pick), so a decode GEMM
    of a few tokens pays for its padding to 16 rows, not to 256. Unknown GPUs (no SM count): 1."""
    if not sms:
        return 1.0
    m = max(1, math.ceil(m))
    if m >= 128:
        return wave_efficiency(m, n, sms, count)
    tm = max(16, 2 ** math.ceil(math.log2(m)))
    tiles = count * math.ceil(n / 128)
    return count * m * n / (math.ceil(tiles / sms) * sms * tm * 128)


@lru_cache(maxsize=4)
def load_serve_constants(path: str | Path = CONSTANTS_PATH) -> ServeConstants:
    """The fitted constants (moekit/plan/serve_constants.json); the generic defaults above if it is missing."""
    p = Path(path)
    if not p.is_file():
        return ServeConstants(fitted="not fitted (no serve_constants.json)")
    return ServeConstants.from_dict(json.loads(p.read_text()))


__all__ = ["CONSTANTS_PATH", "ServeConstants", "is_measured", "load_serve_constants"]
