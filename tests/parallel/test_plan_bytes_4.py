"""The planner's bytes per rank and per step on a 2 x 2 mesh: data parallelism over tensor-parallel pairs.

    .venv/bin/python -m pytest tests/parallel/test_plan_bytes_4.py -q     # one torchrun launch, 4 gloo ranks, ~20 s

The same worker and checks as tests/parallel/test_plan_bytes.py (its docstring says what is measured and how), for
the tiny preset: DDP x TP (moekit's per-parameter gradient all-reduce, `apply_replicate`), FSDP2 --zero 3 x TP
(FSDP2 shards each tensor-parallel shard again on dimension 0; the gradient norm is reduced over both mesh
dimensions, one after the other) and ZeRO-1 x TP (`ShardedZero1`: each tensor rank's shards partitioned over its
data ranks, whole shards each, and broadcast by their owners). Each of the 4 ranks is compared with the planner's
figures for its place in the mesh (tensor rank innermost).
"""

from __future__ import annotations

import plan_bytes_worker as worker  # (beside this file; pytest puts tests/parallel on sys.path)
import pytest
from test_plan_bytes import check_collectives, check_held, pytestmark  # noqa: F401  (the same skips)

WORLD = 4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return worker.launch(tmp_path_factory.mktemp("plan_bytes_4"), WORLD)


@pytest.mark.parametrize("model, layout", worker.runs(WORLD))
def test_each_rank_holds_what_the_planner_says(ranks, model, layout):
    check_held(ranks, model, layout, WORLD)


@pytest.mark.parametrize("model, layout", worker.runs(WORLD))
def test_collective_bytes_per_step_match_the_planner(ranks, model, layout):
    check_collectives(ranks, model, layout, WORLD)


def test_zero1_x_tp2_shards_each_tensor_ranks_adamw_state_over_its_data_ranks(ranks):
    """Each rank holds about half of the AdamW state of its tensor shard (whole shards: not exactly half), the
    partition `rank_bytes(..., zero=1, tp=2)` gives, exactly; the two data ranks of a tensor rank hold it all."""
    from moekit.plan.shards import rank_bytes
    from moekit.presets import get_preset

    held = [res["runs"]["tiny/zero1_x_tp2"]["held"]["optimizer"] for res in ranks]
    for tp_rank in (0, 1):
        want = rank_bytes(get_preset("tiny"), dp=2, tp=2, zero=1, tp_rank=tp_rank).optimizer_per_dp_rank
        mine = [held[dp_rank * 2 + tp_rank] for dp_rank in (0, 1)]  # tensor rank innermost
        assert mine == want, (tp_rank, mine, want)
        whole = rank_bytes(get_preset("tiny"), dp=2, tp=2, zero=0, tp_rank=tp_rank).optimizer  # unsharded
        assert 0.4 * whole < min(mine) <= max(mine) < 0.6 * whole, (mine, whole)
