"""The checks of test_expert_parallel.py on 4 gloo ranks: ep 2 (two expert-data-parallel groups of 2, whose expert
gradients are summed over the group) and ep 4 (one expert group: 1 or 2 experts per rank).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/parallel/test_expert_parallel_4.py -q
"""

from __future__ import annotations

import pytest
import test_expert_parallel as two  # noqa: E402  (beside this file)
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")

import ep_worker  # noqa: E402
from spawn import spawn_ranks  # noqa: E402

WORLD = 4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(ep_worker.run, WORLD, tmp_path_factory.mktemp("ep4"))


@pytest.mark.parametrize("check", [two.check_parity, two.check_counts, two.check_idle_experts_and_ranks,
                                   two.check_capacity_drops_the_one_process_tokens, two.check_rows_sent_and_received,
                                   two.check_placements], ids=lambda f: f.__name__)
def test_four_ranks(ranks, check):
    check(ranks, WORLD)
