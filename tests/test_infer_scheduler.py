"""Scheduler.update without a model: the post-step transitions (advance, roll back rejected drafts, commit
with token-level stops, finish) driven by hand-written "sampled" tokens, as a cluster simulator drives
them (vLLM v1 `update_from_output`, nano-vllm `postprocess`). No tensors anywhere: exact block counts.
"""

from collections import deque

import pytest

import moekit.infer.request
from moekit.infer.kv_cache import KVCacheManager
from moekit.infer.request import Request, Status
from moekit.infer.sampler import SamplingParams
from moekit.infer.scheduler import Scheduler, SchedulerConfig

P = 4  # tokens per block


def setup(num_blocks=8, budget=64, max_model_len=64):
    kv = KVCacheManager(num_blocks, block_size=P, enable_caching=False)
    return kv, Scheduler(SchedulerConfig(budget, max_num_seqs=8, max_model_len=max_model_len), kv)


def request(name, n_prompt, arrival=0, **params):
    return Request(name, list(range(10, 10 + n_prompt)), SamplingParams(**params), arrival, eos_token_ids=(2,))


def step(sched, emit):
    """One schedule -> update, with `emit(scheduled)` standing in for the model and the sampler."""
    out = sched.schedule()
    sampled = {s.request.request_id: emit(s) for s in out.scheduled if s.reaches_end}
    return out, sched.update(out, sampled)


@pytest.mark.parametrize("limit", ["max_tokens", "max_model_len"])
def test_plain_request_decodes_to_its_limit_finishes_with_length_and_frees_its_blocks(limit):
    kv, sched = setup(max_model_len=8 if limit == "max_model_len" else 64)
    req = request("a", 5, max_tokens=3 if limit == "max_tokens" else 100)
    sched.add(req)
    out, ups = step(sched, lambda s: [7])  # prefill: 5 tokens in 2 blocks, then the first token
    assert out.scheduled[0].num_tokens == 5 and len(ups) == 1 and ups[0].new_token_ids == [7]
    assert (req.num_computed_tokens, req.num_tokens, len(kv.block_ids("a"))) == (5, 6, 2)
    assert ups[0].finish_reason is None and ups[0].num_draft_tokens == 0 and req.status is Status.RUNNING
    _, ups = step(sched, lambda s: [8])
    assert (req.num_computed_tokens, req.num_tokens, ups[0].finish_reason) == (6, 7, None)
    _, ups = step(sched, lambda s: [9])  # the 3rd output token / the 8th token of the context
    assert ups[0].finish_reason == "length" and ups[0].new_token_ids == [9]
    assert req.finished and req.finish_reason == "length" and req.output_token_ids == [7, 8, 9]
    assert req.num_computed_tokens == 7 and sched.running == [] and kv.num_free_blocks == kv.num_blocks
    kv.check_whole()
    assert sched.schedule().scheduled == []


@pytest.mark.parametrize("stop", ["eos", "stop_token_ids"])
def test_stop_token_finishes_with_stop_and_the_tokens_after_it_are_not_committed(stop):
    kv, sched = setup()
    req = request("a", 6, max_tokens=50, **({"stop_token_ids": [3]} if stop == "stop_token_ids" else {}))
    end = 2 if stop == "eos" else 3
    sched.add(req)
    step(sched, lambda s: [7])
    req.spec_token_ids = [5, end, 6]  # a proposer's drafts; the target accepts all three, then a bonus token
    out, ups = step(sched, lambda s: [5, end, 6, 8])
    assert out.scheduled[0].spec_token_ids == [5, end, 6] and len(kv.block_ids("a")) == 0  # freed
    u = ups[0]
    assert u.new_token_ids == [5, end] and u.finish_reason == "stop" and req.finish_reason == "stop"
    assert (u.num_draft_tokens, u.num_accepted, u.num_rejected) == (3, 3, 0)
    assert req.output_token_ids == [7, 5, end] and req.spec_token_ids == [] and req.finished
    kv.check_whole()


def test_eos_is_an_ordinary_token_with_ignore_eos():
    kv, sched = setup()
    req = request("a", 3, max_tokens=2, ignore_eos=True)
    sched.add(req)
    _, ups = step(sched, lambda s: [2])
    assert ups[0].finish_reason is None and req.output_token_ids == [2]
    _, ups = step(sched, lambda s: [2])
    assert ups[0].finish_reason == "length"
    kv.check_whole()


