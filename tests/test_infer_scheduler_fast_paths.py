"""The scheduler's and the KV manager's fast paths (what lets `moekit sim` run a GPT-4 fleet hour) against the slow,
obviously-correct paths they stand for, on random pipelined workloads with chunked prefill, shared prefixes, drafts,
stop tokens and preemptions:

- `schedule(idle=)` (a simulator's set of running requests not in flight) against `schedule(skip=)` (the engine's);
- the decode fast path of `schedule` (no allocate_slots call inside the request's blocks, KVCacheManager.horizon)
  against the general path, which a KV manager without a horizon always takes;
- the one-token fast path of `update` against the per-token loop it replaces (`reference_update` below);
- the horizon itself: allocate_slots up to it changes nothing; and the replica's idle set is always exactly the
  running requests less those in flight.
"""

import copy
import random

import pytest

from moekit.infer.kv_cache import KVCacheManager
from moekit.infer.request import Request, Status
from moekit.infer.sampler import SamplingParams
from moekit.infer.scheduler import RequestUpdate, Scheduler, SchedulerConfig

P = 4  # tokens per block
EOS = 2


class NoHorizon(dict):
    """A KV manager's horizon that never holds anything: the scheduler's decode fast path never fires."""

    def __setitem__(self, key, value):
        pass


def reference_update(sched: Scheduler, out, sampled) -> list[RequestUpdate]:
    """Scheduler.update as one loop over every committed token, without its fast path."""
    updates = []
    for s in out.scheduled:
        req, spec = s.request, s.spec_token_ids
        req.num_computed_tokens += s.num_tokens
        if not s.reaches_end:
            continue
        new = sampled[req.request_id]
        n_acc = len(new) - 1 if spec else 0
        req.num_computed_tokens -= len(spec) - n_acc
        req.spec_token_ids = []
        committed, reason = [], None
        for tok in new:
            committed.append(tok)
            reason = req.append_token(tok, sched.config.max_model_len)
            if reason:
                break
        if reason:
            sched.finish(req, reason)
        elif spec:
            sched.kv.trim(req, req.num_computed_tokens)
        updates.append(RequestUpdate(req, committed, len(spec), n_acc, reason))
    return updates


def kv_state(kv: KVCacheManager):
    return ({rid: [b.block_id for b in t] for rid, t in kv.tables.items()}, dict(kv.num_cached),
            list(kv.pool.free), sorted(kv.pool.cached), [b.ref_cnt for b in kv.pool.blocks])


def new_requests(rng: random.Random, n: int, start: int) -> list[tuple]:
    """(id, prompt, max_tokens, stop token or None) of n new requests: some share a system prompt of 2 blocks."""
    out = []
    for i in range(start, start + n):
        head = [50 + rng.randrange(2)] * (2 * P) if rng.random() < 0.4 else []
        prompt = head + [rng.randrange(100, 200) for _ in range(rng.randint(1, 14))]
        out.append((f"q{i}", prompt, rng.randint(1, 24), rng.choice([None, None, 7])))
    return out


def make(num_blocks: int, caching: bool, fast: bool) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size=P, enable_caching=caching)
    if not fast:
        kv.horizon = NoHorizon()
    return Scheduler(SchedulerConfig(max_num_batched_tokens=12, max_num_seqs=6, max_model_len=48), kv)


def check_horizon(kv: KVCacheManager, running) -> None:
    """Up to its horizon, allocate_slots finds nothing to do: the same state before and after, on a copy."""
    for req in running:
        h = kv.horizon.get(req.request_id, 0)
        n = h - req.num_computed_tokens
        if n < 1:
            continue
        probe = copy.deepcopy(kv)
        before = kv_state(probe)
        assert probe.allocate_slots(req, n)
        assert kv_state(probe) == before, (req.request_id, h)


