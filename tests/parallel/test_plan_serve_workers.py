"""`moekit plan serve --workers` against the real workers: each rank's weight bytes, KV blocks and KV bytes, and the
payload of every collective in a step, byte for byte (moekit/plan/serve_workers.py vs moekit/infer/worker.py).

Three launches of spawned workers (~6 s each on 2 cores), each layout chosen to cover what the others do not:
an uneven pipeline of MQA + MoE layers (the issue's case), expert parallelism beside a dense layer with split GQA
heads, and a biased, tied-embedding model (the last stage's own lm_head copy; DTensor's all-gathers under biases).
"""

from __future__ import annotations

import json

import pytest
from conftest import char_tokenizer, save_run, tiny_model

from moekit.plan.serve_workers import chunk, prompt_comm, step_comm, worker_layout


# ---- the formulas, without workers ----------------------------------------------------------------------
def test_chunks_follow_torch_chunk():
    import torch

    for n, parts in [(97, 2), (97, 4), (8, 4), (5, 4), (3, 4)]:
        got = [len(c) for c in torch.arange(n).chunk(parts)]
        assert [chunk(n, parts, r) for r in range(parts)] == got + [0] * (parts - len(got))


def test_gpt4_served_on_8_x_16_fits_an_a100_40gb():
    from moekit.presets import get_preset

    layout = worker_layout(get_preset("gpt4"), tp=8, pp=16, dtype_bytes=2)
    stages = {w.stage: w for w in layout.ranks}
    assert [stages[p].layers[1] - stages[p].layers[0] for p in (0, 1, 15)] == [7, 8, 7]  # the ends hold fewer
    assert max(w.weight_bytes for w in layout.ranks) < 40e9 * 0.9
    assert sum(w.params for w in layout.ranks) > 1.8e12  # every parameter somewhere (MQA's K/V replicated 8x)


def test_step_comm_by_hand():
    cfg = tiny_model(0, n_layer=5, n_kv_head=1, moe_every=1).cfg  # D 32, V 97
    first, last = step_comm(cfg, 2, 2, tokens=16, logit_rows=3, dtype_bytes=2)  # stages of 2 and 3 layers
    act = 16 * 32 * 2
    assert first.payload == {"all_reduce": (2 * 2 + 1) * act, "p2p": act}
    assert last.payload == {"all_reduce": 2 * 3 * act, "all_gather": 3 * 98 * 2, "p2p": act}  # 97 padded to 2 x 49
    assert last.calls == {"all_reduce": 6, "all_gather": 1, "p2p": 1}
    assert [c.payload for c in step_comm(cfg, 1, 1, tokens=16, logit_rows=3)] == [{}]  # one process: nothing
    mid = step_comm(cfg, 1, 3, tokens=16, logit_rows=3)[1]
    assert mid.payload == {"p2p": 2 * 16 * 32 * 4} and mid.calls == {"p2p": 2}  # received and sent on


def test_a_prompt_is_its_chunks():
    cfg = tiny_model(0, n_layer=3).cfg
    whole = prompt_comm(cfg, 2, 1, prompt_len=5000, chunk=2048)[0]
    one = step_comm(cfg, 2, 1, tokens=5000, logit_rows=1)[0]
    assert whole.payload == one.payload  # linear in tokens, and one logit row in all (the last chunk's)
    assert whole.calls == {k: 3 * v for k, v in one.calls.items()}  # 2048 + 2048 + 904: three steps


def test_bad_degrees_name_the_choice():
    from moekit.presets import get_preset

    with pytest.raises(ValueError, match=r"--ep must be 1 or equal --tp \(2\)"):
        worker_layout(get_preset("tiny"), tp=2, ep=4)
    with pytest.raises(ValueError, match="split the 8 KV heads, so --tp must divide them: choose --tp from 1, 2, 4, 8"):
        worker_layout(get_preset("mixtral-8x7b"), tp=16)


