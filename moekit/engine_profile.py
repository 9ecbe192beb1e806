"""What moekit's own decode costs on this machine, measured with the engine's own modules (`moekit bench hardware`):

    from moekit.engine_profile import weight_read_gb_s, engine_overheads
    weight_read_gb_s(get_preset("gpt4-mini"), "int8", torch.device("cpu"))   # GB/s of the int8 decode pass
    engine_overheads(get_preset("gpt4-mini"), "bf16", torch.device("cpu"))   # EngineOverheads(layer_us=...)

Two measurements per weight format (fp32, bf16, int8), so that `--gpu local` predicts moekit's decode step as
weights read / weight_read_gb_s + the overheads below (moekit/plan/serve.py's plain roofline):

- `weight_read_gb_s`: the bandwidth at which one batch-1 decode pass reads weights through the modules the
  engine calls: every block's q/k/v/o projections and its MLP or MoE layer (router, then the routed experts on
  the dispatch path the runner takes for one token: runner.py `moe_dispatch`), and the lm_head, in layer order
  (so the caches see what decoding does to them), on `int8` weights after `quantize_int8`. A stream of inputs
  routes each pass to other experts, as decoded tokens do. The same pass on a copy of the model 1/8 as wide (its
  weights a fraction of a MB) costs the same dispatch and next to no reading: the bandwidth is the difference in
  bytes over the difference in time, and the dispatch is left to the overheads, which count it once. A big
  square GEMV (bench_hardware.py's `gemv_gb_s` before this) is not what decode runs: on a 2-core AVX-512 CPU it
  read bf16 at 7 GB/s where the engine's bf16 pass reads at ~5, and int8 not at all.
- `engine_overheads`: microseconds per layer, per expert a MoE layer runs, per decode step and per sequence,
  solved exactly from the engine's decode step time on four narrow models of the same structure (2 and 8
  layers, 1 and 16 sequences; weights that take no time to read): with c(b) the experts b tokens touch per layer
  (expert_coverage, the planner's), step(L, b) = step + b x seq + L x (layer + c(b) x expert), so the slopes over
  L at b = 1 and 16 give layer and expert, and the intercepts step and seq.

Both are the best of five windows of back-to-back calls (noise only slows), the accelerator synchronized around
each window. It lives outside `moekit.plan`: it imports the engine, and the planner imports none (DESIGN.md
"Layout").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from moekit.config import ModelConfig

WEIGHT_DTYPES = ("fp32", "bf16", "int8")
NARROW = 8  # the narrow copy is this many times thinner (d_model, d_ff, vocabulary)
BATCHES = (1, 16)  # sequences in the overhead models' decode steps
LAYERS = (2, 8)
# Windows per timing, the best one kept: the overheads are differences of four step times, which magnify the noise
# of a shared machine (three windows left a per-layer figure swinging 2x between runs beside another job).
WINDOWS = 5


@dataclass
class EngineOverheads:
    layer_us: float
    step_us: float
    expert_us: float
    seq_us: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in asdict(self).items()}


def _sync(dev: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def build(cfg: ModelConfig, weight_dtype: str, dev: torch.device, seed: int = 0):
    """The model as `moekit serve` loads it in this weight format (int8: `--quantize int8`, whose activations
    are bf16 where torch's fused int8 kernel or a GPU takes them: util.resolve_dtype)."""
    from moekit.infer.quant import quantize_int8
    from moekit.model.transformer import Transformer
    from moekit.util import resolve_dtype

    torch.manual_seed(seed)
    model = Transformer(cfg)
    if weight_dtype == "int8":
        return quantize_int8(model.to(dev, resolve_dtype("auto", dev, "int8"))).eval()
    return model.to(dev, {"fp32": torch.float32, "bf16": torch.bfloat16}[weight_dtype]).eval()


def narrow(cfg: ModelConfig, **changes) -> ModelConfig:
    """The same structure (layers, experts, top-k, heads, MLP kind) with every width 1/NARROW (at least 16:
    the fused int8 kernel takes multiples of 16)."""
    w = lambda n: max(16, n // NARROW // 16 * 16)  # noqa: E731
    return cfg.replace(d_model=w(cfg.d_model), head_dim=w(cfg.head_dim), d_ff=w(cfg.d_ff),
                       dense_d_ff=w(cfg.dense_d_ff),
                       vocab_size=w(cfg.vocab_size), vision=None, **changes)


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def decode_pass(model, batch: int = 1) -> tuple[Callable[[], None], float]:
    """(one decode pass of `batch` tokens over the weight-reading modules, the mean weight bytes a pass reads: the
    experts its tokens route to in each layer, counted). See the module docstring."""
    from moekit.infer.runner import dispatch_for, moe_dispatch

    cfg, dev = model.cfg, model.tok_emb.weight.device
    dtype = model.tok_emb.weight.dtype  # the activations' (int8 keeps its float embedding)
    gen = torch.Generator().manual_seed(batch)
    xs = [torch.randn(1, batch, cfg.d_model, generator=gen).to(dev, dtype) for _ in range(16)]
    blocks = list(model.blocks.values())
    calls = {"n": 0, "count": True}

    def run(x: torch.Tensor) -> float:
        """The pass; with calls["count"], the experts it runs, summed over the MoE layers (a host sync each)."""
        experts = 0.0
        with torch.inference_mode(), dispatch_for(model, moe_dispatch(dev, batch)):
            for b in blocks:
                a = b.attn
                q = a.wq(x)
                a.wk(x), a.wv(x), a.wo(q)
                _, info = b.mlp(x)
                if info is not None and calls["count"]:
                    experts += int((info.tokens_per_expert_E > 0).sum())
            model.lm_head(x)
        return experts

    def one() -> None:
        run(xs[calls["n"] % len(xs)])
        calls["n"] += 1

    touched = [run(x) for x in xs]
    calls["count"] = False
    moe = [b.mlp for b in blocks if b.mlp is not None and hasattr(b.mlp, "experts")]
    per_expert = _nbytes(moe[0].experts) / cfg.n_expert if moe else 0.0
    nbytes = sum(_nbytes(getattr(b.attn, n)) for b in blocks for n in ("wq", "wk", "wv", "wo"))
    nbytes += sum(_nbytes(m.router) for m in moe) + sum(_nbytes(b.mlp) for b in blocks if b.mlp not in moe)
    nbytes += _nbytes(model.lm_head) + per_expert * sum(touched) / len(touched)
    return one, nbytes


def window_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Mean seconds per call over `repeats` consecutive calls, as decoding runs its steps back to back (the caller
    takes the best of several windows, as it does of the engine's own steps: noise only slows)."""
    fn(), fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def weight_read_gb_s(cfg: ModelConfig, weight_dtype: str, dev: torch.device, batch: int = 1,
                     repeats: int = 20, strict: bool = True) -> float:
    """GB/s at which the engine's decode pass of `batch` tokens reads `weight_dtype` weights of `cfg` (module
    docstring); beyond one token the matmuls' compute is in the figure too, as it is in the step. When the wide pass
    is not measurably slower than the narrow one: an error, or (`strict=False`, a plumbing check on a toy model)
    the wide pass's bytes over its whole time."""
    sync = _sync(dev)
    (wide, wide_bytes), (thin, thin_bytes) = (decode_pass(build(c, weight_dtype, dev), batch)
                                              for c in (cfg, narrow(cfg)))
    # Alternate the two so that a change in the machine's load hits both; the best window of each.
    t_wide = t_thin = math.inf
    for _ in range(WINDOWS):
        t_wide = min(t_wide, window_seconds(wide, sync, repeats))
        t_thin = min(t_thin, window_seconds(thin, sync, repeats))
    if t_wide <= t_thin:
        if not strict:
            return wide_bytes / t_wide / 1e9
        raise RuntimeError(f"the {weight_dtype} decode pass of {cfg.name} took no longer than its 1/{NARROW}-wide "
                           f"copy ({t_wide * 1e3:.2f} vs {t_thin * 1e3:.2f} ms): the machine is too noisy to measure")
    return (wide_bytes - thin_bytes) / (t_wide - t_thin) / 1e9


def _decode_step_s(cfg: ModelConfig, weight_dtype: str, dev: torch.device, batch: int, steps: int) -> float:
    """Best per-step seconds of the engine decoding `batch` sequences of `cfg` (after prefill and warm-up)."""
    from moekit.infer.engine import Engine
    from moekit.infer.sampler import SamplingParams

    sync = _sync(dev)
    warm, prompt = 8, 16
    tokens = warm + WINDOWS * steps + 8  # every sequence still decoding in the last window's last step
    engine = Engine(build(cfg, weight_dtype, dev), num_blocks=batch * math.ceil((prompt + tokens) / 16) + 8,
                    block_size=16)
    ids = [engine.add_request([1 + i] * prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
           for i in range(batch)]
    for _ in range(warm):  # the prefill, then warm-up steps (and the CUDA graph capture on a GPU)
        engine.step()
    best = math.inf
    for _ in range(WINDOWS):  # the best window
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        best = min(best, (time.perf_counter() - t0) / steps)
    # A window with finished sequences would time an emptier step than the one asked about.
    assert all(engine.requests[i].num_output_tokens < tokens for i in ids), "a sequence finished while timed"
    return best


def engine_overheads(cfg: ModelConfig, weight_dtype: str, dev: torch.device, steps: int = 32) -> EngineOverheads:
    """Per layer / step / expert / sequence microseconds of moekit's decode step (module docstring)."""
    from moekit.plan.stage_step import expert_coverage

    t = {(n, b): _decode_step_s(narrow(cfg, n_layer=n, max_seq_len=256), weight_dtype, dev, b, steps)
         for n in LAYERS for b in BATCHES}
    (l0, l1), (b0, b1) = LAYERS, BATCHES
    slope = {b: (t[l1, b] - t[l0, b]) / (l1 - l0) for b in BATCHES}  # layer + c(b) x expert
    if cfg.is_moe:
        c = {b: expert_coverage(cfg.n_expert, cfg.top_k, b) * cfg.n_moe_layers / cfg.n_layer for b in BATCHES}
        expert = max(0.0, (slope[b1] - slope[b0]) / (c[b1] - c[b0]))
    else:
        c, expert = {b: 0.0 for b in BATCHES}, 0.0
    layer = max(0.0, slope[b0] - c[b0] * expert)
    base = {b: t[l0, b] - l0 * (layer + c[b] * expert) for b in BATCHES}  # step + b x seq
    seq = max(0.0, (base[b1] - base[b0]) / (b1 - b0))
    step = max(0.0, base[b0] - b0 * seq)
    return EngineOverheads(layer_us=layer * 1e6, step_us=step * 1e6, expert_us=expert * 1e6, seq_us=seq * 1e6)


__all__ = ["EngineOverheads", "engine_overheads", "weight_read_gb_s"]