def test_one_of_three_drafts_accepted_rolls_back_two_tokens_and_trims_a_block():
    kv, sched = setup(num_blocks=8)
    req = request("a", 6, max_tokens=50)
    sched.add(req)
    step(sched, lambda s: [7])  # 6 prompt tokens computed (2 blocks), 7 tokens
    assert (req.num_computed_tokens, req.num_tokens, len(kv.block_ids("a"))) == (6, 7, 2)
    req.spec_token_ids = [20, 21, 22]
    out, ups = step(sched, lambda s: [20, 30])  # draft 20 accepted, 21 rejected: 30 is the correction
    # Scheduled: the last committed token + 3 drafts = positions 6..9, in 3 blocks while the step ran.
    assert out.scheduled[0].num_tokens == 4 and out.scheduled[0].spec_token_ids == [20, 21, 22]
    u = ups[0]
    assert (u.num_draft_tokens, u.num_accepted, u.num_rejected) == (3, 1, 2) and u.new_token_ids == [20, 30]
    assert req.num_computed_tokens == 6 + 4 - 2 == req.num_tokens - 1  # K/V of 21 and 22 is discarded
    assert req.output_token_ids == [7, 20, 30] and req.spec_token_ids == [] and u.finish_reason is None
    assert len(kv.block_ids("a")) == 2 and kv.num_free_blocks == 6  # 8 computed tokens: the 3rd block went back
    _, ups = step(sched, lambda s: [31])  # decoding goes on from the correction token
    assert (req.num_computed_tokens, len(kv.block_ids("a"))) == (9, 3) and ups[0].new_token_ids == [31]
    sched.finish(req, "abort")
    kv.check_whole()


def test_a_partial_prefill_chunk_advances_and_commits_nothing():
    kv, sched = setup(budget=5)
    a, b = request("a", 2, arrival=0, max_tokens=50), request("b", 10, arrival=1, max_tokens=50)
    sched.add(a)
    step(sched, lambda s: [7])
    sched.add(b)
    out, ups = step(sched, lambda s: [8])  # a decodes 1 token; b gets the other 4 of the budget
    assert [(s.request.request_id, s.num_tokens, s.reaches_end) for s in out.scheduled] == [
        ("a", 1, True), ("b", 4, False)]
    assert [u.request for u in ups] == [a]  # b is not sampled: no update, no token
    assert (b.num_computed_tokens, b.num_tokens, b.output_token_ids) == (4, 10, [])
    step(sched, lambda s: [9])
    assert (b.num_computed_tokens, b.num_tokens) == (8, 10)
    out, ups = step(sched, lambda s: [40] if s.request is b else [10])  # b's last 2 prompt tokens, then 40
    assert [u.request for u in ups] == [a, b] and b.output_token_ids == [40] and b.num_computed_tokens == 10
    for r in (a, b):
        sched.finish(r, "abort")
    kv.check_whole()


