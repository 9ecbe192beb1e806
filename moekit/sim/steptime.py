"""Step time of one micro-batch: from the planner's hardware table, or from a profile measured on this machine.

    model = HardwareModel("gpt4", "A100-40GB", tp=8, pp=16)       # any GPU of moekit/plan/hardware.py
    cost = model.step(Work(seqs=900, tokens=1000, kv_tokens=1.1e6, attn=1.2e6, logits=900))
    cost.stage_s, cost.hop_s, cost.flops, cost.bytes

The hardware model is the planner's roofline (moekit/plan/serve.py `stage_step`: per stage max(compute, memory)
+ tensor/expert communication + per-layer overhead, a hop between stages), evaluated for the batch the real
scheduler made rather than a uniform one: the tokens scheduled (decode tokens and prefill chunks), the K/V each
sequence's attention reads, the query x key pairs of attention, and the experts the batch touches in each MoE
layer, *drawn* from a routing distribution (uniform, or a trained run's measured expert loads) instead of taken
in expectation. With expert parallelism a layer waits for its most loaded rank (the all-to-all synchronizes
every MoE layer), so a stage's expert time is the sum over its layers of the slowest rank's.
`expected=True` takes the planner's expectation instead of a draw: then `step` equals `stage_step` exactly for a
uniform batch (the oracle tests/test_sim_steptime.py holds it to).

The profile model (moekit/sim/profile.py) is a linear fit of moekit's own engine steps on this machine
(`moekit sim calibrate`); it has one stage and no hop.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np

from moekit.plan.hardware import GPU, get_gpu
from moekit.plan.layout import as_config, check_parallel, kv_heads_per_gpu, stages
from moekit.plan.serve import ACT_BYTES, _fullest, _Setup, stage_memory
from moekit.plan.stage_step import expert_coverage, transfer
from moekit.sim.profile import draw_jitter


@dataclass(slots=True)
class Work:
    """One micro-batch as a step-time model sees it (sums over its scheduled requests)."""

    seqs: int
    tokens: int  # tokens computed: decode tokens, prefill chunks, draft tokens
    kv_tokens: float  # sum of (context before the step + new tokens): the K/V attention reads
    attn: float  # sum of new x (context + (new + 1) / 2): query x key pairs (causal)
    logits: int  # rows sampled


@dataclass(slots=True)
class StepCost:
    stage_s: list[float]  # each pipeline stage's time for this micro-batch
    hop_s: float  # one activation send between two stages
    flops: float  # the whole replica
    bytes: float  # read from HBM, the whole replica
    experts_touched: float  # distinct experts per MoE layer, mean over layers (0 for a dense model)


class HardwareModel:
    """The planner's per-stage roofline for one replica of tp x pp x ep GPUs, per micro-batch."""

    def __init__(self, model, gpu: GPU | str, *, tp: int = 8, pp: int = 16, ep: int = 1, weight_dtype: str = "bf16",
                 kv_dtype: str = "bf16", compute_dtype: str = "bf16", memory_fraction: float = 0.9,
                 prefill_chunk: int = 2048, routing: list[float] | None = None, expected: bool = False,
                 seed: int = 0, hardware_files: tuple = ()):
        cfg = as_config(model)
        check_parallel(cfg, tp, pp, ep)
        hw = get_gpu(gpu, hardware_files)
        hw.peak_flops(compute_dtype)  # raises for a dtype the GPU lacks
        self.cfg, self.hw, self.tp, self.pp, self.ep = cfg, hw, tp, pp, ep
        self.setup = _Setup(cfg=cfg, hw=hw, stages=stages(cfg, pp), tp=tp, pp=pp, ep=ep, weight_dtype=weight_dtype,
                            kv_dtype=kv_dtype, compute_dtype=compute_dtype, context=cfg.max_seq_len,
                            micro_batches=pp, prefill_chunk=prefill_chunk, memory_fraction=memory_fraction)
        self.num_stages = pp
        self.n_gpus = tp * pp * ep
        self.expected = expected
        self.rng = np.random.default_rng(seed)
        E = cfg.n_expert if cfg.is_moe else 0
        if routing is not None:  # (E,) for every layer, or (layers measured, E): layer l takes row l % rows
            p = np.atleast_2d(np.asarray(routing, dtype=float))
            if not E or p.ndim != 2 or p.shape[1] != E or (p < 0).any() or not (p.sum(1) > 0).all():
                raise ValueError(f"the routing distribution must give {E} non-negative loads per layer (one per "
                                 f"expert of {cfg.name}), got shape {tuple(p.shape)}")
            p = p / p.sum(1, keepdims=True)
            self.routing = p[np.arange(cfg.n_moe_layers) % len(p)]  # (MoE layers, E)
        else:
            self.routing = np.full(E, 1 / E) if E else None
        s, wb, kvb = self.setup, self.setup.w_bytes, self.setup.kv_bytes
        peak = hw.peak_flops(compute_dtype) * hw.flops_efficiency
        w_bw, kv_bw = hw.weight_read_bandwidth(weight_dtype), hw.bandwidth * hw.bandwidth_efficiency
        kv_layer_token = 2 * kv_heads_per_gpu(cfg, tp) * cfg.head_dim * kvb
        lat = hw.allreduce_latency_us * 1e-6
        # Per stage, the constants of stage_step's terms, as arrays over the stages: a step costs a few vector
        # operations, whatever the number of stages (one simulated hour of a replica is ~10^5 steps).
        terms = {k: [] for k in ("w_fixed", "w_emb", "w_expert", "kv", "f_dense", "f_expert", "f_attn", "layers",
                                 "moe", "overhead")}
        for st in s.stages:
            for k, v in dict(
                    w_fixed=(st.lm_head + st.dense) / tp * wb,  # read once per step
                    w_emb=(cfg.d_model / tp * wb) if st.embedding else 0.0,  # per group token
                    w_expert=st.expert_layer / tp * wb,  # per touched expert per layer
                    kv=st.layers * kv_layer_token,  # per K/V token read (per group)
                    f_dense=2 * (st.lm_head + st.dense) / tp,  # per group token
                    f_expert=2 * st.expert_layer / tp,  # per expert assignment on a rank
                    f_attn=4 * st.layers * cfg.q_dim / tp,  # per query x key pair (per group)
                    layers=st.layers, moe=st.moe_layers, overhead=st.layers * hw.layer_overhead_us * 1e-6).items():
                terms[k].append(v)
        self._S = {k: np.asarray(v, dtype=float) for k, v in terms.items()}
        self._moe_S = self._S["moe"]
        # The same constants stage by stage, as Python floats: `step` does its ~15 operations on pp numbers in a
        # loop, which costs a third of as many operations on pp-long arrays (numpy's per-call overhead dominates at
        # this size, and a fleet hour is ~10^6 steps); the same IEEE operations in the same order, so the same bits.
        self._stage_terms = list(zip(*(terms[k] for k in ("w_fixed", "w_emb", "w_expert", "kv", "f_dense",
                                                          "f_expert", "f_attn", "layers", "moe", "overhead")),
                                     strict=True))
        self._peak, self._w_bw, self._kv_bw, self._lat = peak, w_bw, kv_bw, lat
        self._link = s.link(tp * ep)
        self._hop_link = s.link(tp * ep * pp)
        self._moe_offsets = np.cumsum([0] + [st.moe_layers for st in s.stages])
        # (stages, MoE layers): 1 where the layer is on the stage; a product with per-layer counts sums them per stage.
        self._stage_of_layer = np.zeros((pp, cfg.n_moe_layers if cfg.is_moe else 0), dtype=np.int64)
        for j in range(pp):
            self._stage_of_layer[j, self._moe_offsets[j]:self._moe_offsets[j + 1]] = 1
        # Uniform routing without expert parallelism (the default): only how many experts a layer touches
        # matters, drawn from its exact distribution (`touched_distribution`) rather than a multinomial per layer.
        self._uniform = routing is None and ep == 1
        self._touched_cdf: dict[int, np.ndarray] = {}
        self._n_moe = cfg.n_moe_layers if cfg.is_moe else 0  # a property that counts: once
        self.driver_s = hw.step_overhead_us * 1e-6  # scheduling and sampling once per micro-batch

    # ---- memory: how many KV blocks a replica holds ------------------------------------------------------
    def kv_tokens_capacity(self) -> int:
        """Tokens of K/V one replica holds: the fullest stage's free memory after weights and workspace.

        Raises ValueError saying by how much the weights overflow when the deployment does not fit."""
        s = self.setup
        empty = _fullest(s, 0)
        if empty.total > empty.usable:
            over = (empty.total - empty.usable) / 1e9
            raise ValueError(
                f"{self.cfg.name} does not fit on tensor {self.tp} x pipeline {self.pp} x expert {self.ep} "
                f"{self.hw.name}: stage {empty.stage} needs {empty.total / 1e9:.1f} GB per GPU for {s.weight_dtype} "
                f"weights and workspace, {empty.usable / 1e9:.1f} GB usable (over by {over:.1f} GB); add "
                "pipeline stages (--pp), use bigger GPUs, or int8/fp8 weights")
        tokens = math.inf
        for st in s.stages:  # stage_memory's KV is affine in the batch: per-token bytes on this stage
            m0, m1 = stage_memory(s, st, 0), stage_memory(s, st, 1)
            per_token = (m1.kv_cache - m0.kv_cache) / (s.context * s.micro_batches)  # one sequence, one token
            tokens = min(tokens, (m0.usable - m0.total) / per_token)
        return int(tokens) * self.ep  # each expert group holds its own sequences' cache

    # ---- one micro-batch -------------------------------------------------------------------------------
    def _expert_terms(self, tokens: int) -> tuple[list, list, float]:
        """Per stage: sum over its MoE layers of the slowest rank's touched experts and assignments; mean
        distinct experts per layer. Drawn from the routing distribution, or the planner's expectation."""
        cfg, ep = self.cfg, self.ep
        n_moe = self._n_moe
        if not n_moe or tokens == 0:
            z = [0.0] * self.pp
            return z, z, 0.0
        k = cfg.top_k
        per_stage = self._moe_S
        if self.expected:
            touched = expert_coverage(cfg.n_expert, k, tokens)
            return (per_stage * touched / ep).tolist(), (per_stage * tokens * k / ep).tolist(), touched
        draws = tokens * k  # a token's k picks as independent draws, which overstates the chance of two picks
        # on one expert by ~k/E: a token then touches 1.94 of 16, not 2.
        if self._uniform:
            cdf = self._touched_cdf.get(draws)
            if cdf is None:
                cdf = self._touched_cdf[draws] = np.cumsum(touched_distribution(cfg.n_expert, draws))
            if cdf[-2] < 1e-15:  # every expert touched in every layer, but for odds below 1e-15 per step
                touched_L = np.full(n_moe, cfg.n_expert)
            else:
                touched_L = np.minimum(np.searchsorted(cdf, self.rng.random(n_moe), side="right"), cfg.n_expert)
            touched_S = (self._stage_of_layer @ touched_L).tolist()  # integers: exact
            return touched_S, (per_stage * draws).tolist(), sum(touched_S) / n_moe
        counts_LE = (self.rng.multinomial(draws, self.routing) if self.routing.ndim == 2
                     else self.rng.multinomial(draws, self.routing, size=n_moe))
        per_rank = counts_LE.reshape(n_moe, ep, -1)
        touched_L = (per_rank > 0).sum(-1).max(-1)  # the slowest rank's distinct experts, per layer
        assign_L = per_rank.sum(-1).max(-1)
        distinct = float((counts_LE > 0).sum()) / n_moe
        return (self._stage_of_layer @ touched_L).tolist(), (self._stage_of_layer @ assign_L).tolist(), distinct

    def step(self, w: Work) -> StepCost:
        ep, tp = self.ep, self.tp
        g_tokens, g_kv, g_attn = w.tokens / ep, w.kv_tokens / ep, w.attn / ep
        touched_S, assign_S, distinct = self._expert_terms(w.tokens)
        act = g_tokens * self.cfg.d_model * ACT_BYTES
        comm_layer = transfer(2 * (tp - 1) / tp * act, self._link, self._lat) if tp > 1 else 0.0
        comm_moe = (transfer(act * self.cfg.top_k * (ep - 1) / ep / tp, self._link, self._lat) if ep > 1 else 0.0)
        comm_layer, comm_moe = 2 * comm_layer, 2 * comm_moe  # each layer all-reduces (or all-to-alls) twice
        peak, w_bw, kv_bw = self._peak, self._w_bw, self._kv_bw
        t_S, f_S, read_S = [], [], []
        for (w_fixed, w_emb, w_expert, kv, f_dense, f_expert, f_attn, layers, moe, overhead), touched, assign in zip(
                self._stage_terms, touched_S, assign_S, strict=True):
            w_read = w_fixed + w_emb * g_tokens + w_expert * touched
            kv_read = g_kv * kv
            f = f_dense * g_tokens + f_expert * assign + f_attn * g_attn
            compute, memory = f / peak, w_read / w_bw + kv_read / kv_bw
            t_S.append((compute if compute > memory else memory) + (comm_layer * layers + comm_moe * moe + overhead))
            f_S.append(f)
            read_S.append(w_read + kv_read)
        hop = transfer(act / tp, self._hop_link, self.hw.hop_latency_us * 1e-6) if self.pp > 1 else 0.0
        gpus_per_stage = tp * ep
        # numpy's sums (pairwise), as the planner's arrays summed them
        return StepCost(t_S, hop, float(np.sum(f_S)) * gpus_per_stage, float(np.sum(read_S)) * gpus_per_stage,
                        distinct)

    def gap_seconds(self, outputs: int, added: int) -> float:
        return self.driver_s

    def describe(self) -> dict:
        return {"kind": "hardware", "gpu": self.hw.name, "tp": self.tp, "pp": self.pp, "ep": self.ep,
                "weight_dtype": self.setup.weight_dtype, "kv_dtype": self.setup.kv_dtype,
                "routing": "expected" if self.expected else "sampled"}


