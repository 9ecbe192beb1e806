"""Sharded serving (issue 12): tp2, pp2, ep2 and tp2 x pp2 workers give one process's tokens.

Each layout starts its workers once (a `WorkerGroup`, 2-4 processes, gloo, fp32, one thread each) and drives them
with several Engines, the way `moekit serve` does: 16 mixed-length concurrent greedy requests; the same with a KV
pool small enough to preempt; n-gram and draft-model speculative decoding; seeded sampling. The reference is one
process's Engine over the same checkpoint. A Hugging Face Mixtral folder and the gpt4-mini preset are served too;
gpt4-mini (1.1 GB in fp32) is where the resident memory of each worker is measured against 1 / (tp x pp).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, random_prompts, save_run, tiny_model

from moekit.infer.engine import Engine
from moekit.infer.executor import WorkerGroup
from moekit.infer.loader import load_model
from moekit.infer.sampler import SamplingParams
from moekit.infer.worker import WorkerSpec

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

V = 97
LENGTHS = [3, 17, 5, 30, 9, 12, 1, 25, 7, 2, 40, 11, 6, 19, 8, 4]  # 16 mixed-length prompts
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def full_tokenizer():
    """One character per id for all 97 ids, so that every generated token is visible text."""
    return char_tokenizer([chr(0x21 + i) for i in range(V - 1)])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """4 layers, MQA (one KV head, replicated on the tensor ranks), an MoE of 4 experts in every layer."""
    folder = tmp_path_factory.mktemp("serve") / "run"
    save_run(folder, tiny_model(0, n_layer=4, n_kv_head=1, moe_every=1, vocab_size=V), full_tokenizer())
    return folder


@pytest.fixture(scope="module")
def reference(run):
    model, codec = load_model(run)
    draft = copy.deepcopy(model)  # a draft that is the target: every draft accepted, the path still exercised
    return model, draft


def outputs(engine: Engine, prompts, params) -> list[list[int]]:
    out = [c.token_ids for c in engine.generate(prompts, params)]
    engine.check_idle()
    return out


def cases(model, draft, make) -> dict[str, tuple[list[list[int]], dict]]:
    """The same requests through engines made by `make(**engine_kwargs)`: {case: (token ids, metrics)}."""
    prompts = random_prompts(LENGTHS, V, seed=1)
    sampled = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=100 + i) for i in range(16)]
    repeat = [p * 3 for p in random_prompts([4] * 16, V, seed=2)]  # n-gram lookup finds its drafts here
    runs = {"greedy": ({}, prompts, GREEDY), "preempt": ({"num_blocks": 12}, prompts, GREEDY),
            "ngram": ({"ngram": True, "num_spec_tokens": 3}, repeat, GREEDY),
            "draft": ({"draft": draft, "num_spec_tokens": 3}, prompts, GREEDY),
            "sampled": ({}, prompts, sampled)}
    out = {}
    for name, (kw, ps, params) in runs.items():
        engine = make(**kw)
        out[name] = (outputs(engine, ps, params), engine.metrics())
    return out


@pytest.fixture(scope="module")
def one_process(reference):
    model, draft = reference
    return cases(model, draft, lambda **kw: Engine(model, None, **kw))


LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (2, 1, 2), "tp2xpp2": (2, 2, 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_outputs_equal_one_process(layout, run, reference, one_process):
    tp, pp, ep = LAYOUTS[layout]
    _, draft = reference
    group = WorkerGroup(WorkerSpec(str(run), tp=tp, pp=pp, ep=ep, kv_cache_gb=0.01), threads=1,
                        progress=lambda line: None)
    try:
        got = cases(None, draft, lambda **kw: Engine(None, None, executor=group, **kw))
        workers = group.metrics()
    finally:
        group.close()
    for name, (ids, _) in got.items():
        assert ids == one_process[name][0], f"{layout} {name}: tokens differ from one process"
    assert got["preempt"][1]["preemptions"] > 0  # the small pool did force recomputation
    assert got["ngram"][1]["spec_accepted"] > 0 and got["draft"][1]["spec_accepted"] > 0
    assert [w["rank"] for w in workers] == list(range(tp * pp))
    stages = {w["pp_rank"]: tuple(w["layers"]) for w in workers}
    assert stages == ({0: (0, 4)} if pp == 1 else {0: (0, 2), 1: (2, 4)})
    for w in workers:
        assert w["steps"] > 0 and w["kv_blocks"] > 0
        if ep > 1:  # each tensor rank holds whole experts: half of them, and counts only those
            assert w["experts"] == [2 * w["tp_rank"], 2 * w["tp_rank"] + 2]
            assert all(len(row) == 2 for row in w["tokens_per_expert"].values())
        if tp > 1:  # the all-reduces of the sampled steps were counted and timed
            assert w["last_counted"]["payload"]["all_reduce"] > 0 and w["collective_seconds"] > 0


def test_hf_mixtral_folder_tp2xpp2(tmp_path):
    from moekit.hf import save_hf

    model = tiny_model(3, n_layer=4, n_kv_head=2, moe_every=1, vocab_size=V)
    save_hf(model, tmp_path / "mixtral")
    assert (tmp_path / "mixtral" / "config.json").read_text().count("mixtral")
    ref_model, _ = load_model(tmp_path / "mixtral")
    prompts = random_prompts(LENGTHS, V, seed=3)
    want = outputs(Engine(ref_model, None), prompts, GREEDY)
    group = WorkerGroup(WorkerSpec(str(tmp_path / "mixtral"), tp=2, pp=2, kv_cache_gb=0.01), threads=1,
                        progress=lambda line: None)
    try:
        got = outputs(Engine(None, None, executor=group), prompts, GREEDY)
    finally:
        group.close()
    assert got == want


def test_gpt4_mini_tp2xpp2_memory_and_tokens(tmp_path):
    """gpt4-mini (282M parameters, 1.1 GB in fp32): each of 4 workers makes resident about a quarter of the weights
    (assert within 20%) while loading, and the 16 requests decode one process's tokens."""
    from moekit.model.transformer import Transformer
    from moekit.presets import get_preset

    torch.manual_seed(0)
    model = Transformer(get_preset("gpt4-mini")).eval()
    save_run(tmp_path / "mini", model, full_tokenizer())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompts = random_prompts(LENGTHS, V, seed=4)
    params = SamplingParams(temperature=0, max_tokens=4)
    want = outputs(Engine(model, None, kv_cache_gb=0.05), prompts, params)
    del model
    group = WorkerGroup(WorkerSpec(str(tmp_path / "mini"), tp=2, pp=2, kv_cache_gb=0.05), threads=1,
                        progress=lambda line: None)
    try:
        got = outputs(Engine(None, None, executor=group), prompts, params)
        workers = group.metrics()
    finally:
        group.close()
    assert got == want
    for w in workers:
        share = full_bytes / 4
        assert abs(w["weight_bytes"] - share) < 0.2 * share, (w["rank"], w["weight_bytes"], share)
        assert abs(w["anon_bytes_loaded"] - share) < 0.2 * share, (w["rank"], w["anon_bytes_loaded"], share)