def test_scheduler_kv_manager_and_requests_hold_no_tensors():
    torch = pytest.importorskip("torch")
    assert "torch" not in vars(moekit.infer.request)  # request.py imports no torch at all

    def tensors(obj, path, seen):  # every torch object reachable from obj's attributes and containers
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None), type)):
            return []
        seen.add(id(obj))
        if isinstance(obj, (torch.Tensor, torch.Generator)):
            return [path]
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple, set, deque)):
            items = enumerate(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("moekit"):
            items = vars(obj).items()
        else:
            return []
        return [p for k, v in items for p in tensors(v, f"{path}.{k}", seen)]

    assert tensors({"x": [torch.zeros(1), torch.Generator()]}, "probe", set()) == ["probe.x.0", "probe.x.1"]
    kv, sched = setup(num_blocks=6, budget=6)
    reqs = [request(x, 5 + i, arrival=i, max_tokens=4, temperature=0.7, seed=i) for i, x in enumerate("abc")]
    for r in reqs:
        sched.add(r)
    for i in range(6):  # chunked prefill, decoding, drafts (one of two accepted) every other step, finishing
        for r in sched.running:
            if r.num_computed_tokens == r.num_tokens - 1 and i % 2:
                r.spec_token_ids = [1, 1]
        step(sched, lambda s: [1] * (len(s.spec_token_ids) // 2 + 1))
    assert [r.status for r in reqs] == [Status.FINISHED, Status.FINISHED, Status.RUNNING]
    for name, obj in [("scheduler", sched), ("kv", kv)] + [(r.request_id, r) for r in reqs]:
        assert tensors(obj, name, set()) == []


def test_pipelined_schedule_passes_over_requests_in_flight_and_never_preempts_them():
    """A pipelined engine (sharded workers, pp stages) schedules micro-batch k+1 while k is in flight: the requests
    in k are skipped, each micro-batch takes its share, and when blocks run out the victim is the newest request
    *not* in flight (its blocks are being written)."""
    kv, sched = setup(num_blocks=6)
    reqs = [request(n, 4, arrival=i, max_tokens=50) for i, n in enumerate("abcd")]
    for r in reqs:
        sched.add(r)
    first = sched.schedule(max_seqs=2)  # micro-batch 1: the two oldest, one block each
    assert [s.request.request_id for s in first.scheduled] == ["a", "b"]
    busy = {"a", "b"}
    second = sched.schedule(skip=busy, max_seqs=2)
    assert [s.request.request_id for s in second.scheduled] == ["c", "d"]
    sched.update(first, {"a": [7], "b": [7]})  # micro-batch 1 done: a and b need a second block each
    third = sched.schedule(skip={"c", "d"}, max_seqs=2)
    assert [s.request.request_id for s in third.scheduled] == ["a", "b"]  # 4 + 2 = 6 blocks: all fit
    sched.update(second, {"c": [7], "d": [7]})
    # c and d need a block each, none is free; a and b (newer in the list's eyes: never) are in flight, so the
    # newest not in flight goes: d, whose block lets c run.
    fourth = sched.schedule(skip={"a", "b"}, max_seqs=2)
    assert [r.request_id for r in fourth.preempted] == ["d"]
    assert [s.request.request_id for s in fourth.scheduled] == ["c"]
    assert {r.request_id for r in sched.running} == {"a", "b", "c"}
    assert all(r.status is Status.RUNNING for r in reqs[:2])


def test_the_victim_is_the_newest_request_not_in_flight():
    kv, sched = setup(num_blocks=3)
    reqs = [request(n, 4, arrival=i, max_tokens=50) for i, n in enumerate("abc")]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    sched.update(out, {"a": [7], "b": [7], "c": [7]})  # all 3 blocks held; each needs a second one now
    nxt = sched.schedule(skip={"c"}, max_seqs=1)  # c (the newest) is in flight: b is preempted, not c
    assert [r.request_id for r in nxt.preempted] == ["b"]
    assert [s.request.request_id for s in nxt.scheduled] == ["a"]
    assert reqs[2].status is Status.RUNNING and reqs[1].status is Status.PREEMPTED


def fill_pipeline(sched, stages):
    """Schedule micro-batches as a pipelined engine does from idle: each passes over the ones in flight."""
    batches, busy = [], set()
    while len(batches) < stages:
        out = sched.schedule(skip=busy, max_seqs=sched.micro_batch_share(stages))
        if not out.scheduled:
            break
        batches.append([s.request.request_id for s in out.scheduled])
        busy |= set(batches[-1])
    return batches


def test_under_a_long_queue_every_pipeline_stage_gets_a_micro_batch():
    """The share counts the requests that can run (max_num_seqs of them), not the whole queue: with 8 running
    slots, 4 stages and 40 requests waiting, four micro-batches of 2, not one of 8 and three stages idle."""
    kv = KVCacheManager(64, block_size=P, enable_caching=False)
    sched = Scheduler(SchedulerConfig(64, max_num_seqs=8, max_model_len=64), kv)
    for i in range(40):
        sched.add(request(f"r{i}", 3, arrival=i, max_tokens=50))
    assert sched.micro_batch_share(4) == 2 and sched.micro_batch_share(1) is None
    assert fill_pipeline(sched, 4) == [["r0", "r1"], ["r2", "r3"], ["r4", "r5"], ["r6", "r7"]]


def test_when_the_kv_pool_holds_the_queue_back_the_running_requests_are_split_evenly():
    """6 blocks of 4 tokens: six 3-token prompts run, the rest wait for blocks; the share is then the running
    requests over the stages (2 each over 3 stages), not max_num_seqs over them (which would leave a stage idle)."""
    kv = KVCacheManager(6, block_size=P, enable_caching=False)
    sched = Scheduler(SchedulerConfig(64, max_num_seqs=12, max_model_len=64), kv)
    for i in range(20):
        sched.add(request(f"r{i}", 3, arrival=i, max_tokens=50))
    first = sched.schedule()  # admits six, then the pool is empty
    assert len(first.scheduled) == 6 and sched.kv_bound
    sched.update(first, {s.request.request_id: [7] for s in first.scheduled})
    assert sched.micro_batch_share(3) == 2
    assert fill_pipeline(sched, 3) == [["r0", "r1"], ["r2", "r3"], ["r4", "r5"]]
