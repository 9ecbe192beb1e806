"""Analytic counts of a ModelConfig: parameters (total, active, by component), FLOPs and KV-cache bytes.

Pure arithmetic on the config, no torch: the planner (`moekit.plan`) and `moekit info` use these,
and `tests/test_counts.py` checks that they equal `sum(p.numel())` of the built model for every preset.

Conventions (SPEC section 6):
- *active* parameters are those a token uses: everything except the (n_expert - top_k) experts it
  is not routed to. The input embedding counts as active (it is read), as is common practice.
- forward FLOPs per token = 2 x (active parameters that enter a matmul) = 2 x (active - input
  embedding) (Kaplan et al. 2020, table 1). The attention score/value FLOPs, which grow with
  context, are reported apart: 4 x n_layer x context x n_head x head_dim (QK^T and AV, 2 FLOPs each
  per multiply-add).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # input token embedding
    lm_head: int  # 0 when tied to the embedding
    attention: int  # q, k, v, o projections (+ biases), all layers
    experts: int  # all experts of all MoE layers
    per_expert: int  # one expert's MLP summed over the MoE layers (SPEC: ~111B for GPT-4)
    dense_mlp: int  # MLPs of non-MoE layers
    router: int
    norms: int
    total: int
    active: int  # parameters one token uses (top_k of n_expert experts)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _mlp_params(d_model: int, d_ff: int, mlp: str, bias: bool) -> int:
    n_mat = 3 if mlp == "swiglu" else 2
    n = n_mat * d_model * d_ff
    if bias:
        n += (n_mat - 1) * d_ff + d_model
    return n


def count_params(cfg: ModelConfig) -> ParamCounts:
    d = cfg.d_model
    attn_layer = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d
    if cfg.bias:
        attn_layer += cfg.q_dim + 2 * cfg.kv_dim + d
    norm_size = 2 * d if cfg.norm == "layernorm" and cfg.bias else d
    n_moe = cfg.n_moe_layers
    n_dense = cfg.n_layer - n_moe

    per_expert = n_moe * _mlp_params(d, cfg.d_ff, cfg.mlp, bias=False)
    experts = cfg.n_expert * per_expert if cfg.is_moe else 0
    dense_mlp = n_dense * _mlp_params(d, cfg.dense_d_ff, cfg.mlp, cfg.bias)
    router = n_moe * cfg.n_expert * d
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    attention = cfg.n_layer * attn_layer
    norms = (2 * cfg.n_layer + 1) * norm_size
    total = embedding + lm_head + attention + experts + dense_mlp + router + norms
    active = total - (cfg.n_expert - cfg.top_k) * per_expert if cfg.is_moe else total
    return ParamCounts(embedding=embedding, lm_head=lm_head, attention=attention, experts=experts,
                       per_expert=per_expert if cfg.is_moe else 0, dense_mlp=dense_mlp, router=router,
                       norms=norms, total=total, active=active)


@dataclass(frozen=True)
class FlopCounts:
    matmul: int  # 2 x active matmul parameters: independent of context
    attention: int  # QK^T and AV at the given context
    context: int

    @property
    def total(self) -> int:
        return self.matmul + self.attention


def flops_per_token(cfg: ModelConfig, context: int = 0) -> FlopCounts:
    """Forward FLOPs for one token that attends to `context` tokens (training: x3 for fwd + bwd)."""
    c = count_params(cfg)
    # The input embedding is a lookup, not a matmul; a tied embedding is still read by the lm_head.
    matmul_params = c.active - c.embedding + (c.embedding if cfg.tie_embeddings else 0)
    attention = 4 * cfg.n_layer * context * cfg.q_dim
    return FlopCounts(matmul=2 * matmul_params, attention=attention, context=context)


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_element: float = 2, n_kv_head: int | None = None) -> float:
    """KV-cache bytes for one token: 2 (K and V) x layers x KV heads x head_dim x bytes (SPEC section 6).

    `n_kv_head` overrides the config's, e.g. `n_kv_head=cfg.n_head` for what full MHA would need.
    """
    kv_heads = cfg.n_kv_head if n_kv_head is None else n_kv_head
    return 2 * cfg.n_layer * kv_heads * cfg.head_dim * bytes_per_element


def weight_bytes(cfg: ModelConfig, bytes_per_param: float, active: bool = False) -> float:
    c = count_params(cfg)
    return (c.active if active else c.total) * bytes_per_param