def touched_distribution(n_expert: int, draws: int) -> np.ndarray:
    """P(exactly t of n_expert experts receive at least one of `draws` uniform picks), t = 0..n_expert: the
    occupancy distribution, by inclusion-exclusion, C(E, t) sum_i (-1)^i C(t, i) ((t - i) / E)^draws
    (Feller, vol. I, ch. IV). Exact in float64 for E <= 64: the sum's terms are at most C(E, E/2) in size."""
    E = n_expert
    if draws == 0:
        out = np.zeros(E + 1)
        out[0] = 1.0
        return out
    out = np.zeros(E + 1)
    for t, (c_Et, signed_comb, base) in enumerate(_occupancy_terms(E), start=1):
        out[t] = c_Et * (signed_comb * base ** draws).sum()
    out = np.clip(out, 0.0, None)
    return out / out.sum()


@functools.cache
def _occupancy_terms(n_expert: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per t = 1..E, the parts of touched_distribution's sum that do not depend on the draws: C(E, t),
    (-1)^i C(t, i) and (t - i) / E for i = 0..t (a fleet hour asks for thousands of batch sizes)."""
    out = []
    for t in range(1, n_expert + 1):
        i = np.arange(t + 1)
        out.append((math.comb(n_expert, t), (-1.0) ** i * np.array([math.comb(t, j) for j in i], dtype=float),
                    (t - i) / n_expert))
    return out


class ProfileModel:
    """A measured profile of moekit's engine on this machine (one stage: the engine runs in one process)."""

    def __init__(self, profile, *, jitter: bool = True, seed: int = 0):
        self.profile = profile
        self.num_stages, self.n_gpus = 1, 1
        self.latency_s = profile.latency_s  # outside the engine: the simulator adds it to every arrival
        # Each step's fitted time times a draw from the measured / fitted ratios: the server's steps are not all
        # their batch's median (a shared core, a GC pause), and their tail is in its TTFT and TPOT percentiles.
        self.jitter = profile.jitter if jitter else {}
        self.rng = random.Random(seed)

    def step(self, w: Work) -> StepCost:
        t = self.profile.step_seconds(w.seqs, w.tokens, w.kv_tokens, w.attn, w.logits)
        if self.jitter:
            t *= draw_jitter(self.jitter, t, self.rng.random())
        return StepCost([t], 0.0, 0.0, 0.0, 0.0)

    def gap_seconds(self, outputs: int, added: int) -> float:
        return self.profile.gap_seconds(outputs, added)

    def describe(self) -> dict:
        p = self.profile
        return {"kind": "profile", "model": p.model, "device": p.device, "source": p.source}


def load_routing(run: str) -> np.ndarray:
    """Tokens per expert (MoE layers, E) a trained moekit run measured: the last interval of its metrics.jsonl
    that logged routing (moekit/train/metrics.py `RoutingStats.summary`)."""
    import json
    from pathlib import Path

    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise FileNotFoundError(f"--routing {run}: no metrics.jsonl there; give a moekit run folder")
    last = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        routing = row.get("routing") if isinstance(row, dict) else None
        if isinstance(routing, dict) and routing.get("tokens_per_expert"):
            last = routing["tokens_per_expert"]
    if last is None:
        raise ValueError(f"--routing {run}: {path} logged no routing statistics (train an MoE model first)")
    return np.asarray(last, dtype=float)
