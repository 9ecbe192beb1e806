"""The planner's bytes per rank and per step (moekit/plan/shards.py, moekit/plan/comm.py; `moekit plan train`)
against what moekit's sharded models really hold and what their collectives really carry (issue 10, item 7).

    .venv/bin/python -m pytest tests/parallel/test_plan_bytes.py -q       # one torchrun launch, gloo, ~45 s

One 2-rank launch (plan_bytes_worker.py, OMP_NUM_THREADS=1 per rank) trains, with moekit's own Trainer, DDP, DDP
with a bucket-counting communication hook, ZeRO-1, FSDP2 --zero 2 and 3, and TP (+SP, loss parallel) with and
without sequence parallelism, for the tiny preset (3 steps) and gpt4-mini with 2 of its 8 layers (1 step; every
tensor keeps its shape: 74M of its 282M parameters, so DDP holds 1.5 GB per rank instead of 5.6). The checks, at
the issue's tolerances (1% for bytes held, 5% for collective bytes; on torch 2.14 they agree to the byte):

- each rank's local weights, gradients (DTensor `to_local()` numel x element size) and AdamW state
  (`optimizer_state_bytes`) = `rank_bytes` for that rank: ZeRO-1's partition too, rank by rank (the planner
  replays ZeroRedundancyOptimizer's greedy assignment; the ranks differ by 7.6% for tiny);
- each step's payload per collective kind (moekit.parallel.collectives's dispatch-mode counter) =
  `step_collectives`, and
  DDP's gradient buckets as its communication hook sees them = the predicted gradient all-reduce. DDP's second step
  also broadcasts its rebuilt bucket order once (164 bytes for tiny): steps 0 and 2 are compared, step 1 is not.

Full-size models, without memory (DESIGN.md: meta-device weights over torch's "fake" process group, one process
playing each rank in turn): gpt4-mini's weights per rank under FSDP2 and TP2 and its ZeRO-1 partition (282M
parameters), GPT-4's weights per rank at tp 8 and at FSDP2 x tp 8 (1.8T parameters, 16 ranks).
"""

from __future__ import annotations

import plan_bytes_worker as worker  # (beside this file; pytest puts tests/parallel on sys.path)
import pytest
import torch
import torch.distributed as dist

from moekit.parallel.data import has_fsdp2
from moekit.plan.shards import rank_bytes, zero1_partition
from moekit.presets import get_preset

WORLD, HELD_TOL, COMM_TOL = 2, 0.01, 0.05
pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
              pytest.mark.skipif(not has_fsdp2(), reason=f"FSDP2 needs torch >= 2.6, this is {torch.__version__}")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return worker.launch(tmp_path_factory.mktemp("plan_bytes"), WORLD)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1.0)


