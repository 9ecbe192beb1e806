"""Checkpoints of a Trainer on any layout, in the one format moekit reads everywhere (checkpoint.py).

    path = save_trainer(trainer)                     # every rank calls it; the main rank writes
    path, state = load_trainer(trainer, "runs/x")    # every rank reads; each keeps what its layout holds

Saving gathers the model's and the optimizer's full tensors to the main rank, which writes today's
checksummed, atomic checkpoint (model.safetensors, optimizer.safetensors, state.json). Loading reads the
full tensors on every rank and lets each keep its part. Because the file holds whole tensors named as in
one process, a checkpoint saved by any layout (one process, DDP, ZeRO-1, FSDP2, tensor parallel) loads into
any other, and `moekit generate/serve` and Hugging Face export read it as they are.

How the gathering works per layout:
- one process, DDP: the tensors are whole on every rank already;
- ZeRO-1: `ZeroRedundancyOptimizer.consolidate_state_dict` sends each rank's optimizer shard to the main rank;
  loading hands every rank the whole state and it keeps its partition;
- FSDP2 and tensor parallel (DTensor parameters): torch's `get_state_dict` / `set_state_dict` with
  `full_state_dict=True` (torch.distributed.checkpoint.state_dict), which all-gathers the shards to the main
  rank, and on load shards the whole tensors again.

Why not DCP's sharded files yet: at GPT-4's size no rank can hold a whole tensor set, and every rank must
write its own shards (`torch.distributed.checkpoint.save`); that format is the next step (issue 10 notes).
Up to the models a CPU trains here, the gathered format costs one copy of the weights on the main rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from moekit.model.transformer import upgrade_state_dict
from moekit.train.checkpoint import (
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointError,
    list_checkpoints,
    load_optimizer_tensors,
    model_tensors,
    optimizer_tensors,
    save_checkpoint_files,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from moekit.train.loop import Trainer


def _is_zero1(opt: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(opt, ZeroRedundancyOptimizer)


def _sharded(trainer: Trainer) -> bool:
    """Parameters are DTensors (FSDP2, tensor parallel): torch's full-state-dict gathering is needed."""
    return any(hasattr(p, "full_tensor") for p in trainer.raw.parameters())


def _index_names(trainer: Trainer) -> dict[int, str]:
    """Optimizer state-dict index (params in param-group order) -> parameter name."""
    names = {id(p): n for n, p in trainer.raw.named_parameters()}
    return {i: names[id(p)] for i, p in enumerate(p for g in trainer.opt.param_groups for p in g["params"])}


def _flat(state: dict[str, dict]) -> dict[str, torch.Tensor]:
    """{name: {"exp_avg": t, ...}} -> moekit's optimizer file keys `name::exp_avg`."""
    out = {}
    for name, per_param in state.items():
        for key, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value, dtype=torch.float32)
            out[f"{name}::{key}"] = t.detach().contiguous().cpu()
    return out