@pytest.mark.parametrize("seed,stages,caching", [(0, 4, True), (1, 3, False), (2, 1, True), (3, 5, True)])
def test_fast_paths_make_the_decisions_of_the_slow_ones(seed, stages, caching):
    rng = random.Random(seed)
    fast, slow = make(20, caching, True), make(20, caching, False)
    reqs: dict[str, tuple[Request, Request]] = {}
    idle: dict[Request, None] = {}  # fast's running requests not in flight
    in_flight = []  # (fast's output, slow's output)
    n_req, preempted, drafted, hits = 0, 0, 0, 0
    for step in range(3000):
        if step >= 300 and not (fast.running or fast.waiting or in_flight):
            break
        if step < 300 and rng.random() < 0.35:  # arrivals
            for rid, prompt, mt, stop in new_requests(rng, rng.randint(1, 3), n_req):
                pair = tuple(Request(rid, prompt, SamplingParams(max_tokens=mt, stop_token_ids=[stop] if stop else []),
                                     n_req, eos_token_ids=(EOS,)) for _ in range(2))
                reqs[rid] = pair
                fast.add(pair[0])
                slow.add(pair[1])
                n_req += 1
        while len(in_flight) < stages:  # fill the pipeline: the engine's loop (moekit/infer/engine.py step)
            for a, b in reqs.values():  # a drafter proposes for some decoding requests not in flight
                if a.status is Status.RUNNING and a in idle and a.num_computed_tokens == a.num_tokens - 1 \
                        and rng.random() < 0.3:
                    a.spec_token_ids = b.spec_token_ids = [rng.randrange(3, 9) for _ in range(rng.randint(1, 3))]
                    drafted += 1
            limit = fast.micro_batch_share(stages)
            assert limit == slow.micro_batch_share(stages)
            busy = {s.request.request_id for _, o in in_flight for s in o.scheduled}
            assert set(idle) == {r for r in fast.running if r.request_id not in busy}
            out_a = fast.schedule(max_seqs=limit, idle=idle)
            out_b = slow.schedule(skip=busy, max_seqs=limit) if busy or limit else slow.schedule()
            assert ([(s.request.request_id, s.num_tokens, s.spec_token_ids, s.reaches_end) for s in out_a.scheduled]
                    == [(s.request.request_id, s.num_tokens, s.spec_token_ids, s.reaches_end)
                        for s in out_b.scheduled]), step
            assert [r.request_id for r in out_a.preempted] == [r.request_id for r in out_b.preempted]
            assert kv_state(fast.kv) == kv_state(slow.kv)
            preempted += len(out_a.preempted)
            for r in out_a.preempted:
                del idle[r]
            for s in out_a.scheduled:
                idle.pop(s.request, None)
            if not out_a.scheduled:
                break
            in_flight.append((out_a, out_b))
        if not in_flight:
            continue
        out_a, out_b = in_flight.pop(0)
        sampled = {}  # the same draws for both: accepted drafts then a correction, or one token (sometimes EOS)
        for s in out_a.scheduled:
            if s.reaches_end:
                k = rng.randint(0, len(s.spec_token_ids))
                sampled[s.request.request_id] = s.spec_token_ids[:k] + [rng.choice([EOS, 7, 9, 11, 13, 15])]
        for s in out_a.scheduled:
            idle[s.request] = None
        ups_a = fast.update(out_a, sampled)
        ups_b = reference_update(slow, out_b, sampled)
        assert ([(u.request.request_id, u.new_token_ids, u.num_draft_tokens, u.num_accepted, u.finish_reason)
                 for u in ups_a] == [(u.request.request_id, u.new_token_ids, u.num_draft_tokens, u.num_accepted,
                                      u.finish_reason) for u in ups_b]), step
        for u in ups_a:
            if u.finish_reason:
                del idle[u.request]
        for a, b in reqs.values():
            assert (a.all_token_ids, a.num_computed_tokens, a.status) == (b.all_token_ids, b.num_computed_tokens,
                                                                            b.status)
        assert kv_state(fast.kv) == kv_state(slow.kv)
        assert [r.request_id for r in fast.running] == [r.request_id for r in slow.running]
        hits = fast.kv.hits
        if step % 10 == 0:
            check_horizon(fast.kv, fast.running)
    assert all(a.finished for a, _ in reqs.values()) and not in_flight
    fast.kv.check_whole()
    slow.kv.check_whole()
    assert not fast.kv.horizon
    # The workload reached the paths it is meant to compare.
    assert n_req > 50 and preempted > 0 and drafted > 0
    if caching:
        assert hits > 0


def test_finish_finds_a_request_among_equal_arrivals():
    kv = KVCacheManager(16, block_size=P, enable_caching=False)
    sched = Scheduler(SchedulerConfig(64, max_num_seqs=8, max_model_len=64), kv)
    reqs = [Request(n, [10, 11, 12], SamplingParams(max_tokens=9), arrival=0) for n in "abc"]  # arrived together
    for r in reqs:
        sched.add(r)
    sched.schedule()
    assert sched.running == reqs
    sched.finish(reqs[1], "abort")
    assert sched.running == [reqs[0], reqs[2]] and reqs[1].finished


def test_the_replicas_idle_set_is_the_running_requests_not_in_flight():
    from moekit.sim import simulator, steptime, workload

    model = steptime.HardwareModel("gpt4", "A100-80GB", tp=8, pp=8, seed=0)
    calls = []

    def checked(rep):
        schedule = rep.scheduler.schedule

        def wrapper(skip=(), max_seqs=None, idle=None):
            busy = {s.request.request_id for out, _ in rep.in_flight for s in out.scheduled}
            assert set(idle) == {r for r in rep.scheduler.running if r.request_id not in busy}
            calls.append(len(busy))
            return schedule(skip, max_seqs, idle)

        rep.scheduler.schedule = wrapper
        return rep

    reqs = workload.synthetic(rate=40, duration=6, prompt="lognormal:300:1.0", output="lognormal:60:1.0",
                              shared_prefix_len=32, num_prefixes=3, seed=4)
    original = simulator.Replica
    simulator.Replica = lambda *a, **k: checked(original(*a, **k))
    try:
        run = simulator.simulate(reqs, lambda i: model, simulator.Deployment(replicas=2, num_blocks=600,
                                                                            max_num_batched_tokens=512))
    finally:
        simulator.Replica = original
    assert len(run.results) == len(reqs) and max(calls) > 0
    assert sum(r.scheduler.num_preemptions for r in run.replicas) > 0
