"""Tensor + sequence parallelism (Megatron-LM) for a built moekit `Transformer`, applied from outside with DTensor.

    mesh = init_device_mesh("cuda", (8,), mesh_dim_names=("tp",))      # or mesh["tp"] of moekit/parallel/mesh.py
    model = Transformer(cfg); model.init_weights(seed)                 # the same seed weights on every tensor rank
    apply_tensor_parallel(model, mesh, sequence_parallel=True, loss_parallel=True)
    with loss_context(loss_parallel=True):                             # forward and backward both inside it
        out = model(idx_BT, targets_BT)                                # every tensor rank sees the same full batch
        out.loss.backward()

What is split (Shoeybi et al. 2019, "Megatron-LM"; Korthikanti et al. 2022, "Reducing Activation Recomputation"
for the sequence-parallel part), plan for plan torchtitan's `apply_tp` (torchtitan/models/llama3/infra/parallelize.py)
and its MoE plan (`apply_moe_ep_tp`, torchtitan/models/llama4/infra/parallelize.py):

- attention: wq column-parallel (each rank owns n_head / tp query heads), wo row-parallel. K/V column-parallel when
  tp divides n_kv_head; with one KV head (MQA, GPT-4) wk/wv are replicated and every rank computes that one head,
  as Megatron and vLLM do when tp > n_kv_head. Each Attention's `n_head`/`n_kv_head` become the local counts, so
  its `.view(B, T, n_head, head_dim)` sees the local shard (gpt-fast's tp.py and torchtitan adjust them the same way).
- dense MLP: w1/w3 column-parallel, w2 row-parallel.
- experts: each expert's hidden dimension F is split (w1/w3 (E, F, D) on dim 1, w2 (E, D, F) on dim 2); every rank
  runs the grouped kernel (moekit/model/grouped.py, plain tensors) on its F-slice of every routed expert, and the
  partial outputs are summed once per MoE layer (an all-reduce; a reduce-scatter under sequence parallel). The
  router is replicated and routes the full sequence, so routing statistics and the aux/z losses are one process's.
- embedding row-parallel (vocabulary split), lm_head column-parallel (vocabulary split; logits all-gathered, or
  left vocabulary-sharded for `loss_parallel`, where the cross-entropy never gathers them).
- sequence parallel: norms run on a sequence shard (Shard(1)); the inputs of attention and of the MLP/MoE are
  all-gathered, their outputs reduce-scattered; the residual stream between blocks is a local sequence shard.
  RoPE's cos/sin are computed by `Transformer.forward` from the full positions: they line up because attention
  runs on the all-gathered (full) sequence. The sequence length must divide by tp.

Every parameter becomes a DTensor on `tp_mesh` (replicated ones too), so gradient clipping, optimizers, FSDP2 and
DCP see one kind of tensor; `p.full_tensor()` gathers a weight. Gradients always come back in their parameter's
layout: a replicated weight whose gradient is a per-rank partial sum (a sequence-parallel norm, MQA's wk/wv) is
all-reduced by a hook as it accumulates, so `.grad` is never a `Partial` DTensor. Weights are loaded or initialized
before this is applied (a seed checkpoint: `init_weights`/`load_tensors` write plain tensors).

Without sequence parallelism the model also serves: the engine's paged KV cache (`ctx`) and `logits_rows` work
as in one process, each rank caching its local KV heads (moekit/infer/worker.py). Under sequence
parallelism neither does (both raise).
Under `loss_parallel` the returned logits are a vocabulary-sharded DTensor (`out.logits.full_tensor()` gathers
them); `out.loss`/`out.ce_loss` are plain tensors either way.

Shape legend as in moekit/model: B batch, T tokens, D d_model, E experts, F expert hidden, V vocabulary.
Checked against one process (losses, final weights, routing) by tests/parallel/test_tensor_parallel.py.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moekit.parallel.mesh import check_tp

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moekit.model.transformer import Transformer

# The public `torch.distributed.tensor` namespace (DTensor, Shard/Replicate/Partial, distribute_tensor) and the
# tensor-parallel styles with PrepareModuleInput + loss_parallel are all there from torch 2.5 (pyproject's floor);
# tested on torch 2.14.
MIN_TORCH = (2, 5)


def tensor_parallel_available() -> bool:
    """True when this torch has everything apply_tensor_parallel uses (torch >= MIN_TORCH with distributed)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return version >= MIN_TORCH and torch.distributed.is_available()


def loss_context(loss_parallel: bool) -> contextlib.AbstractContextManager:
    """What the trainer wraps forward *and* backward in: torch's `loss_parallel()` (cross-entropy on
    vocabulary-sharded logits, PyTorch docs "torch.distributed.tensor.parallel.loss_parallel"), or nothing."""
    if not loss_parallel:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel as _loss_parallel

    return _loss_parallel()