def check_held(ranks: list[dict], model: str, layout: str, world: int) -> None:
    """Every rank's weights, gradients and AdamW state = the planner's for that rank; the plan's = the fullest."""
    p, dp, tp = worker.plan_for(model, layout, world)
    zero = worker.LAYOUTS[layout][0]
    for r, res in enumerate(ranks):
        held = res["runs"][f"{model}/{layout}"]["held"]
        want = rank_bytes(worker.model_configs()[model], dp=dp, tp=tp, zero=zero, precision="fp32",
                          dp_rank=r // tp, tp_rank=r % tp)  # tp innermost (moekit/parallel/mesh.py)
        for key in ("weights", "gradients", "optimizer"):
            assert rel(held[key], getattr(want, key)) <= HELD_TOL, (
                f"rank {r} {key}: holds {held[key]:,} bytes, the planner says {getattr(want, key):,.0f}")
    fullest = max(res["runs"][f"{model}/{layout}"]["held"]["optimizer"] for res in ranks)
    assert rel(fullest, p.ranks.optimizer) <= HELD_TOL  # `moekit plan train` reports the fullest rank


def check_collectives(ranks: list[dict], model: str, layout: str, world: int) -> None:
    """Each step's payload per collective kind on every rank = the plan's (steps 0 and the last: see docstring)."""
    want = worker.plan_for(model, layout, world)[0].collectives.payload_by_kind()
    for r, res in enumerate(ranks):
        steps = res["runs"][f"{model}/{layout}"]["steps"]
        for i in sorted({0, len(steps) - 1}):
            got = steps[i]["payload"]
            assert set(got) == set(want), f"rank {r} step {i}: kinds {sorted(got)}, planned {sorted(want)}"
            for kind, b in want.items():
                assert rel(got[kind], b) <= COMM_TOL, f"rank {r} step {i} {kind}: {got[kind]:,} bytes, planned {b:,.0f}"


# ---- bytes each rank holds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, layout", worker.runs(WORLD))
def test_each_rank_holds_what_the_planner_says(ranks, model, layout):
    check_held(ranks, model, layout, WORLD)


def test_zero1_partition_is_uneven_and_the_planner_knows_which_rank(ranks):
    held = [res["runs"]["tiny/zero1"]["held"]["optimizer"] for res in ranks]
    want = rank_bytes(get_preset("tiny"), dp=2, zero=1).optimizer_per_dp_rank
    assert held == want  # whole parameters: 20,971,540 vs 19,440,772 bytes, not 1/2 each
    assert held[0] != held[1]


# ---- bytes each step's collectives carry ------------------------------------------------------------------------
@pytest.mark.parametrize("model, layout", worker.runs(WORLD))
def test_collective_bytes_per_step_match_the_planner(ranks, model, layout):
    check_collectives(ranks, model, layout, WORLD)


@pytest.mark.parametrize("model", [m for m, layout in worker.runs(WORLD) if layout == "ddp_hook"])
def test_ddp_buckets_seen_by_a_comm_hook_are_the_gradient_all_reduce(ranks, model):
    p, *_ = worker.plan_for(model, "ddp", WORLD)
    (grads,) = [c for c in p.collectives.collectives if c.what == "gradients (DDP buckets)"]
    for res in ranks:
        for step in res["runs"][f"{model}/ddp_hook"]["steps"]:
            assert step["buckets"] and rel(sum(step["buckets"]), grads.payload) <= COMM_TOL


# ---- full-size models on the meta device ---------------------------------------------------------------------------
def fake_rank(cfg, world: int, rank: int, **flags):
    """Build `cfg` on the meta device as rank `rank` of a fake `world`, parallelized with moekit's own code: its
    local weight bytes, or under --zero 1 the numbers of elements ZeroRedundancyOptimizer gives each rank."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moekit.model.transformer import Transformer
    from moekit.parallel.collectives import held_bytes
    from moekit.parallel.data import shard_optimizer
    from moekit.parallel.mesh import DistEnv, ParallelDims, build_mesh
    from moekit.parallel.parallelize import Layout, parallelize
    from moekit.train.config import TrainConfig
    from moekit.train.optim import build_optimizer

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        dims = ParallelDims.from_flags(world, cfg=cfg, **flags)
        with torch.device("meta"):
            model = Transformer(cfg)
        if dims.zero == 1:  # (DDP itself cannot wrap meta weights; the partition is the optimizer's)
            opt = shard_optimizer(build_optimizer(model, TrainConfig(steps=1)), dims, build_mesh(dims, "cpu"))
            return [sum(p.numel() for g in part for p in g["params"]) for part in opt._partition_parameters()]
        model = parallelize(model, Layout.from_env(dims, DistEnv(rank, world, 0, torch.device("cpu"))))
        return held_bytes(model)["weights"]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name, world, flags, check_ranks", [
    ("gpt4-mini", 2, {"zero": 3}, (0, 1)),
    ("gpt4-mini", 2, {"tp": 2}, (0, 1)),
    ("gpt4", 8, {"tp": 8}, (0, 7)),
    ("gpt4", 16, {"tp": 8, "zero": 3}, (0, 5, 15)),
])
def test_full_size_weights_per_rank(name, world, flags, check_ranks):
    cfg = get_preset(name)
    tp, zero = flags.get("tp", 1), flags.get("zero", 0)
    for rank in check_ranks:
        want = rank_bytes(cfg, dp=world // tp, tp=tp, zero=zero, dp_rank=rank // tp, tp_rank=rank % tp)
        assert rel(fake_rank(cfg, world, rank, **flags), want.weights) <= HELD_TOL


@pytest.mark.parametrize("world", [2, 8])
def test_full_size_zero1_partition(world):
    from moekit.plan.shards import params

    cfg = get_preset("gpt4-mini")
    got = fake_rank(cfg, world, 0, zero=1)
    assert got == [sum(p.numel for p in part) for part in zero1_partition(params(cfg), world)]
