"""ParallelDims (moekit/parallel/mesh.py): every bad flag is one ValueError naming the flag and the valid choices,
and a world of one needs no process group. One process, no torchrun:

    .venv/bin/python -m pytest tests/parallel/test_mesh.py
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moekit.config import ModelConfig
from moekit.parallel.mesh import DistEnv, ParallelDims, build_mesh, data_rank, init_distributed

CFG = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=1, d_ff=48, n_expert=4, top_k=2,
                  max_seq_len=32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=4, tp=3, cfg=CFG), "--tp 3 must divide the 4 query heads: choose one of 1, 2, 4"),
    (dict(world_size=4, dp=3, cfg=CFG), "--dp 3 x --tp 1 = 3 processes, but there are 4 (--nproc, or torchrun's "
                                        "WORLD_SIZE): choose --dp 4 --tp 1 or --dp 2 --tp 2 or --dp 1 --tp 4"),
    (dict(world_size=4, zero=5), "--zero 5: choose one of 0 (DDP), 1 (ZeRO-1, sharded optimizer state), 2 (FSDP2 "
                                 "ZeRO-2, sharded gradients and optimizer), 3 (FSDP2 ZeRO-3, fully sharded)"),
    (dict(world_size=0), "--nproc 0: the number of processes must be a positive integer"),
    (dict(world_size=-2), "--nproc -2:"),
    (dict(world_size=6, tp=4), "--tp 4 must divide the 6 processes (--nproc): choose one of 1, 2, 3, 6"),
    (dict(world_size=8, tp=4, cfg=CFG.replace(n_head=8, n_kv_head=2)),
     "--tp 4 must divide the 2 KV heads (a single KV head, MQA, would be replicated): choose one of 1, 2"),
    (dict(world_size=4, tp=4, cfg=CFG.replace(d_ff=50)), "--tp 4 must divide the MLP hidden size d_ff=50: choose one "
                                                         "of 1, 2"),
    (dict(world_size=2, tp=0), "--tp 0: must be a positive integer; choose one of 1, 2"),
    (dict(world_size=8, ep=3, cfg=CFG.replace(n_expert=8)), "--ep 3 must divide the 8 experts: choose one of 1, 2, 4, "
                                                            "8"),
    (dict(world_size=4, ep=8, cfg=CFG.replace(n_expert=8)), "--ep 8 must divide the 4 data-parallel ranks (expert "
                                                            "ranks are data ranks too, so --nproc = --pp x --dp x "
                                                            "--tp): choose one of 1, 2, 4"),
    (dict(world_size=2, ep=2, cfg=CFG.replace(n_expert=1, top_k=1)), "--ep 2: the model has no MoE layer"),
    (dict(world_size=2, ep=2, zero=1), "--ep with --zero 1 is not supported"),
    (dict(world_size=3, pp=3, cfg=CFG.replace(n_layer=4)), "--pp 3 does not split the 4 layers into equal stages: "
                                                           "choose --pp from 1, 2, 4"),
    (dict(world_size=6, pp=4), "--pp 4 must divide the 6 processes (--nproc): choose one of 1, 2, 3, 6"),
    (dict(world_size=4, pp=2, dp=3), "--dp 3 x --tp 1 x --pp 2 = 6 processes, but there are 4"),
    (dict(world_size=2, pp=0), "--pp 0: must be a positive integer"),
])
def test_every_bad_flag_is_one_line_naming_it_and_the_choices(kwargs, message):
    world = kwargs.pop("world_size")
    with pytest.raises(ValueError) as e:
        ParallelDims.from_flags(world, **kwargs)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_mqa_kv_head_is_replicated_so_any_head_divisor_is_a_valid_tp():
    dims = ParallelDims.from_flags(4, tp=4, cfg=CFG)  # 4 query heads, 1 KV head
    assert (dims.tp, dims.dp) == (4, 1)


@pytest.mark.parametrize("zero, replicate, shard", [(0, 2, 1), (1, 2, 1), (2, 1, 2), (3, 1, 2)])
def test_zero_decides_whether_the_data_parallel_ranks_replicate_or_shard(zero, replicate, shard):
    dims = ParallelDims.from_flags(4, tp=2, zero=zero, cfg=CFG)  # --dp 0: the ranks --tp leaves
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.zero) == (replicate, shard, 2, zero)
    assert dims.mesh_shape == (1, replicate, shard, 2) and dims.world_size == 4 and dims.dp == 2
    assert dims.describe() == f"dp2 x tp2 {('DDP', 'ZeRO-1', 'FSDP2 ZeRO-2', 'FSDP2 ZeRO-3')[zero]}"


def test_the_dataclass_refuses_mixed_or_hybrid_layouts():
    with pytest.raises(ValueError, match="--zero 0 .* use --zero 2 or 3"):
        ParallelDims(dp_shard=2, zero=0)
    with pytest.raises(ValueError, match="HSDP"):
        ParallelDims(dp_replicate=2, dp_shard=2, zero=3)
    with pytest.raises(ValueError, match="--zero True"):
        ParallelDims(zero=True)
    with pytest.raises(ValueError, match="needs 2 processes, but there are 4"):
        ParallelDims(dp_replicate=2).check_world(4)


# ---- a world of one --------------------------------------------------------------------------------------------
@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_a_world_of_one_creates_no_process_group(no_torchrun):
    env = init_distributed("cpu")
    assert env == DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")) and env.is_main
    assert not (dist.is_available() and dist.is_initialized())
    dims = ParallelDims.from_flags(env.world_size, cfg=CFG)
    assert dims == ParallelDims() and dims.describe() == "one process"
    assert build_mesh(dims, "cpu") is None
    assert data_rank(None) == (0, 1)


def test_a_layout_without_its_processes_says_how_to_launch_it(no_torchrun):
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        build_mesh(ParallelDims(dp_replicate=2), "cpu")


def test_a_bad_collective_timeout_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--collective-timeout 0"):
        init_distributed("cpu", timeout=0)
    assert not dist.is_initialized()
