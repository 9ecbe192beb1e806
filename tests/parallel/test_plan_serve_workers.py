"""`moekit plan serve --workers` against the real workers: each rank's weight bytes, KV blocks and KV bytes, and the
payload of one step's collectives, byte for byte (moekit/plan/serve_workers.py vs moekit/infer/worker.py)."""

from __future__ import annotations

import pytest
from conftest import char_tokenizer, save_run, tiny_model

from moekit.infer.batch import RunItem
from moekit.infer.engine import Engine
from moekit.infer.executor import WorkerGroup
from moekit.infer.worker import WorkerSpec
from moekit.plan.serve_workers import chunk, step_comm, worker_layout


def test_chunks_follow_torch_chunk():
    import torch

    for n, parts in [(97, 2), (97, 4), (8, 4), (5, 4), (3, 4)]:
        assert [chunk(n, parts, r) for r in range(parts)] == [
            len(c) for c in torch.arange(n).chunk(parts)] + [0] * (parts - len(torch.arange(n).chunk(parts)))


def test_gpt4_served_on_8_x_16_fits_an_a100_40gb():
    from moekit.presets import get_preset

    layout = worker_layout(get_preset("gpt4"), tp=8, pp=16, dtype_bytes=2)
    stages = {w.stage: w for w in layout.ranks}
    assert [stages[p].layers[1] - stages[p].layers[0] for p in (0, 1, 15)] == [7, 8, 7]  # the ends hold fewer
    assert max(w.weight_bytes for w in layout.ranks) < 40e9 * 0.9
    assert sum(w.params for w in layout.ranks) > 1.8e12  # every parameter somewhere (MQA's K/V replicated 8x)


def test_a_bad_ep_names_the_choice():
    from moekit.presets import get_preset

    with pytest.raises(ValueError, match=r"--ep must be 1 or equal --tp \(2\)"):
        worker_layout(get_preset("tiny"), tp=2, ep=4)


@pytest.mark.parametrize(("tp", "pp", "ep"), [(2, 2, 1), (2, 1, 2)])
def test_planned_bytes_equal_the_workers(tmp_path, tp, pp, ep):
    V = 97  # odd: the vocabulary splits 49 + 48, as DTensor's Shard does
    model = tiny_model(0, n_layer=5, n_kv_head=1, moe_every=2, vocab_size=V)  # 5 layers: stages of 2 and 3
    save_run(tmp_path / "run", model, char_tokenizer())
    gb = 0.002
    plan = worker_layout(model.cfg, tp, pp, ep, dtype_bytes=4, kv_cache_gb=gb, block_size=16)
    group = WorkerGroup(WorkerSpec(str(tmp_path / "run"), tp=tp, pp=pp, ep=ep, kv_cache_gb=gb), threads=1,
                        progress=lambda line: None)
    try:
        engine = Engine(None, None, executor=group, kv_cache_gb=gb)
        assert engine.kv.num_blocks == plan.num_blocks
        items = [RunItem(list(range(1, 12)), 0, [0], 1), RunItem([5, 6, 7], 0, [1], 1), RunItem([9] * 20, 0, [2, 3], 2)]
        group.wait(group.submit(items, count=True))
        workers = group.metrics()
    finally:
        group.close()
    comm = step_comm(model.cfg, tp, pp, ep, tokens=34, logit_rows=4, dtype_bytes=4)
    for w, p in zip(workers, plan.ranks, strict=True):
        assert (w["pp_rank"], w["tp_rank"], tuple(w["layers"])) == (p.stage, p.tensor_rank, p.layers)
        assert w["weight_bytes"] == p.weight_bytes and w["n_params_local"] == p.params
        assert w["kv_capacity_blocks"] == p.kv_capacity_blocks and w["kv_blocks"] == plan.num_blocks
        assert w["kv_cache_bytes"] == plan.kv_cache_bytes(w["rank"])
        assert w["last_counted"]["payload"] == comm[p.stage].payload, (w["rank"], w["last_counted"])
        assert w["last_counted"]["calls"] == comm[p.stage].calls
