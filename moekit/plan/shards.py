"""What each rank of a moekit training run holds: every parameter's local shard, and the bytes of weights, gradients
and optimizer state on each rank, as moekit/parallel really shards them.

    from moekit.plan.shards import rank_bytes
    r = rank_bytes(get_preset("tiny"), dp=2, tp=1, zero=1, precision="fp32")
    r.weights, r.gradients, r.optimizer, r.optimizer_per_dp_rank      # ZeRO-1's partition, rank by rank

train.py's memory model divides each state evenly by its ZeRO degree (the article's arithmetic, Rajbhandari et al.
2020 figure 1). This one follows moekit's tensors one by one (`params(cfg)` lists exactly
`Transformer(cfg).named_parameters()`), and so predicts what tests/parallel/test_plan_bytes.py measures:

- tensor parallelism (moekit/parallel/tensor.py) splits each weight on one dimension, `torch.chunk`'s way (DTensor's
  Shard: ceil(n / tp) rows for the first ranks, the rest for the last): wq, wk/wv (unless MQA: one KV head is
  replicated, as Megatron and vLLM do), the dense MLP's w1/w3 and the vocabulary of tok_emb/lm_head on dimension 0,
  wo and w2 on 1, the stacked experts on F (w1/w3 (E, F, D) dimension 1, w2 (E, D, F) dimension 2). Norms, the
  router and row-parallel biases are replicated on every tensor rank.
- ZeRO-1 is `torch.distributed.optim.ZeroRedundancyOptimizer`: each rank owns *whole* parameters, assigned
  greedily (largest first, to the rank holding the fewest elements so far, moekit's two weight-decay groups in
  turn). With few large tensors per rank (GPT-4's stacked experts at 208 data-parallel ranks) that is far from
  1/dp: `optimizer_per_dp_rank` is the partition, `optimizer` its fullest rank. DeepSpeed's ZeRO-1 cuts one flat
  buffer evenly instead (train.py's formula).
- FSDP2 (`fully_shard`, --zero 2 and 3) shards dimension 0 of every (tensor-local) weight over the data-parallel
  ranks, torch.chunk's way too; gradients and AdamW state follow the weights. Between steps --zero 2 and 3 hold the
  same; in the step, FSDP2 gathers whole weights: --zero 2 keeps every block's from its forward to its backward
  (the whole model at the peak), --zero 3 about two blocks (the current one and the prefetched next, PyTorch FSDP2
  docs "reshard_after_forward"). That is `gathered`.
- DDP (--zero 0 and 1 without --tp) keeps its own flat copy of the gradients in its communication buckets
  (`gradient_as_bucket_view=False`, DDP's default: PyTorch docs say the view would save "the total gradients size").
  That is `buckets`.

Precision (`PRECISIONS`): "mixed" is the article's mixed-precision Adam, bf16 weights and gradients and 12 bytes of
fp32 master weights, m and v per parameter (ZeRO paper section 3.1, K = 12); "fp32" is how moekit trains: fp32
weights (bf16 only inside autocast matmuls), fp32 gradients, AdamW's exp_avg and exp_avg_sq in fp32 and a
float32 `step` scalar per parameter tensor (torch.optim.AdamW). Pipeline stages follow plan/layout.py's placement.
Expert parallelism (--ep, moekit/parallel/expert.py) splits each stacked expert tensor on E (dimension 0) over the
ep ranks, after tensor parallelism's F split; FSDP2 then shards the experts over the dp / ep expert-data-parallel
ranks (a unit of their own), and DDP reduces their gradients there. moekit/parallel/dry_run.py checks all of it at
GPT-4's full size on the fake process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moekit.config import ModelConfig
from moekit.plan.layout import layers_per_stage, rank_stages


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each training state, and per parameter tensor of the optimizer's step counter."""

    weights: int
    gradients: int
    optimizer: int
    step: int  # AdamW's `step` scalar, one per parameter tensor
    activations: int  # bytes per element of the activations tensor parallelism communicates


