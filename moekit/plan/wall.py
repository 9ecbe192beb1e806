"""The brick wall (SPEC section 1): how large a model a system can decode at a tokens/s-per-user target.

    from moekit.plan import wall
    w = wall("H100", n_gpus=8, tokens_per_s=20, hbm_gb_s=3000)   # the article's 3 TB/s: ~300B
    w.max_params, w.flops_utilization

At batch 1 every parameter a token uses is read from memory once per token, so
    tokens/s per user <= n_gpus x bandwidth / (overhead x params x bytes per param),
where `overhead` is bytes moved per byte of weights: the article takes 2 ("overheads - unfused ops,
KV-cache reads, hardware - cost as much again as the weight reads"); 1 is the weights alone.
For an MoE model `params` is the *active* count: that is how sparsity gets past the wall.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.plan.hardware import DTYPE_BYTES, GPU, get_gpu

# SPEC section 1: 250 and 1,000 words/min are 8.33 and 33.33 tokens/s: the article counts 2 tokens per word.
READING_SPEEDS = {"250 words/min": 250 / 60 * 2, "1,000 words/min": 1000 / 60 * 2}
ARTICLE_OVERHEAD = 2.0


def article_h100() -> GPU:
    """The H100 as the article rounds it (SPEC section 6): 3 TB/s and 2,000 TFLOP/s FP8."""
    return get_gpu("H100").replace(name="H100 (article: 3 TB/s)", hbm_gb_s=3000,
                                   tflops={"fp32": 67, "bf16": 1000, "fp8": 2000, "int8": 2000})


def max_tokens_per_s(params: float, gpu: GPU | str = "H100", n_gpus: int = 1, bytes_per_param: float = 2,
                     overhead: float = ARTICLE_OVERHEAD) -> float:
    """Upper bound on tokens/s per user at batch 1 for a model that reads `params` parameters per token."""
    hw = get_gpu(gpu)
    return n_gpus * hw.bandwidth / (overhead * params * bytes_per_param)


def flops_utilization(params: float, tokens_per_s: float, gpu: GPU | str = "H100", n_gpus: int = 1,
                      batch: int = 1, dtype: str = "bf16") -> float:
    """Fraction of peak FLOP/s used decoding `batch` users at `tokens_per_s` each (2 FLOPs per parameter)."""
    return 2 * params * tokens_per_s * batch / (n_gpus * get_gpu(gpu).peak_flops(dtype))


@dataclass
class Wall:
    gpu: str
    n_gpus: int
    tokens_per_s: float  # the per-user target
    weight_dtype: str
    bytes_per_param: float
    overhead: float
    bandwidth: float  # bytes/s, all GPUs together
    max_params: float  # the wall: parameters read per token (dense: all; MoE: active)
    max_params_memory: float  # parameters whose weights fit in the GPUs' memory at all
    flops_utilization: float  # of the bf16 peak, at batch 1, for a model at the wall

    def to_dict(self) -> dict:
        return asdict(self)


def wall(gpu: GPU | str = "H100", n_gpus: int = 8, tokens_per_s: float = 20.0, *, weight_dtype: str = "bf16",
         overhead: float = ARTICLE_OVERHEAD, hbm_gb_s: float | None = None,
         hardware_files: tuple = ()) -> Wall:
    """The largest model `n_gpus` x `gpu` decode at `tokens_per_s` per user (batch 1), SPEC section 1."""
    hw = get_gpu(gpu, hardware_files)
    if hbm_gb_s is not None:
        if not hbm_gb_s > 0:
            raise ValueError(f"--hbm-gb-s must be > 0, got {hbm_gb_s}")
        hw = hw.replace(hbm_gb_s=hbm_gb_s)
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {n_gpus!r}")
    if not tokens_per_s > 0:
        raise ValueError(f"--tps must be > 0 tokens/s per user, got {tokens_per_s}")
    if not overhead >= 1:
        raise ValueError(f"--overhead is bytes moved per byte of weights, >= 1 (the article's: 2); "
                         f"got {overhead}")
    if weight_dtype not in DTYPE_BYTES:
        raise ValueError(f"--weight-dtype must be one of {', '.join(DTYPE_BYTES)}, got {weight_dtype!r}")
    b = DTYPE_BYTES[weight_dtype]
    bandwidth = n_gpus * hw.bandwidth
    params = bandwidth / (overhead * b * tokens_per_s)
    util = flops_utilization(params, tokens_per_s, hw, n_gpus)
    return Wall(gpu=hw.name, n_gpus=n_gpus, tokens_per_s=tokens_per_s, weight_dtype=weight_dtype,
                bytes_per_param=b, overhead=overhead, bandwidth=bandwidth, max_params=params,
                max_params_memory=n_gpus * hw.memory_bytes / b, flops_utilization=util)


__all__ = ["ARTICLE_OVERHEAD", "READING_SPEEDS", "Wall", "article_h100", "flops_utilization",
           "max_tokens_per_s", "wall"]
