"""Pipeline parallelism (`--pp P --schedule S --microbatches M --stages-per-rank V`) with torch.distributed.pipelining.

    pcfg = PipelineConfig(schedule="1f1b", microbatches=8)          # checked against the layout and torch
    pipe = build_pipeline(model, layout, pcfg)                       # deletes the blocks this rank does not own
    parts = [parallelize(part, layout, ...) for part in pipe.parts]  # TP -> recompute -> compile -> DP per stage
    pipe.attach(parts)                                               # PipelineStage per part + the schedule
    sums = pipe.step(x_mbs, y_mbs, scale=1 / M)                      # forward + backward of the step's M micro-batches
    norm = pipe.clip_grad_norm(1.0)                                  # global over every stage

Which stages a rank holds and how the model is cut (blocks deleted, one-process names kept): moekit/parallel/
stages.py, by the planner's placement rule.

Three things a pipeline changes that the one-process loss hides (each with its answer):
- MoE router losses are computed in every stage, not only the last. Their gradient enters the backward where they
  are: `MoEAuxLossAutoScaler` (Megatron-Core moe/moe_utils.py) is the identity on the block's output in forward and
  in backward adds d(loss)/d(aux) = scale x coef / n_moe_layers to the router loss, the value one process's autograd
  would give it. The logged terms are summed over the pipeline ranks.
- A tied embedding (the tiny preset) is on the first stage and the last. As Megatron-LM does
  (`_allreduce_embedding_grads`), the last stage holds a copy, initialised equal, and after the backward the two
  gradients are all-reduced over the two ranks (the "embedding group"), so both copies step identically. DCP saves
  the copy under its one-process name `tok_emb.weight` (both ranks hold the same values: DCP writes one).
- Gradient clipping needs the norm over all stages: every stage's per-tensor norms are gathered and reduced in the
  one-process parameter order, so a pipeline clips by the very number one process computes.

Schedules (torch 2.14): gpipe = ScheduleGPipe, 1f1b = Schedule1F1B (V = 1); interleaved-1f1b =
ScheduleInterleaved1F1B (Narayanan et al. 2021, V >= 2); zero-bubble = ScheduleZBVZeroBubble (V = 2, split input and
weight backward). Gradients are scaled by the trainer's loss scale (scale_grads=False), so a pipeline step computes
the same sums as gradient accumulation over the same micro-batches: with M a power of two the final weights are
bitwise those of one process (tests/parallel/test_pipeline.py).

Each stage's idle time is measured per step: the wall time of the step, up to the pipeline flush (every stage done),
minus the time spent inside the stage's forward and backward computations (sends, receives and waiting make up the
rest); `pipeline_bubble` in moekit/plan/train.py is the planner's prediction of it (checked against the measurement
on 4 stages in tests/parallel/test_pipeline_bubble.py). The clock it reads (`Pipeline.clock`, wall time) and the
flush (`Pipeline.flush`, a barrier) are seams: that test runs the same code on a modelled device clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel.stages import MULTI_STAGE, PipelineConfig, split_model, stage_layers

if TYPE_CHECKING:
    from moekit.parallel.parallelize import Layout

# ---- MoE router losses in every stage -------------------------------------------------------------------------
class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on `x` in forward; backward also returns `grad_aux` for the router loss `aux` (Megatron-Core's
    `MoEAuxLossAutoScaler`, moe_utils.py), so the router gets its loss gradient without the loss reaching the last
    stage. grad_aux is computed with the one-process chain's own operations (moekit/model/transformer.py:
    loss x scale, x coef, mean over the MoE layers), hence bit for bit the gradient one process gives it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, grad_aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_aux)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        (grad_aux,) = ctx.saved_tensors
        return grad_x, grad_aux, None


def _router_loss_grad(scale: float, coef: float, n_moe: int, like: torch.Tensor) -> torch.Tensor:
    # MulBackward (the trainer's loss x scale), MulBackward (coef x mean), MeanBackward (/ n): in that order.
    local = like.to_local() if hasattr(like, "to_local") else like
    g = (torch.ones((), dtype=local.dtype, device=local.device) * scale) * coef / n_moe
    if hasattr(like, "to_local"):  # a replicated DTensor loss (tensor parallel): a gradient of its kind
        from torch.distributed.tensor import DTensor

        g = DTensor.from_local(g, like.device_mesh, like.placements)
    return g


# ---- the pipeline -----------------------------------------------------------------------------------------
def _barrier(group: dist.ProcessGroup) -> None:
    """The pipeline flush of a step on real devices: every pipeline rank waits here until all are done."""
    dist.barrier(group=group)


@dataclass
class StepTimes:
    """One step's wall time and the part of it this rank spent computing (forward, backward, loss)."""

    wall: float = 0.0
    compute: float = 0.0

    @property
    def idle(self) -> float:
        return max(0.0, self.wall - self.compute)

    @property
    def idle_fraction(self) -> float:
        return self.idle / self.wall if self.wall > 0 else 0.0