PRECISIONS = {
    "mixed": Precision(weights=2, gradients=2, optimizer=12, step=0, activations=2),
    "fp32": Precision(weights=4, gradients=4, optimizer=8, step=4, activations=4),
}


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"--optimizer-precision {name!r}: choose one of {', '.join(PRECISIONS)} (mixed: the "
                         "article's 2+2+12 bytes per parameter; fp32: moekit's fp32 weights, grads and AdamW, 4+4+8)")
    return PRECISIONS[name]


@dataclass(frozen=True)
class Param:
    """One parameter tensor of moekit's Transformer, and how moekit/parallel splits it."""

    name: str  # as Transformer.named_parameters() gives it
    shape: tuple[int, ...]
    group: str  # FSDP2's group: "root" (embedding, final norm, lm_head) or the block's layer index
    tp_dim: int | None  # the dimension tensor parallelism splits; None = replicated on every tensor rank

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decay(self) -> bool:
        """In moekit's weight-decay group (tensors of 2+ dimensions, moekit.train.optim.param_groups)."""
        return len(self.shape) >= 2


def _norm(cfg: ModelConfig, prefix: str, group: str) -> list[Param]:
    out = [Param(f"{prefix}.weight", (cfg.d_model,), group, None)]
    if cfg.norm == "layernorm" and cfg.bias:
        out.append(Param(f"{prefix}.bias", (cfg.d_model,), group, None))
    return out


def _linear(cfg: ModelConfig, prefix: str, out_f: int, in_f: int, group: str, tp_dim: int | None) -> list[Param]:
    """nn.Linear(in_f, out_f): column-parallel (tp_dim 0) splits its bias too; row-parallel (1) replicates it."""
    out = [Param(f"{prefix}.weight", (out_f, in_f), group, tp_dim)]
    if cfg.bias:
        out.append(Param(f"{prefix}.bias", (out_f,), group, 0 if tp_dim == 0 else None))
    return out


def params(cfg: ModelConfig) -> list[Param]:
    """Every parameter of `Transformer(cfg)`, in `named_parameters()` order (a tied lm_head is the embedding)."""
    D, kv = cfg.d_model, 0 if cfg.n_kv_head > 1 else None  # one KV head (MQA) is replicated
    out = [Param("tok_emb.weight", (cfg.vocab_size, D), "root", 0)]  # vocabulary-parallel
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}", str(i)
        out += _norm(cfg, f"{b}.attn_norm", g)
        out += _linear(cfg, f"{b}.attn.wq", cfg.q_dim, D, g, 0)
        out += _linear(cfg, f"{b}.attn.wk", cfg.kv_dim, D, g, kv)
        out += _linear(cfg, f"{b}.attn.wv", cfg.kv_dim, D, g, kv)
        out += _linear(cfg, f"{b}.attn.wo", D, cfg.q_dim, g, 1)
        out += _norm(cfg, f"{b}.mlp_norm", g)
        if cfg.is_moe_layer(i):  # Experts (w1, w3, w2) before the router, as MoE.__init__ builds them
            E, F = cfg.n_expert, cfg.d_ff
            out.append(Param(f"{b}.mlp.experts.w1", (E, F, D), g, 1))
            if cfg.mlp == "swiglu":
                out.append(Param(f"{b}.mlp.experts.w3", (E, F, D), g, 1))
            out.append(Param(f"{b}.mlp.experts.w2", (E, D, F), g, 2))
            out.append(Param(f"{b}.mlp.router.weight", (E, D), g, None))
        else:
            F = cfg.dense_d_ff
            out += _linear(cfg, f"{b}.mlp.w1", F, D, g, 0)
            if cfg.mlp == "swiglu":
                out += _linear(cfg, f"{b}.mlp.w3", F, D, g, 0)
            out += _linear(cfg, f"{b}.mlp.w2", D, F, g, 1)
    out += _norm(cfg, "norm", "root")
    if not cfg.tie_embeddings:
        out.append(Param("lm_head.weight", (cfg.vocab_size, D), "root", 0))
    return out + _vision_params(cfg)