# ---- gradient-only helpers -------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.scale, None


def _all_reduce_grad(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Megatron's `f` (copy to the tensor-parallel region): identity forward, all-reduce of the gradient backward.
    Spelled in DTensor terms (torchtitan's expert TensorParallel does the same): the local gradient is declared a
    partial sum, and `from_local`'s backward makes it Replicate."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _grad_in_param_layout(param: nn.Parameter):
    def hook(grad):
        # A replicated weight used on a sequence shard (norms under SP) or by rank-local heads (MQA's wk/wv) gets
        # a Partial gradient: sum it now (Megatron all-reduces the same norm gradients). DTensor's
        # embedding backward returns the vocabulary-split weight's gradient whole (Replicate): keep this rank's
        # rows. Then `.grad` matches the parameter and DDP / clipping / checkpoints never meet another layout.
        if grad.placements != param.placements:
            return grad.redistribute(placements=param.placements)
        return grad

    return hook


# ---- parallel styles moekit adds to torch's Colwise/Rowwise/SequenceParallel ------------------------------------
def _styles():
    """The ParallelStyle classes, defined on first use so that importing this module needs no torch.distributed."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    def replicate_params(name, module, mesh):
        for p_name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(p_name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])))

    class PrepareInput(ParallelStyle):
        """The module's first positional input (a local tensor in `layout`, or a DTensor) made a Replicate DTensor
        (an all-gather from a sequence shard): PrepareModuleInput for one input, whatever the signature."""

        def __init__(self, layout):
            super().__init__()
            self.layout = layout

        def _apply(self, module, mesh):
            def pre_hook(mod, args):
                x = args[0]
                if not isinstance(x, DTensor):
                    x = DTensor.from_local(x, mesh, [self.layout], run_check=False)
                return (x.redistribute(placements=[Replicate()]), *args[1:])

            module.register_forward_pre_hook(pre_hook)
            return module

    class ReplicateParallel(ParallelStyle):
        """Weights replicated, the computation repeated on every tensor rank (torchtitan's `NoParallel`).
        partial_grad: the output's gradient is a per-rank partial sum (MQA's K/V: each rank's query heads only
        contribute theirs), so it is declared Partial and summed where DTensor needs it."""

        def __init__(self, *, partial_grad: bool = False):
            super().__init__()
            self.grad_placements = [Partial()] if partial_grad else None

        def _apply(self, module, mesh):
            def input_fn(mod, args, mesh):
                x = args[0]
                if not isinstance(x, DTensor):  # a full, replicated local tensor (no sequence parallel)
                    x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                return (x.redistribute(placements=[Replicate()]), *args[1:])

            def output_fn(mod, out, mesh):
                return out.to_local(grad_placements=self.grad_placements)

            return distribute_module(module, mesh, replicate_params, input_fn, output_fn)

    class MoETensorParallel(ParallelStyle):
        """The MoE layer's boundary. Inside, every rank holds the full (all-gathered) tokens and routes them as one
        process would; the experts' outputs are per-rank partial sums over F-slices, and so, by linearity, is every
        gradient inside the layer: the "partial domain". Entering it, the input's gradient is declared Partial (an
        all-reduce, or under SP the all-gather's reduce-scatter, sums it); leaving it, the output is summed (all-
        reduce or reduce-scatter) once, on T rows, as torchtitan's `PrepareModuleInputOutput(output_layouts=Partial)`.
        The aux and z losses are computed identically on every rank: their gradients enter the domain at full
        size, so they are scaled by 1/tp (their values are untouched) and the sum over ranks counts them once."""

        def __init__(self, layout, dtensor_losses: bool):
            super().__init__()
            self.layout, self.dtensor_losses = layout, dtensor_losses

        def _apply(self, module, mesh):
            tp = mesh.size()

            def router_loss(loss):
                loss = _ScaleGrad.apply(loss, 1.0 / tp)
                # Under loss_parallel the cross-entropy is a DTensor, and `ce + coef * aux` must not mix a DTensor
                # with the plain tensors of the router's graph (the backward would meet both in one op).
                return DTensor.from_local(loss, mesh, [Replicate()], run_check=False) if self.dtensor_losses else loss

            def pre_hook(mod, args):
                x = args[0]  # a local shard, or a DTensor (SequenceParallel's norm output)
                if not isinstance(x, DTensor):
                    x = DTensor.from_local(x, mesh, [self.layout], run_check=False)
                return (x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()]), *args[1:])

            def post_hook(mod, args, out):
                y_BTD, info = out
                y_BTD = DTensor.from_local(y_BTD, mesh, [Partial()], run_check=False)
                y_BTD = y_BTD.redistribute(placements=[self.layout]).to_local()
                if info.aux_loss is not None:
                    info.aux_loss, info.z_loss = router_loss(info.aux_loss), router_loss(info.z_loss)
                return y_BTD, info

            module.register_forward_pre_hook(pre_hook)
            module.register_forward_hook(post_hook)
            return module

    class RouterParallel(ParallelStyle):
        """The replicated router inside the MoE's partial domain: its input's gradient leaves scaled by 1/tp (the
        router's own gradient is made whole, so each rank contributes a 1/tp share); its logits' gradient (partial
        through the combine weights) is all-reduced on entry, T x E numbers instead of T x D, and the router
        weight's gradient is then whole and equal on every rank."""

        def _apply(self, module, mesh):
            tp = mesh.size()

            def input_fn(mod, args, mesh):
                x = _ScaleGrad.apply(args[0], 1.0 / tp)
                return (DTensor.from_local(x, mesh, [Replicate()], run_check=False), *args[1:])

            def output_fn(mod, logits, mesh):
                return _all_reduce_grad(logits.to_local(), mesh)

            return distribute_module(module, mesh, replicate_params, input_fn, output_fn)

    class ExpertTensorParallel(ParallelStyle):
        """Experts sharded on F (torchtitan's expert `TensorParallel`, distributed/expert_parallel.py): w1/w3
        Shard(1), w2 Shard(2). The kernels take plain tensors: `Experts.local_weights` hands them the local
        shards (`to_local()`: its backward gives the shard's gradient in the parameter's layout), as torchtitan's
        GroupedExperts does; the parameters themselves stay DTensors, so FSDP2 (which reads them by attribute)
        shards them further over the data-parallel ranks. No communication here: MoETensorParallel sums the
        partial outputs."""

        def _apply(self, module, mesh):
            def partition(name, mod, mesh):
                if mod is not module:
                    return
                for p_name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
                    p = mod._parameters.get(p_name)
                    if p is not None:
                        mod.register_parameter(p_name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(dim)])))

            distribute_module(module, mesh, partition)  # Experts.local_weights then computes on the shards
            return module

    class ExpertShardParallel(ParallelStyle):
        """Serving's expert parallelism inside the tensor-parallel group (vLLM's --enable-expert-parallel without
        data parallelism): whole experts, w1/w2/w3 Shard(0) on E, so rank r holds experts [r E/tp, (r+1) E/tp).
        Every rank holds every token (attention is tensor-parallel), so no all-to-all is needed: each rank runs
        its own experts on the rows routed to them (`Experts.expert_range`), and the MoE's one sum over the ranks
        (MoETensorParallel, as for F-split experts) combines them. Forward only."""

        def _apply(self, module, mesh):
            n, r = mesh.size(), mesh.get_local_rank()

            def partition(name, mod, mesh):
                if mod is not module:
                    return
                for p_name in ("w1", "w3", "w2"):
                    p = mod._parameters.get(p_name)
                    if p is not None:
                        mod.register_parameter(p_name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))

            distribute_module(module, mesh, partition)
            per = module.n_expert // n
            module.expert_range = (r * per, (r + 1) * per)
            return module

    return (PrepareInput, ReplicateParallel, MoETensorParallel, RouterParallel, ExpertTensorParallel,
            ExpertShardParallel)


