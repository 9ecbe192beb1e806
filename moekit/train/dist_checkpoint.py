"""Checkpoints of a Trainer on any layout: every rank writes its own shards (torch.distributed.checkpoint).

    path = save_trainer(trainer)                     # every rank calls it
    path, state = load_trainer(trainer, "runs/x")    # every rank calls it; each loads what its layout holds

A one-process run writes checkpoint.py's safetensors files. A distributed run writes the same folder with
the tensors as a DCP set (`torch.distributed.checkpoint.save`): each rank writes the shards it holds (FSDP2
and tensor-parallel DTensors, ZeRO-1's optimizer partition (with --tp, DTensor views of each owned shard's state:
`_state_view`); replicated tensors once) into `__R_0.distcp`,
rank 0 the `.metadata`; then rank 0 checksums every file into state.json and renames the folder into
place, so a killed save leaves the previous checkpoint loadable and a damaged shard is named at load.

Loading takes either format into any layout: the keys are the one-process names (`model.<name>`,
`optim.<name>.<exp_avg|exp_avg_sq|step>`), and DCP reshards saved chunks into whatever this layout holds
(save at dp2 x tp2, resume at tp2, at dp4, or on one process with no process group at all). A whole-tensor
checkpoint (one process, or a seed checkpoint) is read whole by every rank, each keeping its part.
`gather_tensors` collects whole tensors on the main rank: the export to model.safetensors at the end of a
run, which `moekit generate/serve` and Hugging Face read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from moekit.model.transformer import upgrade_state_dict
from moekit.train.checkpoint import (
    DCP_METADATA,
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointError,
    load_newest,
    load_optimizer_tensors,
    model_tensors,
    new_checkpoint_dir,
    optimizer_tensors,
    publish_checkpoint,
    save_checkpoint_files,
    step_dir,
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
    if getattr(trainer, "pipe", None) is not None:
        return _gather_pipeline(trainer, with_optimizer)
    if trainer.layout.mesh is None:
        files = {MODEL_FILE: model_tensors(raw)}
        if with_optimizer:
            files[OPTIM_FILE] = optimizer_tensors(raw, opt)
        return files
    if _sharded(trainer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if not with_optimizer:  # the export at the end of a run: the weights only
            msd, osd = get_model_state_dict(trainer.model, options=options), {"state": {}}
        elif _is_sharded_zero1(opt):
            raise CheckpointError("gathering ZeRO-1's tensor-parallel optimizer state into one file is not supported; "
                                  "the DCP checkpoint holds it (resume on one process to get one)")
        else:
            msd, osd = get_state_dict(trainer.model, opt, options=options)
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


def _gather_pipeline(trainer: Trainer, with_optimizer: bool) -> dict[str, dict[str, torch.Tensor]] | None:
    """gather_tensors of a pipelined run: each stage's whole tensors (one-process names), sent over the pipeline
    group of the main rank (its data/tensor coordinate) and merged there. A stage's sharded weights (tensor, expert
    or FSDP2 parallel DTensors) are made whole first with `full_tensor()`, a collective over each weight's own mesh
    that every rank of the stage joins in the same (state-dict) order. The optimizer state of sharded stages is not
    gathered (nothing asks for it: distributed runs checkpoint with DCP; the export is the weights)."""
    if _sharded(trainer) and with_optimizer:
        raise CheckpointError("gathering a pipeline's sharded optimizer state into one file is not supported; the DCP "
                              "checkpoint holds it (resume on one process to get one)")
    from moekit.parallel.mesh import data_rank

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()

    mine = {MODEL_FILE: {k.split(".", 1)[1]: whole(v) for k, v in dcp_state(trainer, False).items()}}
    if with_optimizer:
        mine[OPTIM_FILE] = _flat({_param_names(trainer)[id(p)]: st
                                  for p, st in _local_optimizer(trainer.opt).state.items()})
    dp_rank, _ = data_rank(trainer.layout.mesh)
    tp_rank = trainer.layout.mesh["tp"].get_local_rank()
    if dp_rank or tp_rank:  # only the main rank's pipeline group gathers
        return None
    group = trainer.pipe.group
    everything: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everything, mine, group=group)
    if not trainer.layout.is_main:
        return None
    return {name: {k: v for part in everything for k, v in part[name].items()} for name in mine}


def save_trainer(trainer: Trainer) -> Path:
    """Checkpoint the trainer's step (every rank must call it); the checkpoint folder's path on every rank."""
    step, keep = trainer.state.step, trainer.tc.keep_checkpoints
    if trainer.layout.mesh is None:
        return save_checkpoint_files(trainer.run_dir, step, gather_tensors(trainer), trainer.checkpoint_state(), keep)
    import torch.distributed.checkpoint as dcp

    tmp = None
    if trainer.layout.is_main:
        tmp = new_checkpoint_dir(trainer.run_dir, step, "dcp")
    holder = [str(tmp) if tmp else None]
    dist.broadcast_object_list(holder, src=0)  # every rank writes into the main rank's new folder
    tmp = Path(holder[0])
    _init_optimizer_state(trainer)
    dcp.save(dcp_state(trainer, with_optimizer=True), checkpoint_id=str(tmp))  # each rank its shards
    path = step_dir(trainer.run_dir, step)
    if trainer.layout.is_main:
        publish_checkpoint(trainer.run_dir, step, tmp, dict(trainer.checkpoint_state(), format="dcp"), keep)
    dist.barrier()  # nobody goes on (or exits) before the checkpoint is complete on disk
    return path


# ---- the DCP form: one-process names over whatever this layout holds ----------------------------------------------
def _param_names(trainer: Trainer) -> dict[int, str]:
    """id of a parameter, or of the optimizer's stand-in for it (ShardedZero1), -> its one-process name."""
    names = {id(p): _one_process_name(trainer, n) for n, p in trainer.raw.named_parameters()}
    if _is_sharded_zero1(trainer.opt):
        names.update({id(s): names[id(trainer.opt.param_of(s))] for g in trainer.opt.param_groups for s in g["params"]})
    return names


