"""The parallel layout of a run: torchrun's environment -> ParallelDims -> one DeviceMesh.

    env = init_distributed(timeout=600)                  # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...
    dims = ParallelDims.from_flags(env.world_size, dp=0, tp=2, zero=1, cfg=model_cfg)   # ValueError naming the flag
    mesh = build_mesh(dims, env.device.type)             # None for a world of one: no process group at all
    dp_rank, dp_size = data_rank(mesh)                   # which slice of each global batch this rank reads
    dist.all_reduce(loss, group=dp_mesh(mesh).get_group())   # a statistic over the data-parallel ranks

`ParallelDims` is modelled on torchtitan's (torchtitan/distributed/parallel_dims.py), with moekit's flags: `--dp D`
data-parallel ranks, `--tp T` tensor ranks, `--zero Z` how the data-parallel ranks share the training state:

    --zero 0  DDP: every rank holds everything; gradients all-reduced        (dims.dp_replicate = D)
    --zero 1  ZeRO-1: optimizer state sharded over the D ranks               (dims.dp_replicate = D)
              (with --tp: each tensor rank's shards over its D data ranks, moekit/parallel/zero1.py ShardedZero1)
    --zero 2  FSDP2 (ZeRO-2): + gradients sharded, and weights between steps (dims.dp_shard = D)
    --zero 3  FSDP2 (ZeRO-3): + weights resharded after each block's forward  (dims.dp_shard = D)

(Rajbhandari et al. 2020, "ZeRO"; FSDP2's reshard_after_forward=False keeps a block's weights gathered from its
forward to its backward, ZeRO-2's traffic, where True gathers them again for the backward: ZeRO-3. Unlike
DeepSpeed's ZeRO-2, FSDP2 also shards the weights at rest, FSDP1's SHARD_GRAD_OP.)

`--pp P` pipeline stages multiply the world: world = pp x dp x tp. `--ep E` expert ranks are carved out of the
data-parallel ranks, as Megatron-Core and torchtitan do (an expert-parallel group is E neighbouring data-parallel
ranks; E must divide dp): each data rank still reads its own slice of the batch, its tokens travel to the rank of
their expert and back (moekit/parallel/expert.py), and an expert's weights are held by dp / E ranks (the
"expert-data-parallel" group, over which its gradients are averaged) instead of dp.

Every error is a ValueError naming the flag and the valid choices, and needs no process group: the `--nproc`
launcher can validate in the parent before it starts a worker, a torchrun worker before its mesh.

The mesh always has the four dimensions ("pp", "dp_replicate", "dp_shard", "tp"), size 1 included, rank-major with
tp innermost (so tensor ranks are neighbours: one node's NVLink domain, Megatron's rank order). torchtitan instead names
only the dimensions > 1 (and flattens dp_replicate x dp_shard into "dp" with the private DeviceMesh._flatten);
keeping every name lets callers write `mesh["tp"]` without asking which dimensions exist, a size-1 dimension's group
is one rank (its collectives are no-ops) and three small process groups at start-up cost nothing measurable. Since
at most one of the two data-parallel dimensions is > 1 (HSDP is refused for now), `dp_mesh` is that one: no
flattening, no private API (torch 2.14 deprecates slicing a flattened dimension from the root mesh anyway). Gloo on
CPU, NCCL on CUDA (with gloo beside it for CPU tensors). With --ep, a second mesh over the same ranks names the
expert dimensions ("pp", "edp", "ep", "tp") (`build_expert_mesh`): the data-parallel ranks dp = edp x ep, ep inner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moekit.config import ModelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
EXPERT_MESH_DIMS = ("pp", "edp", "ep", "tp")
ZERO_MODES = {0: "DDP", 1: "ZeRO-1, sharded optimizer state", 2: "FSDP2 ZeRO-2, sharded gradients and optimizer",
              3: "FSDP2 ZeRO-3, fully sharded"}
ZERO_NAMES = {0: "DDP", 1: "ZeRO-1", 2: "FSDP2 ZeRO-2", 3: "FSDP2 ZeRO-3"}  # short, for log lines


def _zero_choices() -> str:
    return ", ".join(f"{z} ({name})" for z, name in ZERO_MODES.items())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class ParallelDims:
    """How many ranks each kind of parallelism spans; their product is the world size.

    dp_replicate: data-parallel ranks that each hold every weight (DDP, ZeRO-1); dp_shard: data-parallel ranks
    that shard the weights (FSDP2); tp: tensor-parallel ranks; pp: pipeline stages; ep: expert-parallel ranks,
    a divisor of dp (they are data-parallel ranks too, module docstring). zero: --zero. Build it with `from_flags`
    (the command line's --nproc/--dp/--tp/--ep/--pp/--zero) or directly.
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    zero: int = 0

    def __post_init__(self) -> None:
        for name, flag in (("dp_replicate", "--dp"), ("dp_shard", "--dp"), ("tp", "--tp"), ("ep", "--ep"),
                           ("pp", "--pp")):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{flag} {getattr(self, name)!r}: must be a positive integer ({name})")
        if self.zero not in ZERO_MODES or isinstance(self.zero, bool):
            raise ValueError(f"--zero {self.zero!r}: choose one of {_zero_choices()}")
        if self.dp % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the {self.dp} data-parallel ranks (expert ranks are data "
                             f"ranks too): choose one of {', '.join(map(str, _divisors(self.dp)))}")
        if self.ep > 1 and self.zero == 1:
            # ZeroRedundancyOptimizer partitions parameters over all data ranks, each updating its part for all; an
            # expert rank's experts are not the other ranks', so its partition would be applied to the wrong weights.
            raise ValueError("--ep with --zero 1 is not supported: ZeRO-1 partitions the optimizer over every "
                             "data-parallel rank, and expert ranks hold different experts; use --zero 0, 2 or 3")
        if self.zero < 2 and self.dp_shard > 1:
            raise ValueError(f"--zero {self.zero} ({ZERO_NAMES[self.zero]}) replicates the weights, but dp_shard is "
                             f"{self.dp_shard}: use --zero 2 or 3 to shard them (FSDP2)")
        if self.zero >= 2 and self.dp_replicate > 1:
            # HSDP (replicate across groups, shard within: fully_shard on a 2-D mesh, as torchtitan offers) is
            # refused until a 4-rank test covers it.
            raise ValueError(f"--zero {self.zero} shards over every data-parallel rank; dp_replicate "
                             f"{self.dp_replicate} x dp_shard {self.dp_shard} (HSDP) is not supported yet")

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads a distinct slice of every global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp  # ep is inside dp

    @property
    def edp(self) -> int:
        """Expert-data-parallel ranks: the data ranks that hold the same experts (dp when there is no --ep)."""
        return self.dp // self.ep

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        return self.pp, self.dp_replicate, self.dp_shard, self.tp

    @property
    def expert_mesh_shape(self) -> tuple[int, int, int, int]:
        return self.pp, self.edp, self.ep, self.tp

    def describe(self) -> str:
        """The layout in one log-line field, e.g. `dp2 x tp2 ZeRO-1`, `pp2 x dp4 (ep2) FSDP2 ZeRO-3`, `one process`."""
        parts = [f"pp{self.pp}"] if self.pp > 1 else []
        if self.dp > 1:
            parts.append(f"dp{self.dp}" + (f" (ep{self.ep})" if self.ep > 1 else ""))
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        if not parts:
            return "one process"
        return " x ".join(parts) + (f" {ZERO_NAMES[self.zero]}" if self.dp > 1 else "")

    # ---- building and checking ----------------------------------------------------------------------
    @classmethod
    def from_flags(cls, world_size: int, *, dp: int = 0, tp: int = 1, zero: int = 0, ep: int = 1, pp: int = 1,
                   cfg: ModelConfig | None = None) -> ParallelDims:
        """The layout that `--nproc world_size --dp dp --tp tp --pp pp --ep ep --zero zero` asks for (dp 0 = whatever
        is left of the world after tp and pp), checked against the world and, given `cfg`, the model. Raises
        ValueError."""
        if not _positive_int(world_size):
            raise ValueError(f"--nproc {world_size!r}: the number of processes must be a positive integer "
                             "(1 = one process, no torchrun)")
        if zero not in ZERO_MODES or isinstance(zero, bool):
            raise ValueError(f"--zero {zero!r}: choose one of {_zero_choices()}")
        for flag, value in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
            if not _positive_int(value):
                raise ValueError(f"{flag} {value!r}: must be a positive integer; choose one of "
                                 f"{', '.join(map(str, _divisors(world_size)))}")
        if cfg is not None:
            check_tp(tp, cfg)
            check_pp(pp, cfg)
            check_ep(ep, cfg)
        if not (dp == 0 or _positive_int(dp)):
            raise ValueError(f"--dp {dp!r}: must be a positive integer (or 0: the processes left after --tp)")
        if dp == 0:
            if world_size % pp:
                raise ValueError(f"--pp {pp} must divide the {world_size} processes (--nproc): choose one of "
                                 f"{', '.join(map(str, _divisors(world_size)))}")
            if world_size % (tp * pp):
                stage = world_size // pp
                where = f"{stage} processes of a pipeline stage (--nproc / --pp)" if pp > 1 else \
                    f"{world_size} processes (--nproc)"
                raise ValueError(f"--tp {tp} must divide the {where}: choose one of "
                                 f"{', '.join(map(str, _valid_tps(stage, cfg)))}")
            dp = world_size // (tp * pp)
        if dp * tp * pp != world_size:
            stage = world_size // pp if world_size % pp == 0 else world_size
            pairs = [f"--dp {stage // t} --tp {t}" for t in _valid_tps(stage, cfg)]
            with_pp = f" x --pp {pp}" if pp > 1 else ""
            raise ValueError(f"--dp {dp} x --tp {tp}{with_pp} = {dp * tp * pp} processes, but there are {world_size} "
                             f"(--nproc, or torchrun's WORLD_SIZE): choose {' or '.join(pairs)}{with_pp}")
        if dp % ep:
            raise ValueError(f"--ep {ep} must divide the {dp} data-parallel ranks (expert ranks are data ranks too, "
                             f"so --nproc = --pp x --dp x --tp): choose one of "
                             f"{', '.join(str(e) for e in _divisors(dp) if cfg is None or cfg.n_expert % e == 0)}")
        dims = cls(dp_replicate=dp if zero < 2 else 1, dp_shard=dp if zero >= 2 else 1, tp=tp, ep=ep, pp=pp,
                   zero=zero)
        if cfg is not None:
            dims.check_model(cfg)
        return dims

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise ValueError when this layout cannot split `cfg` (see `check_tp`, `check_pp`, `check_ep`)."""
        check_tp(self.tp, cfg)
        check_pp(self.pp, cfg)
        check_ep(self.ep, cfg)

    def check_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ValueError(f"the layout {self.describe()} needs {self.world_size} processes, but there are "
                             f"{world_size} (--nproc, or torchrun's WORLD_SIZE)")


def check_tp(tp: int, cfg: ModelConfig) -> None:
    """--tp splits the query heads, the KV heads unless there is one (MQA: replicated across tensor ranks, as vLLM
    and Megatron do), and each MLP's and expert's hidden size (Megatron: ffn_hidden_size % tp == 0)."""
    choices = ", ".join(map(str, _model_tps(cfg)))
    if cfg.n_head % tp:
        raise ValueError(f"--tp {tp} must divide the {cfg.n_head} query heads: choose one of {choices}")
    if cfg.n_kv_head > 1 and cfg.n_kv_head % tp:
        raise ValueError(f"--tp {tp} must divide the {cfg.n_kv_head} KV heads (a single KV head, MQA, would be "
                         f"replicated): choose one of {choices}")
    for name in _hidden_sizes(cfg):
        if getattr(cfg, name) % tp:
            raise ValueError(f"--tp {tp} must divide the MLP hidden size {name}={getattr(cfg, name)}: "
                             f"choose one of {choices}")


def check_ep(ep: int, cfg: ModelConfig) -> None:
    """--ep splits every MoE layer's experts into equal groups (Megatron: num_experts % ep == 0)."""
    if ep == 1:
        return
    if not cfg.n_moe_layers:
        raise ValueError(f"--ep {ep}: the model has no MoE layer to split (n_expert={cfg.n_expert}); use --ep 1")
    if cfg.n_expert % ep:
        raise ValueError(f"--ep {ep} must divide the {cfg.n_expert} experts: choose one of "
                         f"{', '.join(map(str, _divisors(cfg.n_expert)))}")


def check_pp(pp: int, cfg: ModelConfig, stages_per_rank: int = 1) -> None:
    """--pp x --stages-per-rank stages of equal layer counts. The placement rule is moekit/plan/layout.py's
    `layers_per_stage` (the planner's, for serving too), which splits evenly when it can; a training pipeline
    insists on it, as Megatron-LM does (num_layers % pipeline stages == 0): every micro-batch waits for the
    slowest stage, so one stage with an extra layer slows the whole pipeline by a layer's time per micro-batch."""
    stages = pp * stages_per_rank
    if pp == 1 and stages_per_rank == 1:
        return
    if cfg.n_layer % stages:
        ok = [p for p in _divisors(cfg.n_layer) if (cfg.n_layer // p) % stages_per_rank == 0]
        what = f"--pp {pp}" + (f" x --stages-per-rank {stages_per_rank}" if stages_per_rank > 1 else "")
        raise ValueError(f"{what} does not split the {cfg.n_layer} layers into equal stages: choose --pp from "
                         f"{', '.join(map(str, ok))}" + (f" (with --stages-per-rank {stages_per_rank})"
                                                        if stages_per_rank > 1 else ""))


def _hidden_sizes(cfg: ModelConfig) -> list[str]:
    """The hidden sizes tensor parallelism splits: the experts' if there are MoE layers, the dense MLPs' if there
    are dense layers."""
    return (["d_ff"] if cfg.n_moe_layers else []) + (["dense_d_ff"] if cfg.n_layer > cfg.n_moe_layers else [])


def _model_tps(cfg: ModelConfig) -> list[int]:
    """Tensor-parallel sizes the model allows (the common divisors of check_tp's sizes)."""
    sizes = ([cfg.n_head] + [getattr(cfg, n) for n in _hidden_sizes(cfg)]
             + ([cfg.n_kv_head] if cfg.n_kv_head > 1 else []))
    return [t for t in _divisors(cfg.n_head) if all(s % t == 0 for s in sizes)]


def _valid_tps(world_size: int, cfg: ModelConfig | None) -> list[int]:
    return [t for t in _divisors(world_size) if cfg is None or t in _model_tps(cfg)]


# ---- processes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: torchrun's RANK, WORLD_SIZE and LOCAL_RANK, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, prints and writes metrics."""
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda[:N]: auto is CUDA where there is one; each process of a job takes cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto", timeout: float = 600.0) -> DistEnv:
    """Join the job torchrun started (its env:// variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Without torchrun, or with WORLD_SIZE=1, no process group is created at all: a world of one runs the same code
    with `build_mesh` returning None. `timeout` (seconds, --collective-timeout) bounds every collective, so a rank
    that hangs fails the job instead of holding it forever (gloo enforces it per call; NCCL through its watchdog).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # (RANK, MASTER_ADDR, MASTER_PORT: read by env:// init)
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(0, 1, 0, dev)
    if not timeout > 0:
        raise ValueError(f"--collective-timeout {timeout!r}: must be a positive number of seconds")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # NCCL for CUDA tensors, gloo beside it for CPU ones (object collectives, CPU-side statistics), as
        # torchtitan does; device_id binds the communicator to this GPU at once (PyTorch init_process_group docs).
        backend, kwargs = "cuda:nccl,cpu:gloo", {"device_id": dev}
    else:
        backend, kwargs = "gloo", {}
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout), **kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def destroy_distributed() -> None:
    """Leave the job (call it in `finally`: a process that exits holding a group can hang its peers)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """The job's one DeviceMesh, dimensions ("pp", "dp_replicate", "dp_shard", "tp"); None for a world of one
    (nothing to communicate with). Needs the process group of `init_distributed`."""
    if dims.world_size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ValueError(f"the layout {dims.describe()} needs {dims.world_size} processes: launch it with "
                         f"`torchrun --nproc-per-node {dims.world_size}` or `moekit train --nproc {dims.world_size}`")
    dims.check_world(dist.get_world_size())
    return init_device_mesh(device_type, dims.mesh_shape, mesh_dim_names=MESH_DIMS)


def build_expert_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """The same ranks as `build_mesh`'s, named ("pp", "edp", "ep", "tp"): data rank d = edp_index x ep + ep_index,
    so an expert-parallel group is ep neighbouring data ranks. None without --ep."""
    if dims.ep == 1:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.arange(dims.world_size).view(dims.expert_mesh_shape)
    return DeviceMesh(device_type, ranks, mesh_dim_names=EXPERT_MESH_DIMS)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh of the data-parallel ranks: over them gradients are averaged and batches split. ParallelDims
    allows at most one of dp_replicate and dp_shard > 1, so it is that dimension (dp_shard when both are 1)."""
    return mesh["dp_replicate"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]


def data_rank(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(this rank's index among the data-parallel ranks, their number): rank r of D reads the r-th of D equal,
    contiguous slices of every global batch, so all ranks together read exactly one process's batch."""
    if mesh is None:
        return 0, 1
    dp = dp_mesh(mesh)
    return dp.get_local_rank(), dp.size()