def test_cli_prints_and_dumps_the_workers(capsys):
    from moekit.cli import main

    argv = ["plan", "serve", "--model", "tiny", "--gpu", "H100", "--tp", "2", "--pp", "2", "--weight-dtype", "fp32",
            "--batch", "8", "--prompt-len", "100", "--workers"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "moekit workers: tiny, tp 2 x pp 2 = 4 processes" in out and "prefill of 100:" in out
    assert main([*argv, "--json"]) == 0
    w = json.loads(capsys.readouterr().out)["workers"]
    assert len(w["ranks"]) == 4 and w["decode_step"]["tokens"] == 8 and w["prefill"]["prompt_len"] == 100
    assert main([*argv[:-1], "--weight-dtype", "fp8", "--workers"]) == 2
    assert "--weight-dtype fp32, bf16 or fp16, not fp8" in capsys.readouterr().err


# ---- against real workers ---------------------------------------------------------------------------------
CASES = {  # name: (tp, pp, ep, tiny_model overrides); V = 97 everywhere: the vocabulary splits 49 + 48
    "mqa_moe_pp": (2, 2, 1, dict(n_layer=5, n_kv_head=1, moe_every=1)),  # 5 layers: stages of 2 and 3
    "ep_gqa_dense": (2, 1, 2, dict(n_layer=2, n_kv_head=2, moe_every=2)),  # a dense layer, then an MoE one
    "bias_tied_pp": (2, 2, 1, dict(n_layer=3, n_expert=1, top_k=1, norm="layernorm", bias=True, tie_embeddings=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_planned_bytes_equal_the_workers(tmp_path, case):
    from moekit.infer.batch import RunItem
    from moekit.infer.engine import Engine
    from moekit.infer.executor import WorkerGroup
    from moekit.infer.worker import WorkerSpec

    tp, pp, ep, overrides = CASES[case]
    model = tiny_model(0, **overrides)
    save_run(tmp_path / "run", model, char_tokenizer())
    gb = 0.002  # a few hundred blocks: below the engine's cap of max_num_seqs full-length requests
    plan = worker_layout(model.cfg, tp, pp, ep, dtype_bytes=4, kv_cache_gb=gb, block_size=16)
    steps = [  # a decode of 16 sequences; a mixed step (prefills and a 2-token draft check); a partial prefill chunk
        [RunItem([3], 5, [i], 1) for i in range(16)],
        [RunItem(list(range(1, 12)), 0, [0], 1), RunItem([5, 6, 7], 0, [1], 1), RunItem([9] * 20, 0, [2, 3], 2)],
        [RunItem(list(range(1, 30)), 0, [4, 5], 0)],
    ]
    measured = []
    group = WorkerGroup(WorkerSpec(str(tmp_path / "run"), tp=tp, pp=pp, ep=ep, kv_cache_gb=gb), threads=1,
                        progress=lambda line: None)
    try:
        engine = Engine(None, None, executor=group, kv_cache_gb=gb)
        assert engine.kv.num_blocks == plan.num_blocks
        for items in steps:
            group.wait(group.submit(items, count=True))
            measured.append(group.metrics())
    finally:
        group.close()
    for items, workers in zip(steps, measured, strict=True):
        tokens, rows = sum(len(it.token_ids) for it in items), sum(it.num_logits for it in items)
        comm = step_comm(model.cfg, tp, pp, ep, tokens=tokens, logit_rows=rows, dtype_bytes=4)
        for w, p in zip(workers, plan.ranks, strict=True):
            assert (w["pp_rank"], w["tp_rank"], tuple(w["layers"])) == (p.stage, p.tensor_rank, p.layers)
            assert w["weight_bytes"] == p.weight_bytes and w["n_params_local"] == p.params
            assert w["kv_capacity_blocks"] == p.kv_capacity_blocks and w["kv_blocks"] == plan.num_blocks
            assert w["kv_cache_bytes"] == plan.kv_cache_bytes(w["rank"])
            counted = w["last_counted"]
            assert (counted["tokens"], counted["logit_rows"]) == (tokens, rows)
            assert counted["payload"] == comm[p.stage].payload, (case, w["rank"], counted)
            assert counted["calls"] == comm[p.stage].calls, (case, w["rank"], counted)