# ---- the plan --------------------------------------------------------------------------------------------------
def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool,
                          loss_parallel: bool, shard_experts: bool = True, split_experts: bool = False) -> Transformer:
    """Shard `model` (built, holding the same weights on every rank of `tp_mesh`) in place over the 1-D `tp_mesh`.
    shard_experts=False leaves the experts' weights whole: expert parallelism then shards them on E and F at once
    (moekit/parallel/expert.py); the MoE boundary and the router are tensor-parallel either way. split_experts=True
    gives each tensor rank whole experts instead (serving's expert parallelism, ExpertShardParallel; the number of
    experts must divide by tp).

    First in torchtitan's order: tensor -> expert -> activation checkpointing -> compile -> FSDP (DESIGN.md).
    A mesh of one rank leaves the model as it is (the single-process path). Returns the model.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    from moekit.model.moe import MoE

    if not tensor_parallel_available():
        raise RuntimeError(f"tensor parallelism needs torch >= {'.'.join(map(str, MIN_TORCH))} with "
                           f"torch.distributed; this is torch {torch.__version__}")
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel takes the 1-D tensor-parallel mesh (mesh['tp']), got {tp_mesh}")
    cfg, tp = model.cfg, tp_mesh.size()
    check_tp(tp, cfg)  # --tp must divide the heads and hidden sizes (ValueError naming the choices)
    if tp == 1:
        return model
    PrepareInput, ReplicateParallel, MoETensorParallel, RouterParallel, ExpertTensorParallel, ExpertShardParallel = (
        _styles())
    if split_experts and cfg.n_expert % tp:
        raise ValueError(f"--ep {tp} must divide the {cfg.n_expert} experts")
    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()  # the residual stream between blocks: a sequence shard, or everything
    norm_style = SequenceParallel if sp else ReplicateParallel
    kv_sharded = cfg.n_kv_head > 1  # check_tp: then tp divides it

    ends = {
        # Vocabulary-split embedding: each rank looks up its rows, the partial sums are reduce-scattered (SP) or
        # all-reduced, exactly torchtitan's `tok_embeddings` entry.
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "norm": norm_style(),
        "lm_head": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                   use_local_output=not loss_parallel),
    }
    # A pipeline stage (moekit/parallel/pipeline.py) may hold neither end: its missing modules are None. Between
    # stages the residual stream travels in its tensor-parallel layout (each tensor rank its sequence shard under SP).
    parallelize_module(model, tp_mesh, {k: v for k, v in ends.items() if getattr(model, k) is not None})
    if cfg.tie_embeddings and model.tok_emb is not None and model.lm_head is not None:
        # Both sides shard the shared (V, D) weight on V (Shard(0)); parallelize_module wrapped it in two
        # Parameters, so tie them again (one tensor, one gradient, as in the single-process model).
        model.lm_head.weight = model.tok_emb.weight

    for block in model.blocks.values():
        plan: dict[str, Any] = {
            "attn_norm": norm_style(),
            "attn": PrepareInput(stream),  # all-gather under SP; wq/wk/wv then share one Replicate input
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel() if kv_sharded else ReplicateParallel(partial_grad=True),
            "attn.wv": ColwiseParallel() if kv_sharded else ReplicateParallel(partial_grad=True),
            "attn.wo": RowwiseParallel(output_layouts=stream),
            "mlp_norm": norm_style(),
        }
        if isinstance(block.mlp, MoE):
            plan.update({"mlp": MoETensorParallel(stream, loss_parallel), "mlp.router": RouterParallel()})
            if split_experts:
                plan["mlp.experts"] = ExpertShardParallel()
            elif shard_experts:
                plan["mlp.experts"] = ExpertTensorParallel()
        else:
            plan.update({"mlp": PrepareInput(stream), "mlp.w1": ColwiseParallel(),
                         "mlp.w2": RowwiseParallel(output_layouts=stream)})
            if block.mlp.w3 is not None:
                plan["mlp.w3"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        block.attn.n_head = cfg.n_head // tp  # the local head counts the .view()s see (gpt-fast tp.py)
        block.attn.n_kv_head = cfg.n_kv_head // tp if kv_sharded else 1

    for p in model.parameters():
        if isinstance(p, DTensor):
            p.register_hook(_grad_in_param_layout(p))
    model.register_forward_pre_hook(_check_call(sp, tp), with_kwargs=True)
    model.register_forward_hook(_plain_losses)
    return model


def _check_call(sp: bool, tp: int):
    def pre_hook(model, args, kwargs):
        if sp and kwargs.get("ctx") is not None:
            raise ValueError("sequence parallelism is for training: serving with a KV cache (ctx) runs without it")
        if sp and kwargs.get("logits_rows") is not None:
            raise ValueError("logits_rows is not supported under sequence parallelism (rows are sequence-sharded)")
        idx_BT = args[0] if args else kwargs["idx_BT"]
        if idx_BT.dim() == 3:  # a later pipeline stage's input: hidden states, already in the stream's layout
            return
        if sp and idx_BT.shape[1] % tp:
            raise ValueError(f"sequence parallelism needs the sequence length ({idx_BT.shape[1]}) to be a multiple "
                             f"of --tp ({tp})")

    return pre_hook


def _plain_losses(model, args, out):
    # Under loss_parallel the losses are (replicated) DTensors; the trainer logs and backpropagates plain tensors
    # whatever the layout (`to_local` keeps the graph: backward still runs the loss-parallel kernels).
    from torch.distributed.tensor import DTensor

    if isinstance(out, torch.Tensor):  # a pipeline stage before the last returns its hidden states
        return out

    def plain(v):
        return v.to_local() if isinstance(v, DTensor) else v

    out.loss, out.ce_loss, out.aux_loss, out.z_loss = map(plain, (out.loss, out.ce_loss, out.aux_loss, out.z_loss))
    for info in out.routing:
        info.aux_loss, info.z_loss = plain(info.aux_loss), plain(info.z_loss)
    return out
