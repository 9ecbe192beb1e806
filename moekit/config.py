"""Model configuration: one dataclass that describes every moekit model, dense or sparse.

Derived values are filled in and every field is checked in `__post_init__`; a bad value raises
`ValueError` naming the field, which the CLI prints as one line (DESIGN.md, "Errors").
A leaf: it imports nothing from moekit, so every module can import it (files, presets and overrides
are `moekit.resolve`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MLP_TYPES = ("gelu", "swiglu")  # gelu: GPT-style 2-matrix MLP; swiglu: Llama/Mixtral 3-matrix MLP
NORM_TYPES = ("rmsnorm", "layernorm")
ROPE_TYPES = ("linear", "llama3")  # linear = position interpolation (Chen et al. 2023)


def _check_positive(obj: Any, names: tuple[str, ...], where: str = "") -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}{name} must be a positive integer, got {value!r}")


@dataclass
class VisionConfig:
    """A Flamingo-style vision side (Alayrac et al. 2022; SPEC section 5): a ViT encoder, a Perceiver
    Resampler giving `n_latents` visual tokens per image, and gated cross-attention layers inserted
    before the language-model blocks listed in `cross_attn_layers` (Mllama's form: layers of their
    own, so the MoE blocks stay untouched). Shapes of the encoder are its own (`d_model` here is the
    encoder's width); visual tokens are projected to the language model's width."""

    image_size: int = 32  # square input, pixels per side (images are resized to it)
    patch_size: int = 8
    channels: int = 3
    n_layer: int = 2  # ViT blocks
    d_model: int = 128
    n_head: int = 4
    d_ff: int = 512
    n_latents: int = 16  # visual tokens per image (Flamingo: 64)
    resampler_layers: int = 1  # Flamingo: 6
    cross_attn_every: int = 1  # a cross-attention layer before every N-th LM block (Flamingo-80B: every 7th)
    cross_attn_layers: list[int] = dataclasses.field(default_factory=list)  # LM block indices; [] = derive
    image_token_id: int = -1  # the `<image>` marker in the LM vocabulary; -1 = not assigned yet
    max_images: int = 8  # images per request / sequence the server accepts (a stated limit)

    def __post_init__(self) -> None:
        _check_positive(self, ("image_size", "patch_size", "channels", "n_layer", "d_model", "n_head", "d_ff",
                               "n_latents", "resampler_layers", "cross_attn_every", "max_images"), "vision.")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.patch_size ({self.patch_size}) must divide vision.image_size "
                             f"({self.image_size})")
        if self.d_model % self.n_head:
            raise ValueError(f"vision.n_head ({self.n_head}) must divide vision.d_model ({self.d_model})")
        self.cross_attn_layers = sorted({int(i) for i in self.cross_attn_layers})

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 32000
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12  # query heads
    n_kv_head: int = 1  # 1 = multi-query attention (GPT-4, SPEC section 2); n_head = MHA; else GQA
    head_dim: int = 0  # 0 = d_model // n_head
    d_ff: int = 3072  # hidden size of one expert (or of the dense MLP)
    n_expert: int = 1  # 1 = dense model, no router
    top_k: int = 1
    moe_every: int = 1  # layer i is an MoE layer when (i + 1) % moe_every == 0 (Switch/GShard: every 2nd)
    dense_d_ff: int = 0  # hidden size of the dense MLP in non-MoE layers; 0 = d_ff
    mlp: str = "gelu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    bias: bool = False  # biases in attention and dense MLP projections and in LayerNorm (GPT-3)
    rope_theta: float = 10000.0
    # None, or Hugging Face's dict: {"rope_type": "linear", "factor": 4.0} (position interpolation,
    # how GPT-4-32k is modelled as a fine-tune of the 8k model) or Llama 3.1's "llama3" type.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Router (SPEC section 2: top-2, "quite simple"): softmax over experts, top-k, renormalized.
    aux_loss_coef: float = 0.01  # Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4)
    z_loss_coef: float = 0.001  # ST-MoE router z-loss (Zoph et al. 2022, eq. 5)
    capacity_factor: float = 0.0  # 0 = dropless (default); > 0 = GShard capacity with token dropping
    init_std: float = 0.02
    vision: VisionConfig | None = None  # None = a text-only model

    def __post_init__(self) -> None:
        _check_positive(self, ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "n_expert",
                               "top_k", "moe_every", "max_seq_len"))
        for name in ("head_dim", "dense_d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (0 = derive it), got {value!r}")
        if self.head_dim == 0:
            if self.d_model % self.n_head:
                raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model}), "
                                 "or set head_dim explicitly")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.top_k > self.n_expert:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed n_expert ({self.n_expert})")
        if self.dense_d_ff == 0:
            self.dense_d_ff = self.d_ff
        if self.mlp not in MLP_TYPES:
            raise ValueError(f"mlp must be one of {MLP_TYPES}, got {self.mlp!r}")
        if self.norm not in NORM_TYPES:
            raise ValueError(f"norm must be one of {NORM_TYPES}, got {self.norm!r}")
        if self.bias and self.norm == "rmsnorm":
            raise ValueError("bias=True needs norm='layernorm' (RMSNorm has no bias)")
        if self.bias and self.n_expert > 1:
            raise ValueError("bias=True is only supported for dense models (n_expert=1): experts have no bias")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        for name in ("aux_loss_coef", "z_loss_coef", "capacity_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if self.vision is not None:
            self._check_vision()

    def _check_vision(self) -> None:
        if isinstance(self.vision, dict):  # from JSON (config.json of a run, a preset file)
            known = {f.name for f in dataclasses.fields(VisionConfig)}
            unknown = sorted(set(self.vision) - known)
            if unknown:
                raise ValueError(f"unknown vision field(s) {unknown}; known fields: {sorted(known)}")
            self.vision = VisionConfig(**self.vision)
        v = self.vision
        if not isinstance(v, VisionConfig):
            raise ValueError(f"vision must be None or a VisionConfig, got {type(v).__name__}")
        bad = [i for i in self.cross_attn_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"vision.cross_attn_layers {bad} are not blocks of this {self.n_layer}-layer model")
        if not -1 <= v.image_token_id < self.vocab_size:
            raise ValueError(f"vision.image_token_id ({v.image_token_id}) is not in the vocabulary "
                             f"(0..{self.vocab_size - 1}), nor -1 (unassigned)")

    def _check_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if not isinstance(rs, dict) or rs.get("rope_type") not in ROPE_TYPES:
            raise ValueError(f"rope_scaling must be None or a dict with rope_type in {ROPE_TYPES}, got {rs!r}")
        if not float(rs.get("factor", 0)) >= 1:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {rs.get('factor')!r}")
        if rs["rope_type"] == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in rs:
                    raise ValueError(f"rope_scaling of type llama3 needs {key!r}")

    # ---- derived properties -------------------------------------------------------------------
    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def cross_attn_layers(self) -> list[int]:
        """LM block indices preceded by a gated cross-attention layer (vision.cross_attn_layers, or every
        cross_attn_every-th block from block 0)."""
        if self.vision is None:
            return []
        return self.vision.cross_attn_layers or list(range(0, self.n_layer, self.vision.cross_attn_every))

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 1

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and (i + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))

    @property
    def q_dim(self) -> int:  # width of the query / attention-output projection
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed; derived fields are recomputed unless given."""
        d = self.to_dict()
        unknown = sorted(set(overrides) - set(d))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(d))}")
        # head_dim / dense_d_ff were derived from the old shape: re-derive them when the shape changes.
        if "head_dim" not in overrides and ({"d_model", "n_head"} & set(overrides)):
            d["head_dim"] = 0
        if "dense_d_ff" not in overrides and "d_ff" in overrides:
            d["dense_d_ff"] = 0
        d.update(overrides)
        return ModelConfig(**d)


__all__ = ["ModelConfig", "VisionConfig"]