def _unflat(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in upgrade_state_dict(tensors).items():
        name, _, field = key.partition("::")
        state.setdefault(name, {})[field] = t
    return state


def gather_tensors(trainer: Trainer, with_optimizer: bool = True) -> dict[str, dict[str, torch.Tensor]] | None:
    """{MODEL_FILE: ..., OPTIM_FILE: ...} of whole tensors on the main rank, None on the others (a collective)."""
    raw, opt, main = trainer.raw, trainer.opt, trainer.layout.is_main
    if trainer.layout.mesh is None:
        files = {MODEL_FILE: model_tensors(raw)}
        if with_optimizer:
            files[OPTIM_FILE] = optimizer_tensors(raw, opt)
        return files
    if _sharded(trainer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(trainer.model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not main:
            return None
        if raw.cfg.tie_embeddings:
            msd.pop("lm_head.weight", None)  # stored once, as one process stores it
            osd["state"].pop("lm_head.weight", None)
        files = {MODEL_FILE: {k: v.contiguous() for k, v in msd.items()}}
        if with_optimizer:
            files[OPTIM_FILE] = _flat(osd["state"])
        return files
    if _is_zero1(opt) and with_optimizer:
        opt.consolidate_state_dict(to=0)  # every rank sends its shard of the AdamW state to rank 0
    if not main:
        return None
    files = {MODEL_FILE: model_tensors(raw)}
    if with_optimizer:
        if _is_zero1(opt):
            names = _index_names(trainer)
            files[OPTIM_FILE] = _flat({names[i]: s for i, s in opt.state_dict()["state"].items()})
        else:
            files[OPTIM_FILE] = optimizer_tensors(raw, opt)
    return files


def save_trainer(trainer: Trainer) -> Path:
    """Checkpoint the trainer's step (every rank must call it); the checkpoint folder's path on every rank."""
    files = gather_tensors(trainer)
    path = None
    if files is not None:
        path = save_checkpoint_files(trainer.run_dir, trainer.state.step, files, trainer.checkpoint_state(),
                                     keep=trainer.tc.keep_checkpoints)
    if trainer.layout.mesh is not None:
        dist.barrier()  # nobody goes on (or exits) before the checkpoint is complete on disk
    return path or trainer.run_dir / "checkpoints" / f"step_{trainer.state.step}"


def load_tensors_into(trainer: Trainer, model_t: dict[str, torch.Tensor], optim_t: dict[str, torch.Tensor] | None,
                      source: str) -> None:
    """Give every rank its part of whole tensors (`load_trainer`'s second half; every rank calls it)."""
    raw, opt = trainer.raw, trainer.opt
    if not _sharded(trainer):
        try:
            raw.load_tensors(model_t, source)  # names and shapes checked, old layouts renamed
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if optim_t is None:
            return
        if not _is_zero1(opt):
            load_optimizer_tensors(raw, opt, optim_t, source)
            return
        # ZeroRedundancyOptimizer.load_state_dict takes the whole (consolidated) state and keeps its partition.
        index = {n: i for i, n in _index_names(trainer).items()}
        state = _unflat(optim_t)
        unknown = sorted(set(state) - set(index))
        if unknown:
            raise CheckpointError(f"{source}: optimizer state for unknown parameter {unknown[0]!r}")
        groups, start = [], 0
        for g in opt.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        opt.load_state_dict({"state": {index[n]: s for n, s in state.items()}, "param_groups": groups})
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # Check names and shapes against a meta copy of the model first: a clear error, not a collective's.
    with torch.device("meta"):
        probe = type(raw)(raw.cfg)
    try:
        probe.load_tensors(model_t, source, assign=True)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model_t = upgrade_state_dict(model_t)
    if raw.cfg.tie_embeddings:
        model_t.setdefault("lm_head.weight", model_t["tok_emb.weight"])
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(trainer.model, model_t, options=options)
    if optim_t is not None:
        template = get_optimizer_state_dict(trainer.model, opt, options=options)  # param groups, keyed by name
        state = _unflat(optim_t)
        if raw.cfg.tie_embeddings and "tok_emb.weight" in state:
            state.setdefault("lm_head.weight", state["tok_emb.weight"])
        set_optimizer_state_dict(trainer.model, opt, {"state": state, "param_groups": template["param_groups"]},
                                 options=options)


def load_trainer(trainer: Trainer, run_dir: str | Path, with_optimizer: bool = True, log=print) -> tuple[Path, dict]:
    """Load the newest checkpoint of `run_dir` that verifies (saying which were skipped); (path, its state.json).

    Every rank verifies and reads the files itself (they are whole tensors; no rank waits on another's read).
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"{run_dir} has no checkpoints (no checkpoints/step_* folder)")
    errors = []
    for path in reversed(ckpts):
        try:
            state = verify_checkpoint(path)
            optim_t = None
            if with_optimizer:
                if OPTIM_FILE not in state["files"]:
                    raise CheckpointError(f"{path} has no optimizer state: it cannot be resumed, only used with "
                                          "--init-from")
                optim_t = load_file(path / OPTIM_FILE)
            load_tensors_into(trainer, load_file(path / MODEL_FILE), optim_t, str(path / MODEL_FILE))
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        if errors:
            log(f"using {path.name}, the newest checkpoint that verifies")
        return path, state
    raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: {errors[0]}")


__all__ = ["gather_tensors", "load_tensors_into", "load_trainer", "save_trainer"]
