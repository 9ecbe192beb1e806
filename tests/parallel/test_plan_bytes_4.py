"""The planner's bytes per rank and per step on a 2 x 2 mesh: data parallelism over tensor-parallel pairs.

    .venv/bin/python -m pytest tests/parallel/test_plan_bytes_4.py -q     # one torchrun launch, 4 gloo ranks, ~20 s

The same worker and checks as tests/parallel/test_plan_bytes.py (its docstring says what is measured and how), for
the tiny preset: DDP x TP (moekit's per-parameter gradient all-reduce, `apply_replicate`) and FSDP2 --zero 3 x TP
(FSDP2 shards each tensor-parallel shard again on dimension 0; the gradient norm is reduced over both mesh
dimensions, one after the other). Each of the 4 ranks is compared with the planner's figures for its place in the
mesh (tensor rank innermost).
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