@dataclass
class Pipeline:
    """This rank's stages of the model and the schedule over them; see the module docstring."""

    raw: nn.Module  # the rank's Transformer (blocks it does not own deleted): optimizer, checkpoints, names
    parts: list[nn.Module]  # one module per local stage (the raw itself with V = 1), parallelized by `attach`'s caller
    owned: list[int]
    n_stages: int
    config: PipelineConfig
    group: dist.ProcessGroup
    device: torch.device
    embed_group: dist.ProcessGroup | None = None  # first + last stage ranks, with a tied embedding split over both
    scale: float = 1.0  # the trainer's loss scale of a micro-batch (its share of the step)
    routing: list = field(default_factory=list)  # (stage, RoutingInfo) of this step's forwards, in order
    times: StepTimes = field(default_factory=StepTimes)
    schedule: object = None
    stages: list = field(default_factory=list)
    _in_step: bool = False
    _recording: bool = False
    ce_losses: list = field(default_factory=list)
    # Seams, for measuring a schedule on a modelled device clock instead of the host's (tests/parallel/
    # pp_bubble_worker.py): the clock `times` reads, and the step's end, the pipeline flush, after which this rank's
    # clock reads the last stage's finish. Production: wall time and a barrier.
    clock: Callable[[], float] = time.perf_counter
    flush: Callable[[dist.ProcessGroup], None] = _barrier

    @property
    def has_first(self) -> bool:
        return 0 in self.owned

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.owned

    @property
    def modules(self) -> list[nn.Module]:
        """The (parallelized) modules the schedule runs, one per local stage."""
        return [stage.submod for stage in self.stages] if self.stages else self.parts

    # -- building --------------------------------------------------------------------------------------------
    def attach(self, parallelized: list[nn.Module]) -> None:
        """Wrap each parallelized part in a PipelineStage and build the schedule (every pipeline rank calls it)."""
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleZBVZeroBubble,
        )

        for part, s in zip(self.parts, self.owned, strict=True):
            self._wrap_moe_blocks(part, s)
            if s == self.n_stages - 1:
                # PipelineStage infers and checks tensor outputs; the last stage's ModelOutput becomes its
                # cross-entropy during a step (a hook after tensor parallelism's own output hook).
                part.register_forward_hook(lambda mod, args, out: out.ce_loss if self._in_step else None)
        self.stages = [PipelineStage(mod, s, self.n_stages, self.device, group=self.group)
                       for mod, s in zip(parallelized, self.owned, strict=True)]
        for stage in self.stages:
            self._time(stage)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
               "zero-bubble": ScheduleZBVZeroBubble}[self.config.schedule]
        arg = self.stages if self.config.schedule in MULTI_STAGE else self.stages[0]
        self.schedule = cls(arg, n_microbatches=self.config.microbatches, loss_fn=self._loss, scale_grads=False)

    def _wrap_moe_blocks(self, part: nn.Module, stage: int) -> None:
        """Record each MoE layer's routing and attach its router losses' gradient (MoEAuxLossAutoScaler) to the
        MoE's output, inside the block: the block's output (maybe the stage's) is then the residual sum, not a
        view, which the zero-bubble schedules' split backward needs (it detaches stage outputs in place)."""
        cfg = part.cfg
        for block in part.blocks.values():
            moe = block.mlp
            if getattr(moe, "router", None) is None:
                continue

            # A forward hook, registered after parallelize's: under tensor parallelism the MoE's own exit hook
            # (tensor.py MoETensorParallel) has summed the output and scaled the router losses' gradients by 1/tp
            # by then, so the injected gradient enters where one process's would.
            def hook(module, args, out):
                y_BTD, info = out
                # Only the schedule's own forwards count: not the first step's shape inference, nor a recomputation
                # inside the backward.
                if self._recording and torch._C._current_graph_task_id() == -1:
                    self.routing.append((stage, info))
                if torch.is_grad_enabled() and info.aux_loss is not None:
                    n = cfg.n_moe_layers
                    for loss, coef in ((info.aux_loss, cfg.aux_loss_coef), (info.z_loss, cfg.z_loss_coef)):
                        y_BTD = MoEAuxLossAutoScaler.apply(y_BTD, loss, _router_loss_grad(self.scale, coef, n, loss))
                return y_BTD, info

            moe.register_forward_hook(hook)

    def _time(self, stage) -> None:
        """Count the time inside this stage's computations toward `times.compute` (the rest of a step is idle)."""
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            inner = getattr(stage, name, None)
            if inner is None:
                continue

            def timed(*args, _inner=inner, _fwd=name == "forward_one_chunk", **kwargs):
                t0 = self.clock()
                self._recording = _fwd
                try:
                    return _inner(*args, **kwargs)
                finally:
                    self._recording = False
                    self.times.compute += self.clock() - t0

            setattr(stage, name, timed)

    def _loss(self, ce_loss: torch.Tensor, target_BT) -> torch.Tensor:
        # The cross-entropy the last stage's forward computed from its targets (kwargs: the model's own loss code),
        # scaled like one process's micro-batch loss; the router losses are attached in their own stages.
        self.ce_losses.append(ce_loss.detach())  # (the first step's shape inference adds one before them)
        return ce_loss * self.scale

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self, x_mbs: list[torch.Tensor], y_mbs: list[torch.Tensor], scale: float) -> torch.Tensor:
        """Forward and backward of the step's micro-batches through the schedule; this rank's share of the step's
        loss terms [ce, aux, z] (each micro-batch's value x scale; all-reduce over the pipeline ranks to sum)."""
        self.scale, self.routing, self.ce_losses = scale, [], []
        self.times = StepTimes()
        t0 = self.clock()
        B, T = x_mbs[0].shape
        # Every stage gets the positions (a stage's input may be a sequence shard under sequence parallelism, so
        # it cannot count them), and the last its targets: the kwargs of each micro-batch go to every local stage.
        positions_BT = torch.arange(T, device=self.device).expand(B, T)
        kwargs = [{"positions_BT": positions_BT, **({"targets_BT": y} if self.has_last else {})} for y in y_mbs]
        args = [(x,) for x in x_mbs] if self.has_first else [()] * len(x_mbs)
        # torch's stages skip DDP's and FSDP2's gradient sync on all but the last backward themselves; moekit's
        # hook-based data parallelism for DTensor weights (data.apply_replicate: --tp or --ep with --zero 0 or 1) does
        # not know which is last, so it runs unsynchronized and averages once, after the schedule.
        replicated = [m for m in self.modules if hasattr(m, "reduce_gradients")]
        for m in replicated:
            m.set_requires_gradient_sync(False)
        self._in_step = True
        try:
            self.schedule.step(arg_mbs=args, kwarg_mbs=kwargs, target_mbs=y_mbs if self.has_last else None,
                               return_outputs=False)
        finally:
            self._in_step = False
            for m in replicated:
                m.set_requires_gradient_sync(True)
        for m in replicated:
            m.reduce_gradients()
        self.sync_tied_grads()
        # The step ends at the pipeline flush, when the last stage is done (Narayanan et al. 2021, section 2.2): a
        # stage that finishes early waits for it here, inside its step's wall time, as the formula counts it (the
        # trainer's next collective would wait for it anyway). Without it the later stages, done first, read low.
        self.flush(self.group)
        self.times.wall = self.clock() - t0
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for ce in self.ce_losses[-self.config.microbatches:] if self.has_last else []:
            sums[0] += ce.to(torch.float64) * scale
        n = self.raw.cfg.n_moe_layers
        for _, info in self.routing:
            if info.aux_loss is not None:  # (replicated DTensors under tensor parallel with loss_parallel)
                aux, z = (t.to_local() if hasattr(t, "to_local") else t for t in (info.aux_loss, info.z_loss))
                sums[1] += aux.detach().to(torch.float64) * scale / n
                sums[2] += z.detach().to(torch.float64) * scale / n
        return sums

    def routing_by_microbatch(self) -> list[list]:
        """This step's routing infos grouped per forward (micro-batch) in layer order: RoutingStats.add's input."""
        per_stage: dict[int, list] = {}
        for s, info in self.routing:
            per_stage.setdefault(s, []).append(info)
        out = []
        for s in sorted(per_stage):
            infos = per_stage[s]
            layers = len(infos) // self.config.microbatches
            for k in range(self.config.microbatches):
                if len(out) <= k:
                    out.append([])
                out[k].extend(infos[k * layers:(k + 1) * layers])
        return out

    def sync_tied_grads(self) -> None:
        """Sum the tied embedding's two gradients over the first and last stage (Megatron's embedding group)."""
        if self.embed_group is None:
            return
        w = self.raw.tok_emb.weight if self.has_first else self.raw.lm_head.weight
        if w.grad is not None:
            g = w.grad.to_local() if hasattr(w.grad, "to_local") else w.grad
            dist.all_reduce(g, group=self.embed_group)

    # -- across the pipeline ranks ------------------------------------------------------------------------------
    @property
    def last_rank(self) -> int:
        """The pipeline rank (index in `group`) holding the last stage."""
        pp = dist.get_world_size(self.group)
        return next(r for r in range(pp) if self.n_stages - 1 in self.config.stage_indices(r, pp))

    def broadcast_from_last(self, obj):
        """`obj` as the last stage's rank has it, on every pipeline rank (evaluation results)."""
        holder = [obj]
        dist.broadcast_object_list(holder, group=self.group, group_src=self.last_rank)
        return holder[0]

    def gather_routing(self, stats) -> None:
        """Make `stats` (a RoutingStats over this rank's MoE layers) the whole model's, layers in model order: every
        pipeline rank sends its layers' rows by stage (a small object all-gather, once per log interval)."""
        mine = {}
        if stats.counts_LE is not None:
            rows, k = {}, 0
            for s in self.owned:
                n = sum(self.raw.cfg.is_moe_layer(i) for i in stage_layers(self.raw.cfg.n_layer, self.n_stages)[s])
                rows[s] = slice(k, k + n)
                k += n
            mine = {s: (stats.counts_LE[r].cpu(), stats.dropped_L[r].cpu(), stats.entropy_L[r].cpu())
                    for s, r in rows.items()}
        everything: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everything, mine, group=self.group)
        per_stage = {s: v for d in everything for s, v in d.items()}
        if per_stage:
            order = sorted(per_stage)
            stats.counts_LE = torch.cat([per_stage[s][0] for s in order])
            stats.dropped_L = torch.cat([per_stage[s][1] for s in order])
            stats.entropy_L = torch.cat([per_stage[s][2] for s in order])

    def gather_idle(self, idle: float) -> list[float]:
        """Every pipeline rank's idle fraction, in rank order."""
        t = torch.zeros(dist.get_world_size(self.group), dtype=torch.float64)
        t[dist.get_rank(self.group)] = idle
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    # -- gradient norm over all stages ------------------------------------------------------------------------
    def counted_parameters(self) -> list[list[torch.Tensor]]:
        """Per local stage, its parameters in the one-process order, the tied copy on the last stage left out."""
        out = []
        for mod in self.modules:
            params = []
            for name, p in mod.named_parameters():
                if name.endswith("lm_head.weight") and self.raw.cfg.tie_embeddings and self.embed_group is not None:
                    continue  # the copy of tok_emb.weight: one process counts the tied weight once
                params.append(p)
            out.append(params)
        return out

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip every stage's gradients to the global norm `max_norm`; returns the norm before clipping.

        One process reduces its per-tensor norms (torch.nn.utils.get_total_norm) in parameter order; here each
        stage's per-tensor norms are gathered over the pipeline ranks and reduced in that same order, so the norm,
        and the clipped weights, equal one process's bit for bit (plain tensors). DTensor gradients (TP, FSDP2)
        contribute their global per-tensor norms (`full_tensor`)."""
        from torch.utils._foreach_utils import _has_foreach_support

        from moekit.parallel.data import clip_grads_with_norm

        local: dict[int, list[torch.Tensor]] = {}
        for s, params in zip(self.owned, self.counted_parameters(), strict=True):
            grads = [p.grad for p in params if p.grad is not None]
            plain = grads and not any(hasattr(g, "full_tensor") for g in grads)
            if plain and _has_foreach_support(grads, grads[0].device):  # get_total_norm's own choice of kernel
                norms = list(torch._foreach_norm(grads, 2.0))
            else:
                norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
            local[s] = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
        gathered: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, {s: torch.stack(v).cpu() if v else torch.zeros(0) for s, v in local.items()},
                               group=self.group)
        per_stage = {s: v for d in gathered for s, v in d.items()}
        total = torch.linalg.vector_norm(torch.cat([per_stage[s] for s in range(self.n_stages)]), 2.0)
        total = total.to(self.device)
        grads_params = [p for params in self.counted_parameters() for p in params if p.grad is not None]
        if self.embed_group is not None and self.has_last:  # the copy is clipped like the original
            grads_params.append(self.raw.lm_head.weight)
        clip_grads_with_norm(grads_params, max_norm, total)  # by mesh: expert weights have their own (--ep)
        return total


def build_pipeline(model: nn.Module, layout: Layout, pcfg: PipelineConfig) -> Pipeline:
    """Split `model` (built, seed weights loaded, not yet parallelized) into this rank's stages (in place)."""
    dims, mesh = layout.dims, layout.mesh
    pcfg.check(dims.pp, model.cfg)
    pp_mesh = mesh["pp"]
    pp_rank = pp_mesh.get_local_rank()
    n_stages = dims.pp * pcfg.stages_per_rank
    owned = pcfg.stage_indices(pp_rank, dims.pp)
    # Stage 0 is on pipeline rank 0 in both orders; the last stage on rank pp - 1 (loop) or 0 (V-shaped).
    last_rank = next(r for r in range(dims.pp) if n_stages - 1 in pcfg.stage_indices(r, dims.pp))
    raw, parts = split_model(model, owned, n_stages)
    embed_group = None
    if model.cfg.tie_embeddings and last_rank != 0:
        # One group per (data, tensor) coordinate: that coordinate's first- and last-stage ranks. new_group is
        # collective over the world, so every rank creates all of them and keeps its own.
        ranks_PX = mesh.mesh.reshape(dims.pp, -1)  # (pp, dp x tp): the global ranks of each stage
        me = dist.get_rank()
        for col in range(ranks_PX.shape[1]):
            ranks = [int(ranks_PX[0, col]), int(ranks_PX[last_rank, col])]
            group = dist.new_group(ranks)
            if me in ranks:
                embed_group = group
    return Pipeline(raw, parts, owned, n_stages, pcfg, pp_mesh.get_group(), layout.env.device, embed_group)


