"""Training cost model: FLOPs, time or MFU, GPU-hours, dollars, memory per GPU, pipeline bubble.

    from moekit.plan import train
    p = train("gpt4", gpu="A100-80GB", n_gpus=25_000, tokens=13e12, mfu=0.34)   # SPEC section 3
    p.days, p.cost, p.memory.total / 1e9, p.bubble

Formulas (SPEC section 6 unless cited):
- model FLOPs = 6 x N x D, N = active parameters that enter a matmul (`moekit.counts`), D = tokens.
  This is what MFU counts. The attention term, 3 x 4 x layers x seq_len x attention width per token
  (PaLM, Chowdhery et al. 2022, appendix B), is reported beside it and counted only on request.
- time: by default predicted from the step's parts (moekit/plan/step_time.py: matmuls at their shapes' efficiency,
  attention, memory-bound ops, recomputation, the pipeline bubble, exposed communication, the optimizer), and
  MFU = FLOPs / (GPUs x peak x time) is an output; `mfu=` gives time = FLOPs / (GPUs x peak x MFU) instead (the
  article's way), `days=` the MFU. $ = GPU-hours x $/hour.
- memory per GPU under tensor (tp) x pipeline (pp) x data (dp) parallelism, experts split over
  ep ranks of the data-parallel group (DeepSpeed-MoE / Megatron-LM: expert data parallelism dp/ep):
  bf16 weights (2 B), bf16 gradients (2 B) and Adam states (fp32 master weights, m, v: 12 B), of
  which ZeRO stage 1 shards the optimizer states, 2 also the gradients, 3 also the weights over
  their data-parallel group (Rajbhandari et al. 2020, "ZeRO", figure 1). `optimizer_precision="fp32"`
  is moekit's own training instead: fp32 weights and gradients, 8 B of AdamW state (shards.py).
- per rank, as moekit itself shards the tensors (`ranks`, moekit/plan/shards.py: torch.chunk shards,
  ZeRO-1's whole-parameter partition, replicated norms, router and MQA K/V), and the bytes each
  collective of a step carries (`collectives`, moekit/plan/comm.py), for the layouts moekit runs
  (pipeline and expert parallelism 1); `comm_seconds` is their ring traffic over the hardware
  table's links (NVLink inside a node, the inter-node network across), with no overlap or latency.
- activations per layer and token, bf16, with FlashAttention (no s x s scores stored): the tensors
  autograd saves (norm inputs/outputs, Q, K, V, attention output, MLP hidden before and after the
  activation, for MoE the k gathered token copies and expert outputs); split by tp, fully with
  sequence parallelism and except the d_model-sized ones without (Korthikanti et al. 2022, section 4).
  Full recomputation keeps only each layer's input plus one layer's working set. Under the 1F1B
  schedule stage s keeps min(m, pp - s) micro-batches in flight (Narayanan et al. 2021).
- pipeline bubble = (pp - 1) / (m + pp - 1) of the step, m micro-batches per step (GPipe and 1F1B);
  `pipeline_bubble` also gives the interleaved and zero-bubble schedules' (checked against measured
  runs by tests/parallel/test_pipeline.py).
- tokens per expert per batch = batch tokens x top_k / n_expert.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from moekit.config import ModelConfig
from moekit.counts import flops_per_token
from moekit.plan.activations import activation_bytes
from moekit.plan.comm import StepComm, step_collectives
from moekit.plan.hardware import GPU, get_gpu
from moekit.plan.layout import Stage, as_config, check_parallel, stages
from moekit.plan.shards import PRECISIONS, Precision, RankBytes, get_precision, rank_bytes
from moekit.plan.step_time import StepConstants, StepTime, step_time

RECOMPUTE = ("none", "selective", "full")
# moekit/parallel/stages.py SCHEDULES (not imported: the planner imports no torch code); "interleaved" is short for
# interleaved-1f1b. Interleaved runs stages_per_rank >= 2 stages per rank (default 2), zero-bubble (ZB-V) exactly 2.
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")
# "mixed": the article's 2 + 2 + 12 B per parameter (ZeRO paper section 3.1, K = 12); "fp32": moekit's 4 + 4 + 8.
OPTIMIZER_PRECISIONS = tuple(PRECISIONS)
ARTICLE_MFU = 0.34  # the middle of the article's 32-36% (SPEC section 3): what --mfu 0.34 reproduces


@dataclass
class TrainMemory:
    """Bytes on the fullest GPU (stage `stage`)."""

    stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass
class TrainPlan:
    model: str
    gpu: str
    n_gpus: int
    tokens: float
    tp: int
    pp: int
    dp: int
    ep: int
    zero_stage: int
    seq_len: int
    micro_batch: int  # sequences per micro-batch
    batch_tokens: float
    recompute: str
    dtype: str  # the peak MFU is measured against
    flops_per_token: float  # 6 x N_active (matmul)
    attention_flops_per_token: float  # 3 x 4 x L x seq_len x q_dim (PaLM appendix B)
    flops: float  # the total that MFU and time count
    include_attention: bool
    peak_flops: float  # per GPU
    mfu: float
    seconds: float
    gpu_hours: float
    price_per_hour: float | None
    cost: float | None
    memory: TrainMemory
    optimizer_precision: str  # "mixed" (2 + 2 + 12 B per parameter) or "fp32" (moekit: 4 + 4 + 8 B)
    ranks: RankBytes | None  # what one rank holds, as moekit shards it (None: a layout moekit does not run)
    collectives: StepComm | None  # one step's collectives on one rank (None: likewise)
    comm_seconds: float | None  # their ring traffic over the hardware's links, one step (a lower bound)
    micro_batches: int
    bubble: float
    tokens_per_expert: float
    layers_per_stage: list[int]
    notes: list[str] = field(default_factory=list)
    mfu_source: str = "predicted"  # "predicted" (from `step`), "given" (--mfu) or "days" (--days)
    step: StepTime | None = None  # the predicted step and its parts (None when --mfu or --days set the time)
    schedule: str = "1f1b"
    stages_per_rank: int = 1
    attention: str = "flash"

    @property
    def days(self) -> float:
        return self.seconds / 86_400

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(days=self.days, memory=dict(d["memory"], total=self.memory.total, fits=self.memory.fits))
        if self.ranks is not None:
            d["ranks"]["total"] = self.ranks.total
        if self.collectives is not None:
            d["collectives"] = self.collectives.to_dict()
        return d


def pipeline_bubble(pp: int, m: int, schedule: str = "1f1b", v: int = 1, w_share: float = 1 / 3) -> float:
    """The idle share of a pipeline step on each stage: bubble time / step time, m micro-batches.

    gpipe, 1f1b: (p - 1) / (m + p - 1) (Huang et al. 2019; Narayanan et al. 2021 eq. 1: (p - 1) (t_f + t_b) idle
    next to m (t_f + t_b) busy). interleaved-1f1b with v stages per rank: each ramp step is a 1/v-sized chunk, so
    (p - 1) / (v m + p - 1) (Narayanan et al. 2021, section 2.2). zero-bubble (ZB-V, Qi et al. 2024, section 6):
    the weight gradients (a share `w_share` of a micro-batch's work, 1/3 when t_f = t_b = t_w) fill the ramps; its
    bubble is (p - 1)(t_f + t_b - 2 t_w) / v per stage, zero when the three are equal, and never below 0. What
    moekit runs is torch's ZB-V (ScheduleZBVZeroBubble), which also leaves the V's ramp-in unfilled: (p - 1) chunk
    forwards (t_f / v each) idle on every stage, twice that when m < 2p - 1 (torch lays the schedule out for 2p - 1
    micro-batches and leaves the missing ones' slots empty). Measured exactly on a modelled device clock, p = 4,
    v = 2, t_f = t_b = t_w (tests/parallel/test_pipeline_bubble.py): 0.200 / 0.059 / 0.030 at m = 4 / 8 / 16; the
    doubling below 2p - 1 is that one measurement's (p = 4, m = 4), not a derivation.
    """
    if pp <= 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (m + pp - 1)
    if schedule == "interleaved-1f1b":
        return (pp - 1) / (v * m + pp - 1)
    if schedule == "zero-bubble":
        f, b, w = (1 - w_share) / 2, (1 - w_share) / 2, w_share  # a micro-batch's work is 1 = f + b + w
        imbalance = (pp - 1) * (f + b - 2 * w) / v
        imbalance = imbalance if imbalance > 1e-12 else 0.0  # 0 at t_f = t_b = t_w, not its float rounding
        ramp_in = (pp - 1) * f / v * (1 if m >= 2 * pp - 1 else 2)
        idle = imbalance + ramp_in
        return idle / (m + idle)
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


def _stage_memory(cfg: ModelConfig, st: Stage, *, tp: int, dp: int, ep: int, zero: int, in_flight: int,
                  tokens_per_micro: int, recompute: str, sp: bool, capacity: float,
                  prec: Precision = PRECISIONS["mixed"]) -> TrainMemory:
    dense_gpu = st.non_expert / tp
    expert_gpu = st.experts / (tp * ep)
    edp = dp // ep  # expert data-parallel group

    def sharded(level: int) -> float:  # parameters per GPU for a state ZeRO shards from `level` on
        return dense_gpu / (dp if zero >= level else 1) + expert_gpu / (edp if zero >= level else 1)

    weights = prec.weights * sharded(3)
    if zero >= 3:  # the gathered working copy of ~2 layers (FSDP prefetches the next one)
        weights += prec.weights * 2 * (st.dense + st.experts) / max(st.layers, 1) / (tp * ep)
    moe_frac = st.moe_layers / st.layers if st.layers else 0.0
    per_token_layer = (moe_frac * activation_bytes(cfg, True, tp, sp)
                       + (1 - moe_frac) * activation_bytes(cfg, False, tp, sp))
    if recompute == "full":  # each layer's input, plus one layer recomputed at a time
        layer_input = 2 * cfg.d_model / (tp if sp else 1)
        acts = (in_flight * st.layers * layer_input + per_token_layer) * tokens_per_micro
    else:  # none, and selective: it drops only the s x s scores (Korthikanti 2022), which FlashAttention never stores
        acts = in_flight * st.layers * per_token_layer * tokens_per_micro
    if st.lm_head:  # fp32 logits of one micro-batch for the loss, split over the vocabulary by tp
        acts += 4 * cfg.vocab_size / tp * tokens_per_micro
    return TrainMemory(stage=st.index, weights=weights, gradients=prec.gradients * sharded(2),
                       optimizer=prec.optimizer * sharded(1), activations=acts, capacity=capacity)


def train(model: ModelConfig | str = "gpt4", gpu: GPU | str = "A100-80GB", n_gpus: int = 25_000,
          tokens: float = 13e12, *, mfu: float | None = None, days: float | None = None, tp: int = 8,
          pp: int = 15, ep: int = 1, zero_stage: int = 1, batch_tokens: float = 60e6,
          seq_len: int | None = None, micro_batch: int = 1, recompute: str = "full",
          sequence_parallel: bool = True, dtype: str = "bf16", price_per_hour: float | None = None,
          include_attention: bool = False, hardware_files: tuple = (),
          optimizer_precision: str = "mixed", schedule: str = "1f1b", stages_per_rank: int = 1,
          attention: str = "flash", constants: StepConstants | None = None) -> TrainPlan:
    """Plan a training run. Give `mfu` (time follows) or `days` (MFU follows); neither: the time is predicted from
    the step's parts (moekit/plan/step_time.py, its fitted `constants` unless given) and MFU follows.

    Defaults are the article's GPT-4 run (SPEC section 3): 13T tokens, 8-way tensor x 15-way pipeline,
    ZeRO stage 1, 60M-token batches of 8k sequences, $1 per A100-hour. `schedule` and `stages_per_rank` are the
    pipeline's (moekit train --schedule, --stages-per-rank): its bubble, and which stages each rank holds.
    `attention`: "flash" (FlashAttention) or "unfused" (softmax over stored s x s scores, Megatron before 2022).
    """
    cfg = as_config(model)
    hw = get_gpu(gpu, hardware_files)
    check_parallel(cfg, tp, pp, ep)
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    for name, value in (("--gpus", n_gpus), ("--seq-len", seq_len), ("--micro-batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not tokens > 0 or not batch_tokens > 0:
        raise ValueError(f"--tokens and --batch-tokens must be > 0, got {tokens} and {batch_tokens}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, got {zero_stage!r}")
    prec = get_precision(optimizer_precision)
    if recompute not in RECOMPUTE:
        raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    schedule = "interleaved-1f1b" if schedule == "interleaved" else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)} (or interleaved), got {schedule!r}")
    if isinstance(stages_per_rank, bool) or not isinstance(stages_per_rank, int) or stages_per_rank < 1:
        raise ValueError(f"--stages-per-rank must be a positive integer, got {stages_per_rank!r}")
    if schedule == "zero-bubble" or (schedule == "interleaved-1f1b" and stages_per_rank == 1):
        stages_per_rank = 2  # ZB-V holds exactly 2 stages per rank; interleaving at least 2
    elif schedule in ("gpipe", "1f1b") and stages_per_rank != 1:
        raise ValueError(f"--schedule {schedule} runs one stage per rank (--stages-per-rank {stages_per_rank} "
                         "given): use --schedule interleaved or zero-bubble")
    if mfu is not None and days is not None:
        raise ValueError("give --mfu or --days, not both: one follows from the other")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"--mfu is a fraction in (0, 1], got {mfu} (34% is 0.34)")
    if days is not None and not days > 0:
        raise ValueError(f"--days must be > 0, got {days}")
    if n_gpus < tp * pp * ep:
        raise ValueError(f"{n_gpus} GPUs cannot hold one replica: tp {tp} x pp {pp} x ep {ep} GPUs")
    notes = []
    if cfg.has_vision:  # (moekit/plan/vision.py)
        notes.append("vision: every token counted as one that sees an image (its cross-attention layers included); "
                     "the encoder's FLOPs, once per image, are not: `moekit plan vision`")
    dp = n_gpus // (tp * pp)
    if dp % ep:
        raise ValueError(f"expert-parallel degree {ep} must divide the data-parallel degree {dp} "
                         f"({n_gpus} GPUs / (tp {tp} x pp {pp}))")
    if n_gpus % (tp * pp):
        notes.append(f"{n_gpus:,} GPUs is not a multiple of tp x pp = {tp * pp}: the layout uses {dp} "
                     f"replicas ({dp * tp * pp:,} GPUs); time and cost count all {n_gpus:,}")
    price = hw.price_per_hour if price_per_hour is None else price_per_hour
    if price is not None and price < 0:
        raise ValueError(f"--price-per-hour must be >= 0, got {price}")

    # FLOPs: 3 x forward (backward = 2 x forward), forward = 2 x matmul-active params (SPEC section 6).
    fwd = flops_per_token(cfg, context=seq_len)
    per_token, attn_per_token = 3 * fwd.matmul, 3 * fwd.attention
    flops = tokens * (per_token + (attn_per_token if include_attention else 0))
    peak = hw.peak_flops(dtype)
    if days is not None:
        seconds = days * 86_400
        mfu = flops / (n_gpus * peak * seconds)
        if mfu > 1:
            raise ValueError(f"{days} days on {n_gpus:,} {hw.name} would need {mfu:.0%} MFU: impossible, "
                             "give more days or GPUs")
    elif mfu is not None:
        seconds = flops / (n_gpus * peak * mfu)
    else:
        seconds = None  # predicted below, once the pipeline and the memory are known

    # Pipeline: micro-batches per step per replica, the 1F1B bubble.
    sequences = batch_tokens / seq_len
    m = math.ceil(sequences / dp / micro_batch)
    if sequences / dp < micro_batch:
        notes.append(f"a {batch_tokens:,.0f}-token batch gives each of {dp} replicas less than one "
                     f"micro-batch of {micro_batch} x {seq_len} tokens")
    m = max(m, 1)
    bubble = pipeline_bubble(pp, m, schedule, stages_per_rank)

    tokens_per_micro = micro_batch * seq_len
    layout = stages(cfg, pp)
    mems = [_stage_memory(cfg, st, tp=tp, dp=dp, ep=ep, zero=zero_stage, in_flight=min(m, pp - st.index),
                          tokens_per_micro=tokens_per_micro, recompute=recompute, sp=sequence_parallel,
                          capacity=hw.memory_bytes, prec=prec)
            for st in layout]
    memory = max(mems, key=lambda x: x.total)
    if not memory.fits:
        notes.append(f"does not fit: stage {memory.stage} needs {memory.total / 1e9:.1f} GB per GPU, "
                     f"{hw.name} has {hw.memory_gb:g} GB (over by "
                     f"{(memory.total - memory.capacity) / 1e9:.1f} GB)")
    # The fullest stage's rank, pipeline stages and --ep included (moekit/plan/shards.py, comm.py).
    pipeline = dict(stages_per_rank=stages_per_rank, schedule=schedule)  # which stages each pipeline rank holds
    ranks = rank_bytes(cfg, dp=dp, tp=tp, zero=zero_stage, precision=optimizer_precision, pp=pp,
                       stage=memory.stage, ep=ep, **pipeline)
    if zero_stage == 1 and tp > 1:
        notes.append("--zero 1 with --tp: each tensor rank's shards are partitioned over its data ranks (moekit's "
                     "ShardedZero1: ZeroRedundancyOptimizer over the local shards); the fullest rank is shown")
    collectives = step_collectives(cfg, dp=dp, tp=tp, zero=zero_stage, precision=optimizer_precision,
                                   micro_batches=m, tokens_per_micro=tokens_per_micro,
                                   sequence_parallel=sequence_parallel, recompute=recompute, pp=pp,
                                   stage=memory.stage, ep=ep, **pipeline)
    comm_seconds = _link_seconds(collectives, hw, tp=tp)
    step, source = None, "given" if mfu is not None else "days"
    if seconds is None:  # MFU as an output: the step from its parts (moekit/plan/step_time.py)
        step = step_time(cfg, hw, tp=tp, pp=pp, dp=dp, ep=ep, zero=zero_stage, micro_batches=m,
                         micro_batch=micro_batch, seq_len=seq_len, recompute=recompute,
                         sequence_parallel=sequence_parallel, attention=attention, precision=optimizer_precision,
                         optimizer_bytes=max(x.optimizer for x in mems), bubble=bubble, constants=constants,
                         dtype=dtype, **pipeline)
        seconds = tokens / (dp * m * tokens_per_micro) * step.seconds  # a step is m micro-batches per replica
        mfu, source = flops / (n_gpus * peak * seconds), "predicted"
        notes.append("MFU predicted from the step's parts (moekit/plan/step_time.py); --mfu or --days set it instead")
    gpu_hours = n_gpus * seconds / 3600
    return TrainPlan(
        model=cfg.name, gpu=hw.name, n_gpus=n_gpus, tokens=tokens, tp=tp, pp=pp, dp=dp, ep=ep,
        zero_stage=zero_stage, seq_len=seq_len, micro_batch=micro_batch, batch_tokens=batch_tokens,
        recompute=recompute, dtype=dtype, flops_per_token=per_token, attention_flops_per_token=attn_per_token,
        flops=flops, include_attention=include_attention, peak_flops=peak, mfu=mfu, seconds=seconds,
        gpu_hours=gpu_hours, price_per_hour=price, cost=None if price is None else gpu_hours * price,
        memory=memory, optimizer_precision=optimizer_precision, ranks=ranks, collectives=collectives,
        comm_seconds=comm_seconds, micro_batches=m, bubble=bubble,
        tokens_per_expert=batch_tokens * cfg.top_k / cfg.n_expert,
        layers_per_stage=[st.layers for st in layout], notes=notes, mfu_source=source, step=step,
        schedule=schedule, stages_per_rank=stages_per_rank, attention=attention)


def _link_seconds(comm: StepComm, hw: GPU, *, tp: int) -> float | None:
    """The step's ring traffic over the links it crosses (module docstring): tensor ranks are neighbours (tp
    innermost, moekit/parallel/mesh.py), so a tensor group inside one node uses NVLink; a data-parallel group
    does too when its ranks (tp apart) fit in one node, else the inter-node network. None: no link figures."""
    wire = comm.wire_by_group()
    if not wire:
        return 0.0
    node = hw.gpus_per_node
    dp_size = max((c.group_size for c in comm.collectives if c.group == "dp"), default=1)
    links = {"tp": hw.nvlink_gb_s if tp <= node else hw.internode_gb_s,
             "dp": hw.nvlink_gb_s if tp * dp_size <= node else hw.internode_gb_s}
    # stages, their embedding group (first and last stage) and expert-data-parallel groups span nodes
    links.update(pp=hw.internode_gb_s, embedding=hw.internode_gb_s, ep=links["dp"], edp=hw.internode_gb_s)
    if any(not links[g] for g in wire):
        return None
    return sum(bytes_ / (links[g] * 1e9) for g, bytes_ in wire.items())


__all__ = ["ARTICLE_MFU", "OPTIMIZER_PRECISIONS", "RECOMPUTE", "SCHEDULES", "TrainMemory", "TrainPlan",
           "activation_bytes", "pipeline_bubble", "train"]
