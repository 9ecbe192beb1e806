"""Achieved matmul and attention speed on a GPU: the efficiency curve the training-time model runs its GEMMs at.

    from moekit.plan.gemm import gemm_seconds, gemm_efficiency
    gemm_seconds(8192, 3072, 12288, get_gpu("A100-80GB"))          # one (M x K) @ (K x N) bf16 GEMM, seconds
    gemm_efficiency(8192, 3072, 12288, get_gpu("H100"))             # achieved / dense peak

A GEMM of M x N outputs over a reduction of K takes the longer of its compute and its memory traffic
(the roofline; NVIDIA, "Matrix Multiplication Background User's Guide", DU-09799-001, chapter 2):

- compute = 2 M N K / (peak x ceiling x wave efficiency x scale). The *ceiling* is the Maximum Achievable Matmul
  FLOPS of the GPU generation, measured on its best large shape, over the datasheet peak (`MAMF` below). The *wave
  efficiency* is the guide's chapter 3: the output is cut into 256 x 128 tiles, one per SM at a time, so a GEMM
  whose tile count is just above a multiple of the SM count runs a nearly empty last wave (tile and wave
  quantization); small GEMMs (an MoE expert's few hundred tokens, a narrow tensor-parallel shard) lose most.
  `scale` is the one fitted constant per generation (moekit/plan/calibrate_train.py): what end-to-end training
  reaches of the MAMF (sustained clocks under power, cuBLAS heuristics picking other tiles, the GEMM shapes of real
  layers).
- memory = (M K + K N + M N) x bytes / (HBM bandwidth x the hardware entry's `bandwidth_efficiency`).

A GPU the tables do not know (a user hardware file) gets its entry's `flops_efficiency` as the ceiling and no wave
model; a measured `--gpu local` entry (`flops_efficiency` 1) is its own ceiling: what `moekit bench hardware` timed.

Attention (FlashAttention, which fuses the s x s scores into on-chip tiles) runs at its own achieved share of the
peak (`FLASH`): Dao 2023 (FlashAttention-2, arXiv:2307.08691, abstract) reaches 50-73% of the A100's peak forward;
Shah et al. 2024 (FlashAttention-3, arXiv:2407.08608, abstract) report FlashAttention-2 at 35% of the H100's and
FlashAttention-3 up to 75% forward. Its backward (2.5x the forward's matmuls, scores recomputed) runs lower, so the
table takes the lower part of each range; only the attention term depends on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moekit.plan.hardware import DTYPE_BYTES, GPU

TILE = (256, 128)  # the guide's example thread-block tile (section 3.2): one per SM per wave


@dataclass(frozen=True)
class GemmSpec:
    """One GPU generation: its measured matmul ceiling and SM count."""

    generation: str
    mamf_tflops: float  # Maximum Achievable Matmul FLOPS, BF16 (measured)
    peak_tflops: float  # the datasheet's dense BF16 peak it is measured against
    sms: int  # streaming multiprocessors (AMD: compute units): the wave size for one tile per SM
    flash: float  # FlashAttention's achieved share of the peak, forward and backward together (module docstring)
    source: str

    @property
    def ceiling(self) -> float:
        return self.mamf_tflops / self.peak_tflops


# MAMF: Bekman, "Machine Learning Engineering", compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS
# comparison table" (github.com/stas00/ml-engineering; BF16 matmul, no sparsity, CUDA 12.1 / ROCm 6.2).
# SM counts: the guide (A100: 108 SMs, section 3.2), the H100 SXM datasheet (132), AMD's MI300X datasheet (304 CUs).
MAMF: dict[str, GemmSpec] = {s.generation: s for s in [
    GemmSpec("ampere", 267.9, 312, 108, 0.55, "A100 SXM MAMF 267.9 of 312 TFLOP/s (85.9%); FlashAttention-2"),
    GemmSpec("hopper", 792.1, 989, 132, 0.45, "H100 SXM MAMF 792.1 of 989 TFLOP/s (80.1%); FlashAttention-2/3"),
    GemmSpec("cdna3", 781.9, 1300, 304, 0.35, "MI300X MAMF 781.9 of 1,300 TFLOP/s (60.1%); FlashAttention-2"),
]}
# Generations by the hardware table's names. H200 is H100's compute die with more HBM (its datasheet's FLOP/s are
# H100's). B200 has no MAMF row in the table cited: it is planned with Hopper's ceiling and says so.
_GENERATION = {"A100-40GB": "ampere", "A100-80GB": "ampere", "H100": "hopper", "H200": "hopper", "B200": "hopper",
               "MI300X": "cdna3"}


def generation(hw: GPU) -> str | None:
    """The generation whose MAMF row applies to `hw`, or None (a measured or user-supplied entry)."""
    return _GENERATION.get(hw.name)


def wave_efficiency(m: int, n: int, sms: int, count: int = 1) -> float:
    """Useful share of the tiles' work: `count` GEMMs of m x n outputs (a grouped GEMM schedules all their tiles in
    one launch) cut into 256 x 128 tiles, run in waves of `sms` tiles. The tile may lie either way round."""
    best = 0.0
    for tm, tn in (TILE, TILE[::-1]):
        tiles = count * math.ceil(m / tm) * math.ceil(n / tn)
        waves = math.ceil(tiles / sms)
        best = max(best, count * m * n / (waves * sms * tm * tn))
    return best


def ceiling(hw: GPU, scale: float = 1.0) -> float:
    """The share of the dense peak a large, well-shaped GEMM reaches on `hw` (at most 1)."""
    spec = MAMF.get(generation(hw) or "")
    return min(1.0, spec.ceiling * scale) if spec else hw.flops_efficiency


def gemm_seconds(m: float, n: float, k: float, hw: GPU, *, dtype: str = "bf16", scale: float = 1.0,
                 count: int = 1) -> float:
    """Seconds for `count` GEMMs of (m x k) @ (k x n) in `dtype` on one GPU (module docstring)."""
    if min(m, n, k) <= 0 or count <= 0:
        return 0.0
    spec = MAMF.get(generation(hw) or "")
    measured = None if spec else hw.measured_gemm_flops(m, n, k, dtype)
    if measured:  # a measured entry that timed this machine's GEMMs at these shapes (moekit/train_profile.py)
        compute = count * 2 * m * n * k / measured
    else:
        waves = wave_efficiency(int(m), int(n), spec.sms, count) if spec else 1.0
        compute = count * 2 * m * n * k / (hw.peak_flops(dtype) * ceiling(hw, scale) * waves)
    memory = count * (m * k + k * n + m * n) * DTYPE_BYTES[dtype] / (hw.bandwidth * hw.bandwidth_efficiency)
    return max(compute, memory)


def gemm_efficiency(m: float, n: float, k: float, hw: GPU, *, dtype: str = "bf16", scale: float = 1.0,
                    count: int = 1) -> float:
    """Achieved / dense peak FLOP/s of those GEMMs."""
    t = gemm_seconds(m, n, k, hw, dtype=dtype, scale=scale, count=count)
    return count * 2 * m * n * k / (t * hw.peak_flops(dtype)) if t else 0.0


def flash_efficiency(hw: GPU) -> float:
    """FlashAttention's achieved share of the peak on `hw` (a measured or unknown entry: its flops_efficiency)."""
    spec = MAMF.get(generation(hw) or "")
    return spec.flash if spec else hw.flops_efficiency


__all__ = ["MAMF", "TILE", "GemmSpec", "ceiling", "flash_efficiency", "gemm_efficiency", "gemm_seconds", "generation",
           "wave_efficiency"]