class PipelineModel(nn.Module):
    """The trainer's `model` under a pipeline: every local stage's (parallelized) module, so that `.train()`,
    `.eval()` and `.parameters()` reach them all; calling it runs a forward-only pass through the stages one after
    another (evaluation: any batch shape, no schedule), returning the last stage's ModelOutput on the ranks of the
    last stage and, on the others, an output whose logits are zeros (`Pipeline.broadcast_from_last` then hands every
    rank the last stage's result)."""

    def __init__(self, pipe: Pipeline):
        super().__init__()
        self.parts = nn.ModuleList(pipe.modules)
        self.pipe = pipe

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None):
        from moekit.model.transformer import ModelOutput

        pipe, me = self.pipe, dist.get_rank(self.pipe.group)
        owner = {s: r for r in range(dist.get_world_size(pipe.group))
                 for s in pipe.config.stage_indices(r, dist.get_world_size(pipe.group))}
        B, T = idx_BT.shape
        positions_BT = torch.arange(T, device=idx_BT.device).expand(B, T)
        h, out = idx_BT, None
        for s in range(pipe.n_stages):
            if owner[s] != me:
                continue
            if s > 0 and owner[s - 1] != me:
                h = _recv_tensor(owner[s - 1], pipe.group, pipe.device)
            mod = self.parts[pipe.owned.index(s)]
            out = mod(h, targets_BT, positions_BT=positions_BT) if s == pipe.n_stages - 1 else mod(
                h, positions_BT=positions_BT)
            h = out
            if s < pipe.n_stages - 1 and owner[s + 1] != me:
                _send_tensor(h.detach(), owner[s + 1], pipe.group)
        if pipe.has_last:
            return out
        V = pipe.raw.cfg.vocab_size
        return ModelOutput(logits=torch.zeros(B, T, V, device=idx_BT.device))


def _send_tensor(t: torch.Tensor, to: int, group) -> None:
    """A tensor to pipeline rank `to`: its shape and dtype first (evaluation batches vary), then the values."""
    t = t.to_local() if hasattr(t, "to_local") else t
    header = torch.tensor([t.dim(), *t.shape, _DTYPES.index(t.dtype)] + [0] * (6 - t.dim()), dtype=torch.long)
    dist.send(header.to(t.device), group=group, group_dst=to)
    dist.send(t.contiguous(), group=group, group_dst=to)


def _recv_tensor(frm: int, group, device: torch.device) -> torch.Tensor:
    header = torch.zeros(8, dtype=torch.long, device=device)
    dist.recv(header, group=group, group_src=frm)
    n = int(header[0])
    t = torch.empty([int(d) for d in header[1:1 + n]], dtype=_DTYPES[int(header[1 + n])], device=device)
    dist.recv(t, group=group, group_src=frm)
    return t


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


__all__ = ["MoEAuxLossAutoScaler", "Pipeline", "PipelineModel", "StepTimes", "build_pipeline"]
