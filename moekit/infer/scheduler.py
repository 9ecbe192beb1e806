"""The scheduler: which tokens of which requests the next forward pass computes (vLLM v1 style).

There is no prefill phase and no decode phase (vllm/v1/core/sched/scheduler.py): every request
has `num_computed_tokens` and `num_tokens`, and a step schedules, for each request, some of the
tokens between the two, under a token budget (`max_num_batched_tokens`):

1. Running requests first, oldest first: a decoding request needs 1 token (plus its draft tokens
   when speculating), a request part-way through its prompt needs the next chunk (chunked prefill:
   a long prompt never stalls the decoding requests). If the KV pool has no block for it, the
   *newest* running request is preempted: its blocks are freed and it goes back to the front of
   the waiting queue, to be recomputed later (vLLM's recompute preemption; its tokens are kept, so
   nothing is lost, and the prefix cache often still holds its blocks).
2. Then, if nothing was preempted, waiting requests in arrival order while budget, blocks and
   `max_num_seqs` last; a prompt whose leading blocks are in the prefix cache starts from there.

First come, first served, with no starvation: the waiting queue is never overtaken (a request
that does not fit blocks the ones behind it), running requests are served oldest first, and only
the newest is ever preempted, so the oldest request always makes progress.

A step is `schedule()` -> (the engine runs the model and samples) -> `update(scheduled, sampled)`,
which advances every scheduled request, rolls back rejected draft tokens, commits the sampled tokens
with their token-level stop checks and finishes the requests that stopped (vLLM v1
`Scheduler.update_from_output`, nano-vllm `Scheduler.postprocess`). Stop strings need the text and
stay with the engine. Nothing here holds a tensor, so a simulator can drive the scheduler and its
KVCacheManager on a clock, without a model:

    out = scheduler.schedule()
    sampled = {s.request.request_id: [42] for s in out.scheduled if s.reaches_end}  # a simulator's tokens
    updates = scheduler.update(out, sampled)
"""

from __future__ import annotations

import bisect
import math
import operator
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from moekit.infer.kv_cache import KVCacheManager
from moekit.infer.request import Request, Status


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # tokens per forward pass (decode tokens + prefill chunks)
    max_num_seqs: int = 256  # requests running at once
    max_model_len: int = 2048  # prompt + output tokens of one request

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class Scheduled:
    request: Request
    num_tokens: int  # tokens computed this step, draft tokens included
    spec_token_ids: list[int]  # the draft tokens among them (the last len() scheduled tokens)
    # Does this chunk end at the last committed token (so: sample)? Fixed when scheduled, before the step
    # advances num_computed_tokens.
    reaches_end: bool = False

    @staticmethod
    def of(req: Request, num_tokens: int, spec_token_ids: list[int]) -> Scheduled:
        end = req.num_computed_tokens + num_tokens - len(spec_token_ids) >= len(req.all_token_ids)
        return Scheduled(req, num_tokens, spec_token_ids, end)


@dataclass(slots=True)
class RequestUpdate:
    """What one step committed to one request that produced tokens (vLLM v1 `EngineCoreOutput`)."""

    request: Request
    new_token_ids: list[int]  # committed: cut after the first token that finishes the request
    num_draft_tokens: int = 0  # draft tokens the target checked this step
    num_accepted: int = 0  # of which accepted
    finish_reason: str | None = None  # set when a token-level stop fired: "stop" | "length"

    @property
    def num_rejected(self) -> int:
        return self.num_draft_tokens - self.num_accepted


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


