"""One simulated replica: the engine's own Scheduler and KVCacheManager, driven on a simulated clock.

The driver mirrors the real serving loop step for step (moekit/serve/async_engine.py `_serve` around
moekit/infer/engine.py `Engine.step`): at the start of an iteration the requests that arrived are added, then
up to `max_in_flight` (= pipeline stages) micro-batches are scheduled and submitted, each taking its share of
the unfinished requests and passing over those still in flight (`Scheduler.schedule(idle=, max_seqs=)`), then
the oldest is waited for and `Scheduler.update` commits one token per request that reached the end of its
committed tokens; then the driver's per-step overhead (the planner's step_overhead_us, or the server's measured
gap) passes before the next iteration. Nothing of the scheduling is copied here: batches, chunked prefill, the
token budget, preemptions and prefix-cache hits are the real scheduler's decisions.

A micro-batch moves through the stages as in a GPipe-style timeline: stage j starts it when the previous stage
has finished it (plus the hop) and stage j is free; the step's tokens exist when the last stage is done.

Requests carry token ids made from (prefix_id, index) so that the prefix cache sees shared system prompts as
equal blocks and everything else as distinct, with ignore_eos and max_tokens = output_len (the lengths a trace
or `moekit bench serve --ignore-eos` gives).
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass

import numpy as np

from moekit.infer.kv_cache import KVCacheManager
from moekit.infer.request import Request
from moekit.infer.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from moekit.sim.steptime import Work

TOKEN = 1  # what every simulated step samples: not an end-of-sequence token (the requests ignore EOS anyway)
# Every request's sampled tokens: one tuple shared by all of them (Scheduler.update only reads it), rather than a
# new list per request per step.
SAMPLED = (TOKEN,)


@dataclass(slots=True)
class SimParams:
    """The part of SamplingParams that `Request.append_token` reads."""

    max_tokens: int
    ignore_eos: bool = True
    stop_token_ids: tuple = ()


def prompt_ids(index: int, prompt_len: int, prefix_id: int = -1, prefix_len: int = 0, vocab: int = 50_000,
               seed: int = 0) -> list[int]:
    """Token ids of request `index`: a shared prefix drawn from `prefix_id`'s seed, then its own draws."""
    head = []
    if prefix_id >= 0 and prefix_len:
        head = np.random.default_rng((seed, 1, prefix_id)).integers(0, vocab, prefix_len).tolist()
    tail = np.random.default_rng((seed, 2, index)).integers(0, vocab, prompt_len - len(head)).tolist()
    return head + tail


@dataclass(eq=False)
class SimRequest(Request):
    """The engine's Request, plus its times as `moekit bench serve` measures them: carried by the request itself, so
    that committing a token touches no other object (a simulated fleet hour commits ~10^8 of them)."""

    sent: float = 0.0  # arrival time (Request.arrival is its admission order)
    first: float = -1.0  # first token
    last: float = -1.0  # latest token


class Results:
    """Per-request outcomes of every replica, in columns (one simulated hour of GPT-4 is ~10^5 requests and
    ~10^7 inter-token gaps: arrays, not objects)."""

    def __init__(self):
        self.arrival, self.ttft, self.e2el = array("d"), array("d"), array("d")
        self.prompt_len, self.output_len, self.cached = array("q"), array("q"), array("q")
        self.preemptions, self.replica, self.index = array("q"), array("q"), array("q")
        self.itl = array("d")

    def finish(self, req: SimRequest, replica: int) -> None:
        self.arrival.append(req.sent)
        self.ttft.append(req.first - req.sent)
        self.e2el.append(req.last - req.sent)
        self.prompt_len.append(len(req.prompt_token_ids))
        self.output_len.append(req.num_output_tokens)  # every committed token (a preemption keeps them)
        self.cached.append(req.num_cached_tokens)
        self.preemptions.append(req.num_preemptions)
        self.replica.append(replica)
        self.index.append(req.arrival)

    def __len__(self) -> int:
        return len(self.ttft)