def _vision_params(cfg: ModelConfig) -> list[Param]:
    """The vision side (moekit/model/vision.py), registered after the text model. moekit/parallel/tensor.py plans
    the blocks only, so every vision tensor is replicated on the tensor ranks (tp_dim None), and FSDP2 wraps the
    blocks and then the root, so they fall in the root unit."""
    v = cfg.vision
    if v is None:
        return []
    E, F = v.d_model, v.d_ff

    def lin(name: str, out_f: int, in_f: int, bias: bool = True) -> list[Param]:
        return [Param(f"{name}.weight", (out_f, in_f), "root", None)] + (
            [Param(f"{name}.bias", (out_f,), "root", None)] if bias else [])

    def ln(name: str) -> list[Param]:
        return [Param(f"{name}.weight", (E,), "root", None), Param(f"{name}.bias", (E,), "root", None)]

    def ff(name: str) -> list[Param]:
        return lin(f"{name}.w1", F, E) + lin(f"{name}.w2", E, F)

    enc, res = "vision.encoder", "vision.resampler"
    # A module's own parameters come before its children's in named_parameters(): pos_emb before the patch conv.
    out = [Param(f"{enc}.pos_emb", (v.n_patches, E), "root", None),
           Param(f"{enc}.patch.weight", (E, v.channels, v.patch_size, v.patch_size), "root", None),
           Param(f"{enc}.patch.bias", (E,), "root", None)]
    for i in range(v.n_layer):
        b = f"{enc}.blocks.{i}"
        out += ln(f"{b}.attn_norm") + lin(f"{b}.attn.wqkv", 3 * E, E) + lin(f"{b}.attn.wo", E, E)
        out += ln(f"{b}.mlp_norm") + ff(f"{b}.mlp")
    out += ln(f"{enc}.norm") + [Param(f"{res}.latents", (v.n_latents, E), "root", None)]
    for i in range(v.resampler_layers):
        b = f"{res}.layers.{i}"
        out += ln(f"{b}.media_norm") + ln(f"{b}.latent_norm") + lin(f"{b}.wq", E, E, False)
        out += lin(f"{b}.wkv", 2 * E, E, False) + lin(f"{b}.wo", E, E, False) + ln(f"{b}.mlp_norm") + ff(f"{b}.mlp")
    out += ln(f"{res}.norm") + lin("vision.proj", cfg.d_model, E)
    D, lm = cfg.d_model, cfg.replace(bias=False)  # the cross-attention layers' linears and MLP have no bias
    for i in cfg.cross_attn_layers:
        x = f"xattn.{i}"
        out += [Param(f"{x}.attn_gate", (1,), "root", None), Param(f"{x}.mlp_gate", (1,), "root", None)]
        out += _norm(cfg, f"{x}.attn_norm", "root")
        out += _linear(lm, f"{x}.attn.wq", cfg.q_dim, D, "root", None) + _linear(lm, f"{x}.attn.wk", cfg.kv_dim, D,
                                                                                 "root", None)
        out += _linear(lm, f"{x}.attn.wv", cfg.kv_dim, D, "root", None) + _linear(lm, f"{x}.attn.wo", D, cfg.q_dim,
                                                                                  "root", None)
        out += _norm(cfg, f"{x}.mlp_norm", "root") + _linear(lm, f"{x}.mlp.w1", cfg.dense_d_ff, D, "root", None)
        if cfg.mlp == "swiglu":
            out += _linear(lm, f"{x}.mlp.w3", cfg.dense_d_ff, D, "root", None)
        out += _linear(lm, f"{x}.mlp.w2", D, cfg.dense_d_ff, "root", None)
    return out


def stage_params(cfg: ModelConfig, pp: int = 1, stage: int = 0) -> list[Param]:
    """The parameters pipeline stage `stage` of `pp` holds (plan/layout.py's placement: the embedding on the first
    stage, the final norm and lm_head on the last, which keeps its own copy of a tied embedding)."""
    everything = params(cfg)
    if pp == 1:
        return everything
    counts = layers_per_stage(cfg.n_layer, pp)
    first = sum(counts[:stage])
    mine = {str(i) for i in range(first, first + counts[stage])}
    out = [p for p in everything if p.group in mine]
    if stage == 0:
        out.insert(0, everything[0])
    if stage == pp - 1:
        out += [p for p in everything if p.group == "root" and p.name != "tok_emb.weight" and beside(p) is None]
        if cfg.tie_embeddings:
            out.append(Param("lm_head.weight", everything[0].shape, "root", 0))
    return out + [p for p in everything if str(beside(p)) in mine]