_arrival = operator.attrgetter("arrival")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config, self.kv = config, kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order: the last one is the newest
        self.num_preemptions = 0
        # The KV pool holds the queue back: the last admission that was tried (or a step that preempted) found no
        # blocks, and nothing has been admitted since.
        self.kv_bound = False

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def _remove_running(self, req: Request) -> None:
        # `running` is in arrival order: find req by bisection rather than list.remove's scan (a simulated GPT-4
        # replica runs thousands of requests and finishes one every few steps).
        i = bisect.bisect_left(self.running, req.arrival, key=_arrival)
        while self.running[i] is not req:  # requests that arrived at the same instant: in admission order
            i += 1
        del self.running[i]

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = Status.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)  # several preempted in one step: the oldest ends up in front

    def schedule(self, skip: Collection[str] = (), max_seqs: int | None = None,
                 idle: Collection[Request] | None = None) -> SchedulerOutput:
        """The next step's tokens. A pipelined engine passes `skip`, the requests whose previous step is still in
        flight (not scheduled again, never preempted: their blocks are being written), and `max_seqs`, the requests
        one micro-batch takes (its share, so that each of the pipeline's micro-batches has work).

        `idle` says the same as `skip` the other way round: the running requests *not* in flight, in any order
        (exactly `running` less `skip`; sorted by arrival here, so arrivals must be distinct, as the engine's and
        the simulator's are). A caller that keeps that set as it goes (moekit/sim/replica.py) makes a step cost
        O(idle) instead of a pass over every running request, ~(P-1)/P of which a pipeline of P stages has in
        flight (tests/test_infer_scheduler_fast_paths.py holds the two ways to the same decisions)."""
        out = SchedulerOutput()
        scheduled = out.scheduled
        budget = self.config.max_num_batched_tokens
        room = max_seqs if max_seqs is not None else len(self.running) + self.config.max_num_seqs
        # The running requests this step may schedule or preempt, oldest first: those not in flight. (Filtered
        # once, not passed over one by one: a pipeline of P stages has ~(P-1)/P of them in flight at any time.)
        if idle is not None:
            cands = sorted(idle, key=_arrival)  # the order of `running`, which is by arrival
        else:
            cands = [r for r in self.running if r.request_id not in skip] if skip else self.running[:]
        horizon = self.kv.horizon
        i = 0
        while i < len(cands) and budget > 0 and room > 0:
            req = cands[i]
            c = req.num_computed_tokens
            # Fast path, the steady state: a decode step (one token, no drafts) that the request's blocks already
            # hold, so that allocate_slots would do nothing (KVCacheManager.horizon). What the general path below
            # does for it, without the calls.
            if c + 1 == len(req.all_token_ids) and c < horizon.get(req.request_id, 0) and not req.spec_token_ids:
                scheduled.append(Scheduled(req, 1, [], True))
                budget -= 1
                room -= 1
                i += 1
                continue
            n_spec, n_tok = len(req.spec_token_ids), len(req.all_token_ids)
            n = min(n_tok + n_spec - c, budget)
            while not self.kv.allocate_slots(req, n):
                # The newest not in flight and not yet scheduled in this step (cands[i:]), or req itself.
                victim = cands.pop()
                self._remove_running(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is Status.PREEMPTED:
                break  # it was the newest; everything older is scheduled
            spec = req.spec_token_ids[:max(0, n - (n_tok - c))] if n_spec else []
            scheduled.append(Scheduled(req, n, spec, c + n - len(spec) >= n_tok))
            budget -= n
            room -= 1
            i += 1

        if out.preempted:  # vLLM: no admission in a step that had to preempt
            self.kv_bound = True
            return out
        if not self.waiting:
            self.kv_bound = False
        while (self.waiting and budget > 0 and room > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            hits, n_hit = self.kv.get_computed_blocks(req) if req.read_prefix_cache else ([], 0)
            n = min(req.num_tokens - n_hit, budget)
            if not self.kv.allocate_slots(req, n, hits):
                self.kv_bound = True
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.kv_bound = False
            req.num_computed_tokens = req.num_cached_tokens = n_hit
            req.status = Status.RUNNING
            bisect.insort(self.running, req, key=_arrival)  # a re-admitted request keeps its age
            out.scheduled.append(Scheduled.of(req, n, []))
            budget -= n
            room -= 1
        return out

    def micro_batch_share(self, num_micro_batches: int) -> int | None:
        """How many requests one micro-batch takes when `num_micro_batches` are in flight (a pipeline of that many
        stages): an even share of the requests that can run, so that every stage has work (vLLM v0's virtual
        engines split the requests the same way). Those are the running ones plus as many waiting ones as
        `max_num_seqs` admits, or only the running ones while the KV pool is what holds the queue back; counting
        every waiting request instead would let one micro-batch take all of them under a long queue and leave
        the other stages idle. None (no cap) without a pipeline."""
        if num_micro_batches <= 1:
            return None
        can_run = len(self.running) if self.kv_bound and self.running else min(
            len(self.running) + len(self.waiting), self.config.max_num_seqs)
        return max(1, math.ceil(can_run / num_micro_batches))

    def update(self, scheduled: SchedulerOutput, sampled: Mapping[str, Sequence[int]]) -> list[RequestUpdate]:
        """Apply one step's results; an update for each request that produced tokens, in schedule order.

        `sampled[request_id]`: the tokens the step emitted for each request whose scheduled tokens reach
        its last committed token: one token, or for a request with drafts the accepted drafts then the
        correction or bonus token (`speculative.verify`). A prefill chunk that stops short has no entry.
        vLLM v1 `update_from_output` and nano-vllm `postprocess`: advance, roll back, append, finish.
        """
        updates, max_model_len = [], self.config.max_model_len
        for s in scheduled.scheduled:
            req, spec = s.request, s.spec_token_ids
            req.num_computed_tokens += s.num_tokens
            if not s.reaches_end:  # a prefill chunk that does not reach the prompt's end yet: nothing sampled
                continue
            new = sampled[req.request_id]
            if not spec and len(new) == 1:
                # Fast path, the steady state: one token sampled, no drafts checked. What the loop below does for
                # it, without the loop: the token is committed whether or not it finishes the request.
                if req.spec_token_ids:  # drafts the budget cut off are dropped
                    req.spec_token_ids = []
                tok = new[0]
                reason = req.append_token(tok, max_model_len)
                if reason:
                    self.finish(req, reason)
                updates.append(RequestUpdate(req, [tok], 0, 0, reason))
                continue
            n_acc = len(new) - 1 if spec else 0
            # The rejected drafts' K/V was written for tokens that are not in the sequence: forget it (the
            # correction token, committed below, takes the first rejected position in the next step).
            if spec:
                req.num_computed_tokens -= len(spec) - n_acc
            if req.spec_token_ids:  # drafts the budget cut off are dropped too
                req.spec_token_ids = []
            committed, reason = [], None
            for tok in new:
                committed.append(tok)
                reason = req.append_token(tok, max_model_len)
                if reason:  # tokens past a stop are dropped (vLLM `_update_request_with_output`)
                    break
            if reason:
                self.finish(req, reason)  # frees every block: no trim needed
            elif spec:
                self.kv.trim(req, req.num_computed_tokens)  # give back the blocks only rejected drafts used
            updates.append(RequestUpdate(req, committed, len(spec), n_acc, reason))
        return updates

    def finish(self, req: Request, reason: str) -> None:
        """Take a request out (finished or aborted) and free its blocks."""
        if req.status is Status.RUNNING:
            self._remove_running(req)
        elif req.status in (Status.WAITING, Status.PREEMPTED):
            self.waiting.remove(req)
        self.kv.free(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        req.spec_token_ids = []

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
