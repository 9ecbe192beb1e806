"""Which layers each pipeline rank holds, and the model cut accordingly: `--pp P --schedule S --microbatches M
--stages-per-rank V` as a checked `PipelineConfig`, and `split_model`, which deletes what a rank does not own.

    pcfg = PipelineConfig("interleaved-1f1b", microbatches=8, stages_per_rank=2)
    pcfg.check(pp=2, cfg=cfg)                               # ValueError, one line naming the flag and the choices
    raw, parts = split_model(model, pcfg.stage_indices(pp_rank, 2), n_stages=4)

Placement is the planner's rule (moekit/plan/layout.py: `layers_per_stage`, equal stages as mesh.py `check_pp`
insists, and `rank_stages`): P x V stages of consecutive layers; stage s on pipeline rank s % P (the "loop" order
of Megatron's interleaving and torch's ScheduleInterleaved1F1B), or for the V-shaped zero-bubble schedule on rank s
for s < P and 2P - 1 - s after (Qi et al. 2024, ZB-V). A rank's model is the Transformer with the other blocks
deleted: the names stay (`blocks.5.attn.wq.weight`), so optimizer, DCP checkpoints and resharding into any layout
see one-process keys. The first stage keeps the embedding, the last the final norm and lm_head (torchtitan's
`pipeline_module_split`, which sets the missing parts to None the same way). moekit/parallel/pipeline.py runs the
stages; moekit/parallel/dry_run.py cuts GPT-4 with the same functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moekit.parallel.mesh import check_pp
from moekit.plan.layout import layers_per_stage, rank_stages

if TYPE_CHECKING:
    from moekit.config import ModelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")
MULTI_STAGE = {"interleaved-1f1b", "zero-bubble"}  # schedules that hold V >= 2 stages per rank
PP_MIN_TORCH = (2, 10)  # pipelining over gloo crashes in the first step before 2.10
ZBV_MIN_TORCH = (2, 13)  # the V-shaped zero-bubble schedule hangs on 2.11


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class PipelineConfig:
    """How the pipeline runs: the schedule, micro-batches per step (the trainer's --grad-accum), stages per rank."""

    schedule: str = "1f1b"
    microbatches: int = 2
    stages_per_rank: int = 1

    def replace(self, **changes) -> PipelineConfig:
        return dataclasses.replace(self, **changes)

    def check(self, pp: int, cfg: ModelConfig, version: tuple[int, int] | None = None) -> None:
        """Raise ValueError (one line, naming the flag and the choices) when this cannot run `pp` stages of `cfg`."""
        version = version or torch_version()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if version < PP_MIN_TORCH:
            raise ValueError(f"--pp needs torch >= {'.'.join(map(str, PP_MIN_TORCH))} (pipelining over gloo crashes "
                             f"in its first step before); this is torch {torch.__version__}")
        if self.schedule == "zero-bubble" and version < ZBV_MIN_TORCH:
            raise ValueError(f"--schedule zero-bubble needs torch >= {'.'.join(map(str, ZBV_MIN_TORCH))} (the "
                             f"V-shaped schedule hangs on 2.11); this is torch {torch.__version__}")
        v, m = self.stages_per_rank, self.microbatches
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--stages-per-rank {v!r}: must be a positive integer")
        if self.schedule in MULTI_STAGE:
            want = "2" if self.schedule == "zero-bubble" else "2 or more"
            if v < 2 or (self.schedule == "zero-bubble" and v != 2):
                raise ValueError(f"--schedule {self.schedule} runs {want} stages per rank: pass --stages-per-rank "
                                 f"{2}, or use --schedule 1f1b or gpipe")
        elif v != 1:
            raise ValueError(f"--schedule {self.schedule} runs one stage per rank (--stages-per-rank {v} given): use "
                             "--schedule interleaved-1f1b or zero-bubble to interleave")
        if not isinstance(m, int) or m < 2:
            raise ValueError(f"--microbatches {m!r} with --pp {pp}: a pipeline needs at least 2 micro-batches per "
                             f"step to overlap its stages (bubble (p - 1) / (m + p - 1)); use {2 * pp} or more")
        if self.schedule in MULTI_STAGE and m % pp:
            raise ValueError(f"--schedule {self.schedule} needs --microbatches a multiple of --pp {pp} (got {m}): "
                             f"choose {pp * max(1, m // pp)} or {pp * (m // pp + 1)}")
        check_pp(pp, cfg, v)

    def stage_indices(self, pp_rank: int, pp: int) -> list[int]:
        """The stages pipeline rank `pp_rank` holds: the planner's rule (moekit/plan/layout.py `rank_stages`)."""
        return rank_stages(pp, pp_rank, self.stages_per_rank, self.schedule)


def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """Consecutive layer ranges of the stages, by the planner's placement rule."""
    out, first = [], 0
    for n in layers_per_stage(n_layer, n_stages):
        out.append(range(first, first + n))
        first += n
    return out


def _view(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """A Transformer sharing `model`'s modules, with only `layers` and the ends this stage owns (for V >= 2)."""
    part = type(model).__new__(type(model))
    nn.Module.__init__(part)
    part.cfg = model.cfg
    part.tok_emb = model.tok_emb if first else None
    part.blocks = nn.ModuleDict({str(i): model.blocks[str(i)] for i in layers})
    part.norm = model.norm if last else None
    part.lm_head = model.lm_head if last else None
    part.register_buffer("inv_freq", model.inv_freq, persistent=False)
    return part


def split_model(model: nn.Module, owned: list[int], n_stages: int) -> tuple[nn.Module, list[nn.Module]]:
    """Delete from `model`, in place, what the stages `owned` do not hold; (the rank's model, one part per stage).

    The rank's model keeps the one-process names of what it holds (its state dict is a subset of one process's);
    with one stage per rank the part is the model itself. A tied lm_head on a rank without the embedding becomes a
    Parameter of its own (Megatron's copy on the last stage; `Pipeline.sync_tied_grads` keeps the two equal)."""
    ranges = stage_layers(model.cfg.n_layer, n_stages)
    keep = {i for s in owned for i in ranges[s]}
    has_first, has_last = 0 in owned, n_stages - 1 in owned
    for name in list(model.blocks):
        if int(name) not in keep:
            del model.blocks[name]
    if has_last and not has_first and model.cfg.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    if not has_first:
        model.tok_emb = None
    if not has_last:
        model.norm = model.lm_head = None
    if len(owned) == 1:
        return model, [model]
    return model, [_view(model, ranges[s], s == 0, s == n_stages - 1) for s in owned]


__all__ = ["MULTI_STAGE", "PP_MIN_TORCH", "SCHEDULES", "ZBV_MIN_TORCH", "PipelineConfig", "split_model",
           "stage_layers", "torch_version"]