def beside(p: Param) -> int | None:
    """The LM block a vision parameter is placed with in a pipeline (plan/layout.py): the encoder, resampler and
    projector with block 0 (the first stage, which has the tokens' images), a cross-attention layer with the block
    it precedes. None for the text model's own parameters. (moekit/parallel/stages.py does not split a vision
    model yet: this is the planned placement.)"""
    if p.name.startswith("vision."):
        return 0
    if p.name.startswith("xattn."):
        return int(p.name.split(".")[1])
    return None


def rank_params(cfg: ModelConfig, pp: int = 1, pp_rank: int = 0, stages_per_rank: int = 1,
                schedule: str = "1f1b") -> list[Param]:
    """The parameters pipeline rank `pp_rank` holds: those of each of its stages (plan/layout.py `rank_stages`;
    one stage each unless interleaved). A rank holding both the first and the last stage (ZB-V's rank 0) keeps a
    tied embedding once."""
    n = pp * stages_per_rank
    owned = rank_stages(pp, pp_rank, stages_per_rank, schedule)
    out = [p for s in sorted(owned) for p in stage_params(cfg, n, s)]
    if n > 1 and 0 in owned and n - 1 in owned and cfg.tie_embeddings:
        out = [p for p in out if p.name != "lm_head.weight"]
    return out


