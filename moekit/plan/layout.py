"""How a model is cut into pipeline stages and sharded over tensor/expert-parallel GPUs.

Used by both cost models (`train.py`, `serve.py`). All parameter figures come from
`moekit.counts.count_params`, divided per layer; nothing is counted twice.

Placement (SPEC section 4, "the head node holds fewer layers"): layers are split into contiguous
stages as evenly as possible, and when they do not divide evenly the extra layers go to the middle
stages first, because the first stage also holds the token embedding and the last the output layer.
GPT-4 at 120 layers: 15 stages of 8 (training), or 8 + 7 + ... with the two end stages at 7 (16-way).

A vision model's encoder, resampler and projector sit on the first stage (where the images come in: Mllama and
vLLM run the encoder before the language model), each cross-attention layer on the stage of the block it
precedes. Of a cross-attention layer, the K/V projections run once per image (`vision`, like the encoder), the
rest once per token that sees an image (`dense`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import ModelConfig
from moekit.counts import count_params


@dataclass(frozen=True)
class Stage:
    index: int
    layers: int  # transformer blocks held by this stage
    moe_layers: int
    embedding: float  # token-embedding parameters held (a lookup: bytes, no FLOPs)
    lm_head: float  # output-layer parameters held (a matmul)
    dense: float  # attention, norms, router and dense MLPs of the stage's layers (+ the final norm)
    experts: float  # every expert of the stage's MoE layers
    expert_layer: float  # one expert in one layer (GPT-4: 8 d^2 = 925M)
    top_k: int
    vision: float = 0.0  # run once per image, not per token: encoder, resampler, projector; cross-attention K/V

    @property
    def params(self) -> float:
        return self.embedding + self.lm_head + self.dense + self.experts + self.vision

    @property
    def non_expert(self) -> float:
        """Parameters held whole by every expert group: split by tensor parallelism, replicated over expert
        parallelism (all but `vision` are read by every token)."""
        return self.embedding + self.lm_head + self.dense + self.vision

    @property
    def matmul_active(self) -> float:
        """Parameters one token multiplies by here: 2 FLOPs each (the embedding lookup does not count)."""
        return self.lm_head + self.dense + self.moe_layers * self.top_k * self.expert_layer


def as_config(model: ModelConfig | str) -> ModelConfig:
    """A ModelConfig from itself, a preset name or a path (`moekit.resolve.resolve_config`)."""
    if isinstance(model, ModelConfig):
        return model
    from moekit.resolve import resolve_config  # lazily: the planner's formulas need no file reading

    return resolve_config(model)


def check_parallel(cfg: ModelConfig, tp: int, pp: int = 1, ep: int = 1) -> None:
    """Raise ValueError, in one line that says what to pick instead, if the degrees do not fit the model."""
    for name, value in (("tensor-parallel degree --tp", tp), ("pipeline degree --pp", pp),
                        ("expert-parallel degree --ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cfg.n_head % tp:
        ok = [d for d in range(1, min(cfg.n_head, 64) + 1) if cfg.n_head % d == 0]
        raise ValueError(f"tensor-parallel degree {tp} does not divide the {cfg.n_head} attention heads of "
                         f"{cfg.name}; choose --tp from {', '.join(map(str, ok))}")
    # KV heads are split when there are enough, replicated when there are fewer than tp (vLLM does the
    # same); MQA's single head is replicated on every GPU of the tensor-parallel group.
    if cfg.n_kv_head % tp and tp % cfg.n_kv_head:
        raise ValueError(f"tensor-parallel degree {tp} neither divides nor is a multiple of the "
                         f"{cfg.n_kv_head} KV heads of {cfg.name}")
    for name, width in (("expert hidden size d_ff", cfg.d_ff), ("dense_d_ff", cfg.dense_d_ff)):
        if width % tp:
            raise ValueError(f"tensor-parallel degree {tp} does not divide the {name} ({width})")
    if pp > cfg.n_layer:
        raise ValueError(f"pipeline degree {pp} exceeds the {cfg.n_layer} layers of {cfg.name}")
    if ep > 1 and (not cfg.is_moe or cfg.n_expert % ep):
        raise ValueError(f"expert-parallel degree {ep} must divide the {cfg.n_expert} experts of {cfg.name}")


def kv_heads_per_gpu(cfg: ModelConfig, tp: int) -> int:
    return max(1, cfg.n_kv_head // tp)


def layers_per_stage(n_layer: int, pp: int) -> list[int]:
    base, extra = divmod(n_layer, pp)
    counts = [base] * pp
    # Middle stages first, then the last (output layer), then the first (embedding, data loading).
    order = list(range(1, pp - 1)) + ([pp - 1] if pp > 1 else []) + [0]
    for s in order[:extra]:
        counts[s] += 1
    return counts


def rank_stages(pp: int, pp_rank: int, stages_per_rank: int = 1, schedule: str = "1f1b") -> list[int]:
    """The stages (of pp x stages_per_rank) pipeline rank `pp_rank` holds: the loop order s % pp of Megatron's
    interleaving and torch's ScheduleInterleaved1F1B, or for the V-shaped zero-bubble schedule stage r on the way
    down and 2pp - 1 - r on the way back (Qi et al. 2024, ZB-V): one placement rule for moekit/parallel/pipeline.py
    and the planner."""
    if schedule == "zero-bubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def rank_of_stage(pp: int, stage: int, stages_per_rank: int = 1, schedule: str = "1f1b") -> int:
    return next(r for r in range(pp) if stage in rank_stages(pp, r, stages_per_rank, schedule))


def stages(cfg: ModelConfig, pp: int = 1) -> list[Stage]:
    """The pipeline stages of `cfg` cut `pp` ways, with the parameters each holds."""
    c = count_params(cfg)
    L = cfg.n_layer
    n_moe = cfg.n_moe_layers
    n_dense = L - n_moe
    attn_layer = c.attention / L
    norm_size = c.norms / (2 * L + 1)  # two per block and a final one
    expert_layer = c.per_expert / n_moe if n_moe else 0.0
    router_layer = c.router / n_moe if n_moe else 0.0
    dense_mlp_layer = c.dense_mlp / n_dense if n_dense else 0.0
    # A tied embedding is also the output layer: with pp > 1 the last stage keeps a copy (Megatron-LM).
    lm_head = c.lm_head if c.lm_head else c.embedding
    xattn = set(cfg.cross_attn_layers)
    xattn_kv = 2 * cfg.d_model * cfg.kv_dim  # one cross-attention layer's wk and wv
    xattn_token = c.cross_attn / len(xattn) - xattn_kv if xattn else 0.0
    encoder = c.vision_encoder + c.vision_resampler + c.vision_projector

    out, first = [], 0
    for s, n in enumerate(layers_per_stage(L, pp)):
        moe = sum(cfg.is_moe_layer(i) for i in range(first, first + n))
        n_x = len(xattn & set(range(first, first + n)))
        first += n
        last = s == pp - 1
        dense = n * (attn_layer + 2 * norm_size) + moe * router_layer + (n - moe) * dense_mlp_layer
        dense += n_x * xattn_token
        if last:
            dense += norm_size
        embedding = c.embedding if s == 0 and not (pp == 1 and cfg.tie_embeddings) else 0.0
        out.append(Stage(index=s, layers=n, moe_layers=moe, embedding=embedding,
                         lm_head=lm_head if last else 0.0, dense=dense,
                         experts=moe * cfg.n_expert * expert_layer if cfg.is_moe else 0.0,
                         expert_layer=expert_layer if cfg.is_moe else 0.0, top_k=cfg.top_k,
                         vision=n_x * xattn_kv + (encoder if s == 0 else 0.0)))
    return out


__all__ = ["Stage", "as_config", "check_parallel", "kv_heads_per_gpu", "layers_per_stage", "rank_of_stage",
           "rank_stages", "stages"]
