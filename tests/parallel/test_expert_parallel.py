"""Expert parallelism (moekit/parallel/expert.py) against one process: one MoE layer, 2 gloo ranks on a CPU.

One launch for the whole file: ep_worker.py's ranks check top-2 of 4 and of 8 experts, with routings skewed so that
an expert (or every expert of one rank) gets no token, with and without a capacity limit. Each rank reads its own
slice of the batch; outputs, input gradients, the router's gradient (summed over the data ranks) and the experts'
(summed over the ranks holding the same experts) must equal the one-process layer's within 1e-6 (fp32; measured
<= 3e-7), and the rows each rank's experts receive must equal a bincount of the one-process routing.
test_expert_parallel_4.py runs the same checks on 4 ranks (ep 2 with two expert-data-parallel groups, and ep 4).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/parallel/test_expert_parallel.py -q
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")

import ep_worker  # noqa: E402  (beside this file; pytest puts tests/parallel on sys.path)
from spawn import spawn_ranks  # noqa: E402

WORLD = 2
TOL = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(ep_worker.run, WORLD, tmp_path_factory.mktemp("ep"))


def _sizes(case: str) -> tuple[int, int]:
    """"E8_ep2_capacity" -> (8, 2)."""
    E, ep = case.split("_")[:2]
    return int(E.removeprefix("E")), int(ep.removeprefix("ep"))


def each(ranks, world: int):
    for r, res in enumerate(ranks):
        for name, case in res["cases"].items():
            yield r, name, case
    assert set(ranks[0]["cases"]) == set(ep_worker.cases(world))


def check_parity(ranks, world: int) -> None:
    for r, name, c in each(ranks, world):
        where = (r, name)
        assert c["y"] < TOL and c["x_grad"] < TOL and c["router_grad"] < TOL, (where, c)
        assert c["aux"] < TOL, where  # the ranks' load-balancing losses average to the one-process one
        for w, e in c["experts"].items():
            assert e["weight"] == 0.0 and e["grad"] < TOL, (where, w, e)


def check_counts(ranks, world: int) -> None:
    for r, name, c in each(ranks, world):
        # rows each local expert computed (summed over the expert-data-parallel group holding it)
        assert c["local_counts"] == c["ref_local_counts"], (r, name)
        if "capacity" not in name:
            assert c["local_counts"] == c["bincount_local"], (r, name)
        assert c["kept_all"] == c["kept_ref"], (r, name)


def check_idle_experts_and_ranks(ranks, world: int) -> None:
    for r, name, c in each(ranks, world):
        E, ep = _sizes(name)
        El, j = E // ep, r % ep  # rank r is expert rank r % ep (ep innermost among the data ranks)
        for e in c["dead"]:
            if e // El == j:
                assert c["local_counts"][e % El] == 0, (r, name)
        if "rank_dead" in name and j == ep - 1:
            assert c["received"] == 0 and sum(c["local_counts"]) == 0, (r, name)  # an idle rank still steps


def check_capacity_drops_the_one_process_tokens(ranks, world: int) -> None:
    for r, name, c in each(ranks, world):
        if "capacity" in name:
            assert c["dropped_all"] == c["dropped_ref"] > 0, (r, name, c["dropped_all"], c["dropped_ref"])


def check_rows_sent_and_received(ranks, world: int) -> None:
    """Every kept assignment leaves its rank once and arrives once: dropped rows are never sent."""
    for name in ranks[0]["cases"]:
        cases = [res["cases"][name] for res in ranks]
        kept = sum(cases[0]["kept_all"])
        assert kept == 2 * ep_worker.T - cases[0]["dropped_all"]
        assert sum(c["sent"] for c in cases) == sum(c["received"] for c in cases) == kept, name


def check_placements(ranks, world: int) -> None:
    for r, name, c in each(ranks, world):
        E, ep = _sizes(name)
        assert c["placements"] == ["S(0)", "R"], (r, name)  # experts on ep, whole F (no --tp here)
        assert c["local_shape"] == [E // ep, ep_worker.F_HIDDEN, ep_worker.D], (r, name)


def test_outputs_and_gradients_equal_one_process(ranks):
    check_parity(ranks, WORLD)


def test_each_rank_computes_a_bincount_of_the_routing(ranks):
    check_counts(ranks, WORLD)


def test_an_expert_or_a_whole_rank_without_tokens(ranks):
    check_idle_experts_and_ranks(ranks, WORLD)


def test_capacity_drops_the_tokens_one_process_drops(ranks):
    check_capacity_drops_the_one_process_tokens(ranks, WORLD)


def test_rows_sent_and_received_add_up(ranks):
    check_rows_sent_and_received(ranks, WORLD)


def test_each_rank_holds_its_experts(ranks):
    check_placements(ranks, WORLD)
