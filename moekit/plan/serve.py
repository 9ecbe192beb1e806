"""Serving cost model: memory per GPU, largest batch, decode and prefill speed, MFU/MBU, $ per 1k tokens.

    from moekit.plan import serve
    p = serve("gpt4", gpu="A100-80GB", tp=8, pp=16)            # the largest batch that fits
    p = serve("gpt4", gpu="H100", weight_dtype="fp8", batch=8)  # a fixed batch
    p = serve("gpt4", gpu="H100", target_tps=33.33)             # the largest batch at 33.33 tok/s/user
    p.tokens_per_s, p.tokens_per_s_per_user, p.cost_per_1k_output, p.experts_touched

The model (SPEC sections 1, 4 and 6), per pipeline stage and per GPU:
- A replica is tp x pp x ep GPUs. Tensor parallelism splits every matrix; expert parallelism gives
  each of ep groups of tp GPUs n_expert / ep experts and its own share of the sequences (attention is
  data-parallel over the groups, tokens travel to their experts by all-to-all); pipeline parallelism
  cuts the layers into pp stages (`layout.py`). `micro_batches` (default pp) batches of `batch`
  sequences are in flight so that every stage has work: pp x batch sequences hold KV cache.
- Decode step of one stage = max(compute, memory) + communication (roofline per stage):
  compute = 2 x active matmul parameters x tokens + attention (4 x layers x context x q_dim per token);
  memory = non-expert weights + the experts the batch touches + the KV cache of its sequences.
  MoE expert coverage: B tokens routed top-k uniformly at random touch E x (1 - (1 - k/E)^B)
  distinct experts per layer in expectation, so decoding batch 8 reads ~5x the expert weights of
  batch 1 (2 experts -> 10.4 of GPT-4's 16).
  communication = 2 tensor-parallel all-reduces per layer (ring: 2 (tp-1)/tp x bytes / link + latency),
  2 all-to-alls per MoE layer with ep > 1, and a pipeline hop per stage.
- A token of one sequence takes max(micro_batches x slowest stage, sum of stages and hops); the
  replica emits micro_batches x batch tokens in that time.
- Memory per GPU = weights + KV cache (each sequence holds `context` tokens) + a prefill workspace,
  within `memory_fraction` of HBM (vLLM's gpu_memory_utilization, 0.9). MQA's one KV head is
  replicated on each tensor-parallel GPU, so MQA's cache does not shrink with tp.
- $ per 1k tokens = cluster $/hour / (tokens per hour x utilization / 1,000) (SPEC section 6).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from moekit.config import ModelConfig
from moekit.plan.hardware import DTYPE_BYTES, GPU, get_gpu
from moekit.plan.layout import Stage, as_config, check_parallel, kv_heads_per_gpu, stages
from moekit.plan.serve_time import is_measured, load_serve_constants
from moekit.plan.stage_step import StageStep, expert_coverage, transfer

ACT_BYTES = 2  # activations travel and are stored in bf16


@dataclass
class ServeMemory:
    """Bytes per GPU on the fullest stage."""

    stage: int
    weights: float
    kv_cache: float
    workspace: float
    usable: float  # memory_fraction x capacity
    capacity: float
    kv_per_sequence: float  # this GPU's share of one sequence's cache at `context` tokens

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.workspace


@dataclass
class ServePlan:
    model: str
    gpu: str
    n_gpus: int
    replicas: int
    tp: int
    pp: int
    ep: int
    weight_dtype: str
    kv_dtype: str
    compute_dtype: str
    context: int
    prompt_len: int
    batch: int  # sequences per micro-batch (the batch a layer sees)
    micro_batches: int
    max_batch: int
    memory: ServeMemory
    decode: StageStep  # the slowest stage's decode step
    token_seconds: float  # one sequence's time per output token
    tokens_per_s_per_user: float
    tokens_per_s: float  # whole cluster, output tokens
    mfu: float
    mbu: float  # memory-bandwidth utilization: bytes read per second / peak bandwidth, whole cluster
    experts_touched: float  # per MoE layer per decode step (expectation)
    prefill: StageStep  # the slowest stage's step for one chunk
    prefill_chunk: int
    time_to_first_token: float
    input_tokens_per_s: float  # whole cluster
    price_per_hour: float | None
    utilization: float
    cost_per_hour: float | None
    cost_per_1k_output: float | None
    cost_per_1k_input: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return self.batch * self.micro_batches * self.replicas

    def cost_per_1k(self, input_tokens: float, output_tokens: float) -> float | None:
        """Blended $ per 1k tokens of a workload with this many input and output tokens per request."""
        if self.cost_per_1k_output is None or self.cost_per_1k_input is None:
            return None
        total = input_tokens + output_tokens
        return (input_tokens * self.cost_per_1k_input + output_tokens * self.cost_per_1k_output) / total

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        d["decode"]["seconds"], d["prefill"]["seconds"] = self.decode.seconds, self.prefill.seconds
        d["in_flight"] = self.in_flight
        return d


@dataclass
class _Setup:
    """Everything fixed before the batch is chosen."""

    cfg: ModelConfig
    hw: GPU
    stages: list[Stage]
    tp: int
    pp: int
    ep: int
    weight_dtype: str
    kv_dtype: str
    compute_dtype: str
    context: int
    micro_batches: int
    prefill_chunk: int
    memory_fraction: float
    # The datasheet-GPU model (moekit/plan/serve_time.py ServeConstants) or None: the plain roofline, with the
    # hardware entry's own figures as they are (a measured entry; the simulator's oracle).
    timing: Any = None

    @property
    def w_bytes(self) -> float:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def kv_bytes(self) -> float:
        return DTYPE_BYTES[self.kv_dtype]

    def link(self, gpus: int) -> float:
        """Bytes/s between `gpus` GPUs that talk: NVLink inside a node, the network across nodes."""
        inside = gpus <= self.hw.gpus_per_node
        return (self.hw.nvlink_gb_s if inside else self.hw.internode_gb_s) * 1e9


def stage_step(s: _Setup, st: Stage, seqs: float, new_tokens: int, context: float) -> StageStep:
    """Time of one micro-batch of `seqs` sequences on stage `st`, each adding `new_tokens` after `context`."""
    if s.timing is not None:  # a datasheet GPU: floors and efficiencies from their parts (serve_time.py)
        return s.timing.stage_step(s, st, seqs, new_tokens, context)
    cfg, hw, tp, ep = s.cfg, s.hw, s.tp, s.ep
    tokens = seqs * new_tokens  # in the whole stage (all ep groups)
    group_tokens = tokens / ep  # attention and dense layers: each group runs its own sequences
    # Weights read: every non-expert weight; of the experts only those the tokens touch (coverage).
    touched = expert_coverage(cfg.n_expert, cfg.top_k, tokens) / ep if cfg.is_moe else 0.0
    w_read = ((st.lm_head + st.dense) / tp + st.moe_layers * touched * st.expert_layer / tp) * s.w_bytes
    if st.embedding:  # a lookup reads only the rows of the batch's tokens
        w_read += group_tokens * cfg.d_model / tp * s.w_bytes
    kv_layer_token = 2 * kv_heads_per_gpu(cfg, tp) * cfg.head_dim * s.kv_bytes
    kv_read = (seqs / ep) * (context + new_tokens) * st.layers * kv_layer_token
    memory_s = (w_read / hw.weight_read_bandwidth(s.weight_dtype, group_tokens)
                + kv_read / (hw.bandwidth * hw.bandwidth_efficiency))
    # FLOPs per GPU: dense matmuls on the group's tokens, experts on the expected k/ep share of all.
    flops = 2 * group_tokens * (st.lm_head + st.dense) / tp
    flops += 2 * tokens * cfg.top_k / ep * st.moe_layers * st.expert_layer / tp
    flops += group_tokens * 4 * st.layers * (context + new_tokens / 2) * cfg.q_dim / tp  # QK^T and AV
    compute_s = flops / (hw.peak_flops(s.compute_dtype) * hw.flops_efficiency)
    # Communication: 2 all-reduces per layer over tp; 2 all-to-alls (dispatch, combine) per MoE layer.
    lat = hw.allreduce_latency_us * 1e-6
    act = group_tokens * cfg.d_model * ACT_BYTES
    comm = 0.0
    if tp > 1:
        comm += 2 * st.layers * transfer(2 * (tp - 1) / tp * act, s.link(tp * ep), lat)
    if ep > 1:
        comm += 2 * st.moe_layers * transfer(act * cfg.top_k * (ep - 1) / ep / tp, s.link(tp * ep), lat)
    # The next stage gets the activations, each tp rank sending 1/tp (Megatron's scatter/gather).
    hop = transfer(act / tp, s.link(tp * ep * s.pp), hw.hop_latency_us * 1e-6) if s.pp > 1 else 0.0
    # Launches per layer, and MoE dispatch per expert each MoE layer runs (the entry's measured figures).
    layer_us, _, expert_us, _ = hw.overheads(s.weight_dtype)
    overhead = (st.layers * layer_us + st.moe_layers * touched * expert_us) * 1e-6
    return StageStep(stage=st.index, compute_s=compute_s, memory_s=memory_s, comm_s=comm, hop_s=hop,
                     flops=flops, bytes=w_read + kv_read, overhead_s=overhead)


def stage_memory(s: _Setup, st: Stage, batch: float) -> ServeMemory:
    cfg, tp, ep = s.cfg, s.tp, s.ep
    weights = (st.non_expert / tp + st.experts / (tp * ep)) * s.w_bytes
    kv_seq = s.context * st.layers * 2 * kv_heads_per_gpu(cfg, tp) * cfg.head_dim * s.kv_bytes
    kv = batch * s.micro_batches / ep * kv_seq
    # Workspace: one prefill chunk's live activations (residual, norms, QKV, k expert hiddens) and the
    # fp32 logits of a decode micro-batch on the last stage; a bound in the spirit of vLLM's profiling run.
    width = 4 * cfg.d_model + (cfg.q_dim + 2 * cfg.kv_dim) / tp + 2 * cfg.top_k * cfg.d_ff / tp
    workspace = s.prefill_chunk / ep * width * ACT_BYTES
    if st.lm_head:
        workspace += batch / ep * 4 * cfg.vocab_size / tp
    return ServeMemory(stage=st.index, weights=weights, kv_cache=kv, workspace=workspace,
                       usable=s.hw.memory_bytes * s.memory_fraction, capacity=s.hw.memory_bytes,
                       kv_per_sequence=kv_seq)


def max_batch(s: _Setup) -> int:
    """The largest micro-batch whose KV cache fits on every stage (0 when not even one fits)."""
    best = math.inf
    for st in s.stages:  # memory is affine in the batch: solve usable >= m(0) + batch x (m(1) - m(0))
        m0, m1 = stage_memory(s, st, 0), stage_memory(s, st, 1)
        best = min(best, (m0.usable - m0.total) / (m1.total - m0.total))
    return max(0, math.floor(best + 1e-9))


def _fullest(s: _Setup, batch: float) -> ServeMemory:
    return max((stage_memory(s, st, batch) for st in s.stages), key=lambda m: m.total - m.usable)


def _decode(s: _Setup, batch: int) -> tuple[StageStep, float, float]:
    """(slowest stage's step, one sequence's time per token, HBM bytes read per period by the replica)."""
    steps = [stage_step(s, st, batch, 1, s.context) for st in s.stages]
    slowest = max(steps, key=lambda x: x.seconds)
    period = max(s.micro_batches * slowest.seconds, sum(x.seconds + x.hop_s for x in steps))
    if s.timing is not None:  # the fitted per-step floor plus the entry's own fields (serve_time.py)
        period += s.timing.step_s(s.hw, batch)
    else:  # scheduling and sampling once per token, and per sequence in the step (the entry's measured figures)
        _, step_us, _, seq_us = s.hw.overheads(s.weight_dtype)
        period += (step_us + batch * seq_us) * 1e-6
    bytes_read = s.micro_batches * sum(x.bytes for x in steps) * s.tp * s.ep
    return slowest, period, bytes_read


def _check_dtype(name: str, dtype: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")


def serve(model: ModelConfig | str = "gpt4", gpu: GPU | str = "H100", *, n_gpus: int | None = None,
          tp: int = 8, pp: int = 16, ep: int = 1, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
          compute_dtype: str | None = None, context: int | None = None, prompt_len: int | None = None,
          batch: int | None = None, target_tps: float | None = None, micro_batches: int | None = None,
          price_per_hour: float | None = None, utilization: float = 1.0, memory_fraction: float = 0.9,
          prefill_chunk: int = 2048, hardware_files: tuple = (), serve_constants: Any = None,
          roofline: bool = False) -> ServePlan:
    """Plan serving `model` on `gpu`. Batch: `batch`, or the largest meeting `target_tps` tokens/s per
    user, or (neither) the largest that fits. Defaults: GPT-4's 8-way tensor x 16-way pipeline (SPEC 4).

    A datasheet GPU is planned from its parts (moekit/plan/serve_time.py; `serve_constants` replaces its fitted
    constants); `roofline=True` plans it as the article does instead: max(peak x flops_efficiency, bandwidth x
    bandwidth_efficiency) + communication, no floors. A measured entry is always planned with its own figures.
    Raises ValueError (one line, says what to change) for degrees that do not fit the model, weights
    or a batch that do not fit memory, and targets no batch can reach.
    """
    cfg = as_config(model)
    hw = get_gpu(gpu, hardware_files)
    check_parallel(cfg, tp, pp, ep)
    _check_dtype("--weight-dtype", weight_dtype)
    _check_dtype("--kv-dtype", kv_dtype)
    if compute_dtype is None:  # W8A8 where the GPU has the FP8/INT8 tensor cores, else bf16 (weight-only)
        compute_dtype = weight_dtype if weight_dtype in ("fp8",) and hw.supports(weight_dtype) else "bf16"
    _check_dtype("--compute-dtype", compute_dtype)
    hw.peak_flops(compute_dtype)  # raises for a dtype the GPU lacks
    context = cfg.max_seq_len if context is None else context
    prompt_len = context if prompt_len is None else prompt_len
    micro_batches = pp if micro_batches is None else micro_batches
    replica = tp * pp * ep
    n_gpus = replica if n_gpus is None else n_gpus
    for name, value in (("--context", context), ("--prompt-len", prompt_len), ("--gpus", n_gpus),
                        ("--micro-batches", micro_batches), ("--prefill-chunk", prefill_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_gpus % replica:
        raise ValueError(f"--gpus {n_gpus} is not a multiple of one replica's tp x pp x ep = {replica} GPUs")
    if micro_batches > pp:
        raise ValueError(f"--micro-batches must be between 1 and the pipeline degree {pp}, got "
                         f"{micro_batches}: more would only hold more KV cache, every stage is busy with pp")
    if not 0 < utilization <= 1:
        raise ValueError(f"--utilization is the busy fraction of the time, in (0, 1]; got {utilization}")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {memory_fraction}")
    if batch is not None and target_tps is not None:
        raise ValueError("give --batch or --target-tps, not both")
    notes = []
    if cfg.has_vision:  # (moekit/plan/vision.py)
        notes.append("vision: every token counted as one that sees an image (its cross-attention layers included); "
                     "the encoder's FLOPs per image and its cache per request are not: `moekit plan vision`")
    if context > cfg.max_seq_len:
        notes.append(f"context {context:,} exceeds {cfg.name}'s max_seq_len {cfg.max_seq_len:,}")
    s = _Setup(cfg=cfg, hw=hw, stages=stages(cfg, pp), tp=tp, pp=pp, ep=ep, weight_dtype=weight_dtype,
               kv_dtype=kv_dtype, compute_dtype=compute_dtype, context=context, micro_batches=micro_batches,
               prefill_chunk=min(prefill_chunk, prompt_len), memory_fraction=memory_fraction,
               timing=None if roofline or is_measured(hw) else (serve_constants or load_serve_constants()))

    fit = max_batch(s)
    empty = _fullest(s, 0)
    if empty.total > empty.usable:
        raise ValueError(f"{cfg.name} does not fit: stage {empty.stage} needs {empty.total / 1e9:.1f} GB per "
                         f"GPU for {weight_dtype} weights and workspace, {hw.name} has "
                         f"{empty.usable / 1e9:.1f} GB usable; add pipeline stages (--pp) or GPUs, or use "
                         "fp8/int8 weights")
    if fit < 1:
        one = _fullest(s, 1)
        raise ValueError(f"not even batch 1 fits: {micro_batches} micro-batches x {context:,} tokens of KV "
                         f"cache need {one.total / 1e9:.1f} GB per GPU, {one.usable / 1e9:.1f} GB usable "
                         f"(over by {(one.total - one.usable) / 1e9:.1f} GB); shorten --context or add GPUs")
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"--batch must be a positive integer, got {batch!r}")
        if batch > fit:
            need = _fullest(s, batch)
            over = (need.total - need.usable) / 1e9
            raise ValueError(f"batch {batch} does not fit: {batch} x {micro_batches} micro-batches x "
                             f"{context:,} tokens of KV cache need {need.total / 1e9:.1f} GB per GPU on "
                             f"stage {need.stage}, {need.usable / 1e9:.1f} GB usable (over by {over:.1f} "
                             f"GB); the largest batch that fits is {fit}")
    elif target_tps is not None:
        if not target_tps > 0:
            raise ValueError(f"--target-tps must be > 0, got {target_tps}")
        best_1 = 1 / _decode(s, 1)[1]
        if best_1 < target_tps:
            raise ValueError(f"no batch reaches {target_tps:g} tokens/s per user on {n_gpus} {hw.name}: "
                             f"batch 1 gives {best_1:.2f}; use faster or more GPUs, or lower the target")
        lo, hi = 1, fit  # per-user speed falls as the batch grows: bisect for the last batch at target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if 1 / _decode(s, mid)[1] >= target_tps else (lo, mid - 1)
        batch = lo
    else:
        batch = fit

    slowest, period, bytes_read = _decode(s, batch)
    replicas = n_gpus // replica
    tps = replicas * micro_batches * batch / period
    matmul_active = sum(st.matmul_active for st in s.stages)
    mfu = tps * 2 * matmul_active / (n_gpus * hw.peak_flops(compute_dtype))
    mbu = replicas * bytes_read / period / (n_gpus * hw.bandwidth)

    # Prefill: chunks of `prefill_chunk` tokens of one prompt, at the prompt's mean context, pipelined; the time
    # to first token is one prompt's, alone. Throughput batches prompts: a step holds up to `prefill_chunk`
    # tokens (vLLM's max_num_batched_tokens), so prompts shorter than it run several to a step.
    chunk = s.prefill_chunk
    n_chunks = math.ceil(prompt_len / chunk)
    pre = [stage_step(s, st, 1, chunk, max(0, prompt_len / 2 - chunk / 2)) for st in s.stages]
    pre_slowest = max(pre, key=lambda x: x.seconds)
    ttft = (n_chunks - 1) * pre_slowest.seconds + sum(x.seconds + x.hop_s for x in pre)
    packed = max(1, prefill_chunk // prompt_len)  # whole prompts per step
    if packed > 1:
        batched = [stage_step(s, st, packed, prompt_len, 0) for st in s.stages]
        step = max(batched, key=lambda x: x.seconds)
        input_tps = replicas * packed * prompt_len / max(step.seconds, step.hop_s)
    else:
        input_tps = replicas * chunk / max(pre_slowest.seconds, pre_slowest.hop_s)

    price = hw.price_per_hour if price_per_hour is None else price_per_hour
    if price is not None and price < 0:
        raise ValueError(f"--price-per-hour must be >= 0, got {price}")
    cost_h = None if price is None else n_gpus * price
    if price is None:
        notes.append(f"no price for {hw.name} in the hardware table: pass --price-per-hour for dollars")

    def per_1k(rate: float) -> float | None:
        return None if cost_h is None else cost_h / (rate * 3600 * utilization / 1000)

    return ServePlan(
        model=cfg.name, gpu=hw.name, n_gpus=n_gpus, replicas=replicas, tp=tp, pp=pp, ep=ep,
        weight_dtype=weight_dtype, kv_dtype=kv_dtype, compute_dtype=compute_dtype, context=context,
        prompt_len=prompt_len, batch=batch, micro_batches=micro_batches, max_batch=fit,
        memory=_fullest(s, batch), decode=slowest, token_seconds=period, tokens_per_s_per_user=1 / period,
        tokens_per_s=tps, mfu=mfu, mbu=mbu,
        experts_touched=expert_coverage(cfg.n_expert, cfg.top_k, batch) if cfg.is_moe else 0.0,
        prefill=pre_slowest, prefill_chunk=chunk, time_to_first_token=ttft, input_tokens_per_s=input_tps,
        price_per_hour=price, utilization=utilization, cost_per_hour=cost_h, cost_per_1k_output=per_1k(tps),
        cost_per_1k_input=per_1k(input_tps), notes=notes)


__all__ = ["ServeMemory", "ServePlan", "StageStep", "expert_coverage", "serve"]