class Replica:
    def __init__(self, index: int, model, results: Results, *, num_blocks: int, block_size: int = 16,
                 max_num_batched_tokens: int = 8192, max_num_seqs: int = 1024, max_model_len: int = 8192,
                 enable_prefix_caching: bool = True, max_in_flight: int | None = None, record: bool = False,
                 bin_s: float = 60.0):
        self.index, self.model, self.results = index, model, results
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens, max_num_seqs, max_model_len), self.kv)
        self.max_in_flight = max_in_flight or model.num_stages
        self.stage_free = [0.0] * model.num_stages
        self.in_flight: deque[tuple[SchedulerOutput, float]] = deque()
        # The running requests not in flight: what the next micro-batch may take or preempt. Kept as steps are
        # scheduled and completed, so that scheduling costs O(idle), not a pass over every running request
        # (`Scheduler.schedule(idle=)`, equal to the engine's `skip=` of the requests in flight). A dict as an
        # ordered set: a completed micro-batch comes back in arrival order, so the scheduler's sort finds runs.
        self.idle: dict[Request, None] = {}
        self.unfinished: dict[str, SimRequest] = {}
        self.time = 0.0  # when the driver next acts
        self.active = False  # has an iteration pending in the simulator's event queue
        self.added = 0  # requests added since the last iteration
        self.idle_spins = 0
        self.log: list | None = [] if record else None  # (scheduled [(rid, n, computed, n_spec)], preempted)
        # Totals and a time series (bins of bin_s seconds) for utilization and occupancy.
        self.steps = self.tokens = self.out_tokens = 0
        self.flops = self.bytes = self.stage_busy = 0.0
        self.touched = 0.0  # sum over steps of the mean distinct experts per MoE layer
        self.batch_seqs = 0
        self.bin_s = bin_s
        self.bins: dict[int, list[float]] = {}  # bin -> [busy stage-seconds, output tokens, kv blocks max, seqs max]

    # ---- requests --------------------------------------------------------------------------------------
    def add(self, index: int, arrival: float, prompt: list[int], output_len: int, rid: str | None = None) -> None:
        rid = rid if rid is not None else f"r{index}"
        req = SimRequest(rid, prompt, SimParams(output_len), arrival=index, sent=arrival)
        self.scheduler.add(req)
        self.unfinished[rid] = req
        self.added += 1

    @property
    def load(self) -> int:  # unfinished requests: what a least-loaded router compares
        return len(self.unfinished)

    def has_work(self) -> bool:
        return bool(self.unfinished) or bool(self.in_flight)

    # ---- one iteration of the serving loop ----------------------------------------------------------------
    def _submit(self, t: float, out: SchedulerOutput) -> None:
        tokens = logits = kv = attn2 = 0
        leave = self.idle.pop
        for s in out.scheduled:
            n, c = s.num_tokens, s.request.num_computed_tokens
            tokens += n
            kv += c + n
            attn2 += n * (2 * c + n + 1)  # twice n x (c + (n + 1) / 2): integers, so the sum is exact in any order
            if s.reaches_end:
                logits += len(s.spec_token_ids) + 1
            leave(s.request, None)  # in flight now
        seqs = len(out.scheduled)
        cost = self.model.step(Work(seqs, tokens, float(kv), attn2 / 2, logits))
        ready, free = t, self.stage_free
        for j, st in enumerate(cost.stage_s):
            start = ready if ready > free[j] else free[j]
            free[j] = start + st
            ready = free[j] + cost.hop_s
        done = free[-1]
        self.in_flight.append((out, done))
        if self.log is not None:
            self.log.append(([(s.request.request_id, s.num_tokens, s.request.num_computed_tokens,
                               len(s.spec_token_ids)) for s in out.scheduled],
                             [r.request_id for r in out.preempted]))
        self.steps += 1
        self.tokens += tokens
        self.batch_seqs += seqs
        self.flops += cost.flops
        self.bytes += cost.bytes
        busy = sum(cost.stage_s)
        self.stage_busy += busy
        self.touched += cost.experts_touched
        b = self._bin(t)
        b[0] += busy
        used = self.kv.num_blocks - self.kv.num_free_blocks
        b[2] = max(b[2], used)
        b[3] = max(b[3], len(self.scheduler.running))

    def _bin(self, t: float) -> list[float]:
        k = int(t // self.bin_s)
        b = self.bins.get(k)
        if b is None:
            b = self.bins[k] = [0.0, 0.0, 0.0, 0.0]
        return b

    def iterate(self) -> None:
        """One iteration from `self.time`: fill the pipeline, complete the oldest micro-batch, commit its tokens."""
        t = self.time
        sched, idle = self.scheduler, self.idle
        P = self.max_in_flight
        while len(self.in_flight) < P:
            out = sched.schedule(max_seqs=sched.micro_batch_share(P), idle=idle)
            for r in out.preempted:
                del idle[r]
            if not out.scheduled:  # (a step may preempt and schedule nothing: the engine tries again next step)
                break
            self._submit(t, out)
        if not self.in_flight:
            self.idle_spins = self.idle_spins + 1 if self.unfinished else 0
            if self.idle_spins > 1000:
                raise AssertionError(f"replica {self.index}: {len(self.unfinished)} requests but nothing schedulable")
            self.time = t + self.model.gap_seconds(0, self.added)
            self.added = 0
            return
        self.idle_spins = 0
        out, done = self.in_flight.popleft()
        if done > t:
            t = done
        sampled = {}
        for s in out.scheduled:
            req = s.request
            idle[req] = None  # its step is done: the next micro-batch may take it (those that finish now leave below)
            if s.reaches_end:
                sampled[req.request_id] = SAMPLED
        updates = sched.update(out, sampled)
        itl = self.results.itl
        for u in updates:
            req = u.request
            if req.first < 0:
                req.first = t
            else:
                itl.append(t - req.last)
            req.last = t
            if u.finish_reason:
                del idle[req]
                del self.unfinished[req.request_id]
                self.results.finish(req, self.index)
        self.out_tokens += len(updates)
        self._bin(t)[1] += len(updates)
        t += self.model.gap_seconds(len(updates), self.added)
        self.added = 0
        self.time = t