def _is_sharded_zero1(opt: torch.optim.Optimizer) -> bool:
    """ZeRO-1 over tensor-parallel shards (moekit/parallel/zero1.py ShardedZero1): its state is keyed by plain
    stand-ins of the DTensor parameters' local shards."""
    return hasattr(opt, "param_of")


def _state_view(opt: torch.optim.Optimizer, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """What DCP saves and loads for one state tensor of `param` (as the local optimizer keys it).

    ShardedZero1's exp_avg / exp_avg_sq of a tensor-parallel parameter are plain tensors of its local shard, which
    differ per tensor rank: under one name each would claim the whole tensor. A DTensor view of them in the
    parameter's own mesh and placements (sharing their storage: DCP loads in place) gives DCP each shard's offset
    in the one-process tensor, so a checkpoint reshards into any layout. Only a parameter's owner data rank has its
    state; DCP merges the chunks the owners of each tensor coordinate write. `step` (a scalar) stays plain."""
    if not _is_sharded_zero1(opt):
        return value
    p = opt.param_of(param)
    if not hasattr(p, "device_mesh") or value.shape != p.to_local().shape or value.dim() == 0:
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def _one_process_name(trainer: Trainer, name: str) -> str:
    """A pipeline's last stage holds a copy of a tied embedding as lm_head.weight (moekit/parallel/pipeline.py):
    it is saved and loaded as the one tensor one process stores, tok_emb.weight (both stages hold equal values)."""
    raw = trainer.raw
    if name == "lm_head.weight" and raw.cfg.tie_embeddings and getattr(raw, "tok_emb", None) is None:
        return "tok_emb.weight"
    return name


def _local_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer holding this rank's state tensors (ZeRO-1 wraps a local AdamW over its partition)."""
    return opt.optim if _is_zero1(opt) else opt


def _init_optimizer_state(trainer: Trainer) -> None:
    """Give every parameter its AdamW state before the first step (a resume into a fresh trainer): a step with
    zero gradients at learning rate 0 creates the tensors without changing a weight (what torch's own
    `torch.distributed.checkpoint.state_dict._init_optim_state` does). DCP then loads into them in place."""
    local = _local_optimizer(trainer.opt)
    params = [p for g in local.param_groups for p in g["params"]]
    if all(p in local.state and local.state[p] for p in params):
        return
    lrs = [g["lr"] for g in local.param_groups]
    for g in local.param_groups:
        g["lr"] = 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    local.step()
    for g, lr in zip(local.param_groups, lrs, strict=True):
        g["lr"] = lr
    local.zero_grad(set_to_none=True)


def dcp_state(trainer: Trainer, with_optimizer: bool) -> dict[str, torch.Tensor]:
    """The flat dict DCP saves and loads: `model.<name>` and `optim.<name>.<key>` over this rank's tensors
    (plain, DTensor shards, or ZeRO-1's partition only), keyed by the one-process parameter names."""
    tied = trainer.raw.cfg.tie_embeddings and getattr(trainer.raw, "tok_emb", None) is not None
    out = {f"model.{_one_process_name(trainer, k)}": v for k, v in trainer.raw.state_dict().items()
           if not (k == "lm_head.weight" and tied)}  # tied: stored once
    if with_optimizer:
        names, local = _param_names(trainer), _local_optimizer(trainer.opt)
        for p, st in local.state.items():
            for key, value in st.items():
                out[f"optim.{names[id(p)]}.{key}"] = _state_view(trainer.opt, p, value)
    return out


def _load_dcp(trainer: Trainer, path: Path, with_optimizer: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    if with_optimizer:
        _init_optimizer_state(trainer)
    wanted = dcp_state(trainer, with_optimizer)
    reader = FileSystemReader(str(path))
    saved = reader.read_metadata().state_dict_metadata
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CheckpointError(f"{path} does not match this model (it lacks {missing[0]}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + "): was it saved from another configuration?")
    for key, t in wanted.items():
        shape = tuple(saved[key].size) if hasattr(saved[key], "size") else None
        if shape is not None and shape != tuple(t.shape):
            raise CheckpointError(f"{path}: {key.split('.', 1)[1]} has shape {shape}, the model expects "
                                  f"{tuple(t.shape)}: was it saved from another configuration?")
    # In place into this layout's tensors; a world of one reads it with no process group (no_dist).
    dcp.load(wanted, storage_reader=reader, no_dist=trainer.layout.mesh is None)
    if trainer.raw.cfg.tie_embeddings and getattr(trainer.raw, "tok_emb", None) is not None \
            and getattr(trainer.raw, "lm_head", None) is not None:
        trainer.raw.lm_head.weight = trainer.raw.tok_emb.weight


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
    if optim_t is not None and _is_sharded_zero1(opt):
        _load_shards_of_whole_state(trainer, _unflat(optim_t), source)
    elif optim_t is not None:
        template = get_optimizer_state_dict(trainer.model, opt, options=options)  # param groups, keyed by name
        state = _unflat(optim_t)
        if raw.cfg.tie_embeddings and "tok_emb.weight" in state:
            state.setdefault("lm_head.weight", state["tok_emb.weight"])
        set_optimizer_state_dict(trainer.model, opt, {"state": state, "param_groups": template["param_groups"]},
                                 options=options)


def _load_shards_of_whole_state(trainer: Trainer, state: dict[str, dict[str, torch.Tensor]], source: str) -> None:
    """ShardedZero1 from whole (one-process) AdamW state: each owned stand-in takes its parameter's local shard of
    every state tensor (DTensor's own shard offsets), in place into the state `_init_optimizer_state` creates."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _init_optimizer_state(trainer)
    opt, names = trainer.opt, _param_names(trainer)
    if trainer.raw.cfg.tie_embeddings and "tok_emb.weight" in state:
        state.setdefault("lm_head.weight", state["tok_emb.weight"])
    for s, st in _local_optimizer(opt).state.items():
        name, p = names[id(s)], opt.param_of(s)
        if name not in state:
            raise CheckpointError(f"{source}: no optimizer state for {name!r}")
        for key, t in st.items():
            whole = state[name][key]
            if hasattr(p, "device_mesh") and t.dim() > 0:
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                whole = whole[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
            t.copy_(whole.reshape(t.shape))


def load_trainer(trainer: Trainer, run_dir: str | Path, with_optimizer: bool = True, log=print) -> tuple[Path, dict]:
    """Load the newest checkpoint of `run_dir` that verifies (saying which were skipped); (path, its state.json).

    Every rank verifies and reads the files itself (they are whole tensors; no rank waits on another's read).
    """
    def load(path: Path) -> dict:
        state = verify_checkpoint(path)
        if DCP_METADATA in state["files"]:
            _load_dcp(trainer, path, with_optimizer)
            return state
        optim_t = None
        if with_optimizer:
            if OPTIM_FILE not in state["files"]:
                raise CheckpointError(f"{path} has no optimizer state: it cannot be resumed, only used with "
                                      "--init-from")
            optim_t = load_file(path / OPTIM_FILE)
        load_tensors_into(trainer, load_file(path / MODEL_FILE), optim_t, str(path / MODEL_FILE))
        return state

    return load_newest(run_dir, load, log)


__all__ = ["gather_tensors", "load_tensors_into", "load_trainer", "save_trainer"]