# ---- shards ----------------------------------------------------------------------------------------------------
def chunk(size: int, n: int, rank: int) -> int:
    """Rank `rank`'s share of `size` rows split `n` ways as torch.chunk (and DTensor's Shard) splits them."""
    c = -(-size // n)
    return max(0, min(size, (rank + 1) * c) - rank * c)


def tp_shape(p: Param, tp: int, tp_rank: int = 0) -> tuple[int, ...]:
    """The tensor-parallel rank's local shape of `p`."""
    if tp == 1 or p.tp_dim is None:
        return p.shape
    shape = list(p.shape)
    shape[p.tp_dim] = chunk(shape[p.tp_dim], tp, tp_rank)
    return tuple(shape)


def is_expert(p: Param) -> bool:
    """A stacked expert tensor (E, out, in): what expert parallelism splits on E."""
    return ".mlp.experts." in p.name


def local_shape(p: Param, *, tp: int = 1, tp_rank: int = 0, fsdp: int = 1, dp_rank: int = 0, ep: int = 1,
                ep_rank: int = 0) -> tuple[int, ...]:
    """This rank's shard: tensor parallelism first, expert parallelism's E split of the experts, then FSDP2's
    dimension-0 split of that (torchtitan's order; under --ep the experts' FSDP2 group is dp / ep ranks: `fsdp`
    is then the expert-data-parallel degree for them, the caller's choice)."""
    shape = list(tp_shape(p, tp, tp_rank))
    if ep > 1 and is_expert(p):
        shape[0] = chunk(shape[0], ep, ep_rank)
    if fsdp > 1:
        shape[0] = chunk(shape[0], fsdp, dp_rank)
    return tuple(shape)


def fsdp_padded_numel(p: Param, tp: int, fsdp: int) -> int:
    """Elements of one rank's padded FSDP2 shard: every rank's is padded to the first's, ceil(rows / fsdp) rows, so
    that the all-gather takes equal pieces (torch's FSDPParam `padded_sharded_param_size`)."""
    shape = tp_shape(p, tp)
    return -(-shape[0] // fsdp) * math.prod(shape[1:])


def zero1_partition(ps: list[Param], dp: int, tp: int = 1, tp_rank: int = 0) -> list[list[Param]]:
    """Which parameters each of `dp` ranks updates under ZeroRedundancyOptimizer (torch 2.14
    `_partition_parameters`): per param group in order (moekit: decayed, then not), largest first, each to the rank
    with the fewest elements so far (the lowest such rank), the counts carried from group to group."""
    sizes, owned = [0] * dp, [[] for _ in range(dp)]
    for group in ([p for p in ps if p.decay], [p for p in ps if not p.decay]):
        for p in sorted(group, key=lambda q: math.prod(tp_shape(q, tp, tp_rank)), reverse=True):
            r = sizes.index(min(sizes))
            owned[r].append(p)
            sizes[r] += math.prod(tp_shape(p, tp, tp_rank))
    return owned


# ---- bytes per rank ------------------------------------------------------------------------------------------------
@dataclass
class RankBytes:
    """Bytes one rank holds (the fullest one where ranks differ), by state; see the module docstring."""

    weights: float  # at rest, between steps (FSDP2: the shard)
    gradients: float  # after the backward
    optimizer: float  # AdamW state after a step (ZeRO-1: the fullest rank of the partition)
    gathered: float  # whole weights FSDP2 gathers for the step (0 without FSDP2)
    buckets: float  # DDP's gradient buckets (0 without DDP)
    optimizer_per_dp_rank: list[float] = field(default_factory=list)  # each data-parallel rank's optimizer bytes
    rank: tuple[int, int] = (0, 0)  # (data-parallel, tensor-parallel) rank described

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.buckets


def rank_bytes(cfg: ModelConfig, *, dp: int = 1, tp: int = 1, zero: int = 0, precision: str = "fp32",
               pp: int = 1, stage: int = 0, dp_rank: int | None = None, tp_rank: int = 0, ep: int = 1,
               stages_per_rank: int = 1, schedule: str = "1f1b") -> RankBytes:
    """The bytes data-parallel rank `dp_rank` (None: ZeRO-1's fullest, else rank 0) and tensor rank `tp_rank` of
    pipeline rank `stage` hold (its stages: `rank_params`), under --zero `zero`, --ep `ep` and `precision` (module
    docstring)."""
    prec = get_precision(precision)
    ps = rank_params(cfg, pp, stage, stages_per_rank, schedule)
    fsdp = dp if zero >= 2 and dp > 1 else 1
    partition = zero1_partition(ps, dp, tp, tp_rank) if zero == 1 and dp > 1 else None

    def shape(p: Param, r: int) -> tuple[int, ...]:
        # Data rank r = edp_index x ep + ep_index (moekit/parallel/mesh.py build_expert_mesh).
        expert = ep > 1 and is_expert(p)
        return local_shape(p, tp=tp, tp_rank=tp_rank, fsdp=fsdp // ep if expert and fsdp > 1 else fsdp,
                           dp_rank=r // ep if expert else r, ep=ep, ep_rank=r % ep)

    def state(owned: list[Param], r: int) -> float:
        numel = sum(math.prod(shape(p, r)) for p in owned)
        return prec.optimizer * numel + prec.step * len(owned)

    per_rank = [state(partition[r] if partition else ps, r) for r in range(dp)]
    if dp_rank is None:
        dp_rank = max(range(dp), key=per_rank.__getitem__) if partition else 0
    local = sum(math.prod(shape(p, dp_rank)) for p in ps)
    whole = sum(math.prod(local_shape(p, tp=tp, tp_rank=tp_rank, ep=ep)) for p in ps)
    gathered = 0.0
    if fsdp > 1:
        blocks: dict[str, int] = {}
        for p in ps:
            blocks[p.group] = blocks.get(p.group, 0) + math.prod(local_shape(p, tp=tp, tp_rank=tp_rank, ep=ep))
        root = blocks.pop("root", 0)
        largest = sorted(blocks.values(), reverse=True)
        # --zero 2: every block stays gathered from its forward to its backward; --zero 3: the current block and the
        # prefetched next. The root (embedding, final norm, lm_head) stays gathered through the step either way.
        gathered = prec.weights * (root + (sum(largest) if zero == 2 else sum(largest[:2])))
    ddp = zero in (0, 1) and dp > 1 and tp == 1 and ep == 1  # (--ep: per-parameter hooks, data.py)
    return RankBytes(weights=prec.weights * local, gradients=prec.gradients * local, optimizer=per_rank[dp_rank],
                     gathered=gathered, buckets=prec.gradients * whole if ddp else 0.0,
                     optimizer_per_dp_rank=per_rank, rank=(dp_rank, tp_rank))


__all__ = ["PRECISIONS", "Param", "Precision", "RankBytes", "beside", "chunk", "fsdp_padded_numel", "get_precision",
           "is_expert", "local_shape", "params", "rank_bytes", "stage_params", "tp_shape", "zero1_partition"]
