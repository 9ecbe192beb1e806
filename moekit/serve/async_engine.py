"""AsyncEngine: the engine steps in its own thread; HTTP handlers talk to it through queues.

    engine = AsyncEngine(load, max_num_seqs=256, max_waiting=1024)
    engine.start()                                    # on the event loop: loads the model in the thread
    handle = await engine.submit([(prompt_ids, params)], "cmpl-1")
    async for events in handle.events(): ...          # one list of Events per engine step
    handle.close()                                    # aborts whatever has not finished

The `Engine` is not thread-safe, so one thread owns it (vLLM's EngineCore loop, here a thread
instead of a process): it loads the model, then loops `commands -> step -> deliver`. Handlers
never touch the engine; they put commands (add, abort, stop) on a thread-safe queue, which the
thread drains between two steps, so an abort frees a request's KV blocks before the next step
runs (a client that disconnects costs at most the step in flight). Outputs go back to each
request's `asyncio.Queue` with one `call_soon_threadsafe` per step. Every finished or aborted
request is collected from the engine at once (`Engine.result`), so nothing accumulates.

The thread also times every request (arrival, first scheduled, first token, each output, finish)
for the latency histograms, publishes `snapshot` (the engine's `metrics()` after every step) for
/metrics and admission control, and logs one stats line per `log_interval`. If the engine raises,
every request in flight gets an error and `on_fatal` asks the server to exit (vLLM does the same
when its engine core dies): a half-updated engine is not trusted with more requests.

With `step_log` (`moekit serve --step-log FILE.jsonl`) the thread also writes one JSON line per loop iteration
that ran a step or added or aborted requests (`_StepLog`): what the scheduler decided and when, the input of
`moekit sim replay` and `moekit sim calibrate --from-step-log`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from moekit.cpu import ThreadGovernor
from moekit.infer.engine import Engine, RequestOutput
from moekit.infer.executor import WorkerFailed
from moekit.infer.sampler import SamplingParams
from moekit.serve.errors import APIError
from moekit.serve.metrics import ServerMetrics

log = logging.getLogger("moekit.serve")
RETRY_AFTER_S = 1  # what 429 and 503 tell clients to wait
WORKER_METRICS_S = 2.0  # how often the engine thread asks sharded workers for their figures (one round trip)


@dataclass
class Final:
    """The end of one engine request."""

    finish_reason: str  # stop | length | abort | error
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass
class Event:
    index: int  # the choice this belongs to, within its HTTP request
    output: RequestOutput | None  # None for an error
    final: Final | None = None  # set on the request's last event


@dataclass
class _Tracked:  # one engine request as the engine thread sees it
    handle: Handle
    index: int
    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0


@dataclass
class _Add:
    items: list  # (request_id, prompt ids, SamplingParams, choice index)
    handle: Handle
    future: asyncio.Future
    arrival: float
    images: list = field(default_factory=list)  # pixels for every item's `<image>` markers (a vision model)


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()


class Handle:
    """The engine requests of one HTTP request (n choices x prompts) and the queue their events arrive on."""

    def __init__(self, owner: AsyncEngine, request_ids: list[str]):
        self.owner, self.request_ids = owner, request_ids
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.num_finished = 0  # counted on delivery, on the event loop

    @property
    def done(self) -> bool:
        return self.num_finished == len(self.request_ids)

    async def events(self) -> AsyncIterator[list[Event]]:
        """Batches of events (one per engine step), until every request of the handle has finished."""
        while True:
            batch = await self.queue.get()
            while not self.queue.empty():  # a slow reader gets what piled up in one go
                batch += self.queue.get_nowait()
            yield batch
            if self.done and self.queue.empty():
                return

    def close(self) -> None:
        """Abort what has not finished (a client that left); a no-op once done."""
        if not self.done:
            self.owner.abort(self)


@dataclass
class AsyncEngine:
    load: Callable[[], Engine]  # runs in the engine thread
    max_num_seqs: int = 256
    max_waiting: int = 1024
    metrics: ServerMetrics | None = None  # the engine thread reports timings to it
    log_interval: float = 10.0
    on_fatal: Callable[[], None] | None = None  # called on the event loop when the engine dies
    state: str = "loading"  # loading | ready | draining | failed | stopped
    error: str | None = None
    engine: Engine | None = None
    snapshot: dict = field(default_factory=dict)
    inflight: int = 0  # engine requests submitted and not finished (event-loop side)
    step_log: str | None = None  # write the step log (JSONL) here; None: no log
    governor: ThreadGovernor | None = None  # re-checks torch's thread count against the load (engine thread)

    def __post_init__(self) -> None:
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine-thread side
        self._unscheduled: dict[str, _Tracked] = {}  # tracked requests not yet in a forward pass
        self._workers: list[dict] = []  # the sharded workers' last figures (engine-thread side)
        self._log: _StepLog | None = None  # engine-thread side, while serving with step_log

    # ---- event-loop side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="moekit-engine", daemon=True)
        self._thread.start()

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        why = {"loading": "the model is still loading", "draining": "the server is shutting down",
               "stopped": "the server is shutting down"}.get(self.state, f"the engine failed ({self.error})")
        raise APIError(503, f"Service unavailable: {why}; retry later", code="service_unavailable",
                       headers={"Retry-After": str(RETRY_AFTER_S * (5 if self.state == "loading" else 1))})

    def _check_capacity(self, n: int) -> None:
        # Requests beyond the running slots wait. When the engine kept requests waiting at its last
        # step, the KV pool (not max_num_seqs) is the limit, and what runs now is the capacity.
        if n > self.max_num_seqs + self.max_waiting:  # would never be admitted: not a matter of waiting
            raise APIError(400, f"this request needs {n} sequences (n x prompts), more than this server holds at once "
                                f"({self.max_num_seqs} running + {self.max_waiting} waiting): lower n", param="n")
        snap = self.snapshot
        capacity = snap.get("requests_running", 0) if snap.get("requests_waiting") else self.max_num_seqs
        waiting = max(0, self.inflight - capacity)
        if max(0, self.inflight + n - capacity) > self.max_waiting:
            raise APIError(429, f"The server is at capacity: {self.inflight - waiting} requests running and {waiting} "
                                f"waiting (--max-waiting {self.max_waiting}); retry in {RETRY_AFTER_S} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def submit(self, prompts: list[tuple[list[int], SamplingParams]], prefix: str,
                     images: Sequence = ()) -> Handle:
        """Queue the requests of one HTTP request atomically; 429 when the queue is full, 400 if the engine refuses.
        images: pixels of the prompt's `<image>` markers, shared by every prompt (the n choices of a chat)."""
        self.check_ready()
        self._check_capacity(len(prompts))
        handle = Handle(self, [f"{prefix}-{i}" for i in range(len(prompts))])
        fut = self._loop.create_future()
        items = [(rid, ids, params, i)
                 for i, (rid, (ids, params)) in enumerate(zip(handle.request_ids, prompts, strict=True))]
        self.inflight += len(items)
        self._cmds.put(_Add(items, handle, fut, time.perf_counter(), list(images)))
        try:
            await fut
        except asyncio.CancelledError:  # the client left while we waited for the engine thread
            self.abort(handle)
            raise
        return handle

    def abort(self, handle: Handle) -> None:
        self._cmds.put(_Abort(list(handle.request_ids)))

    async def stop(self) -> None:
        """Abort what is left, stop the thread (called after the server stopped taking requests)."""
        if self.state in ("loading", "ready", "draining"):
            self.state = "stopped"
        self._cmds.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def _deliver(self, items: list) -> None:  # on the event loop: one call per engine step
        batches: dict[int, tuple[Handle, list[Event]]] = {}
        for item in items:
            if callable(item):
                item()
                continue
            handle, event = item
            if event.final is not None:
                self.inflight -= 1
                handle.num_finished += 1
            batches.setdefault(id(handle), (handle, []))[1].append(event)
        for handle, events in batches.values():
            handle.queue.put_nowait(events)

    def _post(self, items: list) -> None:
        if items and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # the loop is closed: the process is exiting
                pass

    def _refuse(self, cmd: _Add, error: APIError) -> None:  # on the event loop
        self.inflight -= len(cmd.items)
        if not cmd.future.done():
            cmd.future.set_exception(error)

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self.load()
            self.snapshot = engine.metrics()
            self.engine = engine
            if self.state == "loading":
                self.state = "ready"
        except Exception as e:  # noqa: BLE001 - reported to the operator, then the server exits
            self._die(f"loading the model failed: {e}", log_traceback=not isinstance(e, (ValueError, OSError)))
            return
        try:
            self._serve(engine)
        except WorkerFailed as e:  # a worker of a sharded model died: its name and how, no traceback of ours
            engine.close()
            self._die(str(e), log_traceback=False)
        except Exception as e:  # noqa: BLE001 - a bug or an out-of-memory in a step: fail loudly, exit
            engine.close()
            self._die(f"{type(e).__name__}: {e}", log_traceback=True)
        else:
            engine.close()

    def _serve(self, engine: Engine) -> None:
        self._log = _StepLog(self.step_log, engine) if self.step_log else None
        try:
            self._loop_steps(engine)
        finally:
            if self._log is not None:
                self._log.close()

    def _loop_steps(self, engine: Engine) -> None:
        stats = _StatsLog(self.log_interval)
        workers_t = 0.0
        slog = self._log
        while True:
            t_loop = time.perf_counter()
            engine.check_workers()  # a worker that died while the server was idle is seen within a second
            out: list = []
            idle = not engine.has_unfinished()
            if idle and slog is not None:
                slog.flush()  # nothing to do: what was logged is on disk while the server waits
            cmds = self._commands(block=idle)
            if idle:  # it waited for commands: the iteration starts when the first one came
                t_loop = time.perf_counter()
            for cmd in cmds:
                if cmd is _STOP:
                    self._abort(engine, list(self._tracked), out)
                    if slog is not None:
                        slog.iteration(t_loop)
                    self.snapshot = engine.metrics()
                    self._post(out)
                    return
                if isinstance(cmd, _Add):
                    self._add(engine, cmd, out)
                else:
                    self._abort(engine, cmd.request_ids, out)
            if engine.has_unfinished():
                t0 = time.perf_counter()
                outputs = engine.step()
                t1 = time.perf_counter()
                self._outputs(engine, outputs, t0, t1, out)
                if slog is not None:
                    slog.iteration(t_loop, t0, t1, engine.last_step, outputs)
            elif slog is not None:
                slog.iteration(t_loop)
            snapshot = engine.metrics()
            if engine.executor is not None:  # the workers' own figures, refreshed every WORKER_METRICS_S
                if time.perf_counter() - workers_t > WORKER_METRICS_S:
                    self._workers = engine.worker_metrics()
                    workers_t = time.perf_counter()
                snapshot["workers"] = self._workers
            self.snapshot = snapshot
            self._post(out)
            stats.maybe_log(self.snapshot)
            if self.governor is not None and (n := self.governor.tick()) is not None:
                log.info("torch threads: %d (other work on this process's cores changed)", n)

    def _commands(self, block: bool) -> list:
        cmds = []
        if block:
            try:
                cmds.append(self._cmds.get(timeout=1.0))  # wake up now and then for the stats line
            except queue.Empty:
                return cmds
        while True:
            try:
                cmds.append(self._cmds.get_nowait())
            except queue.Empty:
                return cmds

    def _add(self, engine: Engine, cmd: _Add, out: list) -> None:
        added = []
        try:
            for rid, ids, params, _ in cmd.items:
                engine.add_request(ids, params, rid, images=cmd.images)
                added.append(rid)
        except ValueError as e:  # the app validates first; this is the engine's word on anything left
            for rid in added:
                if engine.abort(rid):
                    engine.result(rid)
            out.append(partial(self._refuse, cmd, APIError(400, str(e))))
            return
        for rid, ids, params, index in cmd.items:
            tr = _Tracked(cmd.handle, index, cmd.arrival, len(ids))
            self._tracked[rid] = self._unscheduled[rid] = tr
            if self._log is not None:
                self._log.added.append([rid, len(ids), params.max_tokens, cmd.arrival - self._log.t_start])
        out.append(partial(_resolve, cmd.future))

    def _abort(self, engine: Engine, request_ids: list[str], out: list) -> None:
        for rid in request_ids:
            tr = self._tracked.pop(rid, None)
            self._unscheduled.pop(rid, None)
            if tr is None:  # finished already (its last event is on its way) or never added
                continue
            comp = engine.result(rid) if engine.abort(rid) else None
            if comp is not None and self._log is not None:
                self._log.aborted.append(rid)
            final = Final("abort", tr.num_prompt_tokens, tr.num_tokens, comp.num_cached_tokens if comp else 0)
            out.append((tr.handle, Event(tr.index, None, final)))
            if self.metrics is not None:
                self.metrics.finished("abort", tr, time.perf_counter())

    def _outputs(self, engine: Engine, outputs: list[RequestOutput], t0: float, t1: float, out: list) -> None:
        m = self.metrics
        for rid in [rid for rid in self._unscheduled if (r := engine.requests.get(rid)) is None
                    or r.num_computed_tokens > 0]:  # in this step's forward pass (or done)
            tr = self._unscheduled.pop(rid)
            if m is not None:
                m.queue_time.observe(t0 - tr.arrival)
        for o in outputs:
            tr = self._tracked.get(o.request_id)
            if tr is None:
                continue
            if o.new_token_ids:
                if tr.first_token is None:
                    tr.first_token = t1
                    if m is not None:
                        m.ttft.observe(t1 - tr.arrival)
                elif m is not None:
                    m.itl.observe(t1 - tr.last_token)
                tr.last_token = t1
                tr.num_tokens += len(o.new_token_ids)
            final = None
            if o.finished:
                del self._tracked[o.request_id]
                self._unscheduled.pop(o.request_id, None)
                comp = engine.result(o.request_id)  # collect it: the engine keeps finished requests until then
                final = Final(o.finish_reason or "stop", len(comp.prompt_token_ids), len(comp.token_ids),
                              comp.num_cached_tokens)
                if m is not None:
                    m.finished(final.finish_reason, tr, t1)
            out.append((tr.handle, Event(tr.index, o, final)))

    def _die(self, message: str, log_traceback: bool) -> None:
        log.error("engine: %s%s", message, "\n" + traceback.format_exc() if log_traceback else "")
        self.error, self.state = message, "failed"
        out = [(tr.handle, Event(tr.index, None, Final("error", tr.num_prompt_tokens, tr.num_tokens, error=message)))
               for tr in self._tracked.values()]
        self._tracked.clear()
        if self.on_fatal is not None:
            out.append(self.on_fatal)
        self._post(out)
        while True:  # refuse whatever still arrives until stopped
            cmd = self._cmds.get()
            if cmd is _STOP:
                return
            if isinstance(cmd, _Add):
                self._post([partial(self._refuse, cmd, APIError(503, f"Service unavailable: the engine failed "
                                                                     f"({message})", code="service_unavailable"))])


class _StepLog:
    """`moekit serve --step-log`: one JSON line per loop iteration that ran a step, or that added or aborted requests
    without one. Times are seconds since serving began (perf_counter): t_loop the iteration's start (for an idle
    engine, when the command that woke it came), t0 / t1 around `engine.step()`. A step line holds the micro-batch
    it completed (Engine.last_step): scheduled [request id, tokens, computed before, draft tokens, logits rows],
    preempted ids, outputs (requests that got tokens) and finished ids; every line its added [id, prompt tokens,
    max_tokens, when the HTTP side queued it for the engine thread] and aborted ids. The first line describes the
    engine (KV pool, scheduler limits) and the model's experts (n_expert, top_k, MoE layers) for the simulator.
    Writes are buffered and flushed about every second and whenever the engine goes idle, so the log costs the step
    loop a json.dumps per step."""

    FLUSH_S = 1.0

    def __init__(self, path: str, engine: Engine):
        self.file = open(path, "w", buffering=1 << 16)  # noqa: SIM115 - open for the server's lifetime
        self.t_start = self.flushed = time.perf_counter()
        self.added: list[list] = []  # this iteration's, filled by AsyncEngine._add / _abort
        self.aborted: list[str] = []
        kv, sc, cfg = engine.kv, engine.scheduler.config, engine.cfg
        settings = {"num_blocks": kv.num_blocks, "block_size": kv.block_size, "max_num_seqs": sc.max_num_seqs,
                    "max_num_batched_tokens": sc.max_num_batched_tokens, "max_model_len": sc.max_model_len,
                    "enable_prefix_caching": kv.enable_caching, "max_in_flight": engine.max_in_flight,
                    "num_spec_tokens": engine.num_spec_tokens if engine.proposer is not None else 0,
                    "device": str(engine.device)}
        moe = {"n_expert": cfg.n_expert, "top_k": cfg.top_k, "layers": cfg.n_moe_layers} if cfg.is_moe else {}
        self._write({"kind": "moekit-step-log", "version": 1, "engine": settings, "moe": moe})

    def iteration(self, t_loop: float, t0: float | None = None, t1: float | None = None, record=None,
                  outputs: list[RequestOutput] = ()) -> None:
        """Log this iteration (if it did anything) and start the next one."""
        t = self.t_start
        if record is not None:
            row = {"t_loop": t_loop - t, "t0": t0 - t, "t1": t1 - t, "added": self.added, "aborted": self.aborted,
                   "scheduled": record.scheduled, "preempted": record.preempted,
                   "outputs": sum(1 for o in outputs if o.new_token_ids),
                   "finished": [o.request_id for o in outputs if o.finished]}
        elif self.added or self.aborted:
            row = {"t_loop": t_loop - t, "added": self.added, "aborted": self.aborted}
        else:
            return
        self._write(row)
        self.added, self.aborted = [], []

    def _write(self, row: dict) -> None:
        self.file.write(json.dumps(row, separators=(",", ":")) + "\n")
        if time.perf_counter() - self.flushed > self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self.file.flush()
        self.flushed = time.perf_counter()

    def close(self) -> None:
        self.file.close()


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _StatsLog:
    """One fixed-format line per interval while there is work (DESIGN.md conventions; vLLM's LoggingStatLogger)."""

    def __init__(self, interval: float):
        self.interval, self.last_t = interval, time.perf_counter()
        self.last = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0}

    def maybe_log(self, m: dict) -> None:
        now = time.perf_counter()
        if not self.interval or now - self.last_t < self.interval:
            return
        prev, dt = self.last, now - self.last_t
        self.last, self.last_t = m, now
        if m["steps"] == prev["steps"]:  # idle: say nothing
            return
        q, h, used, total = m["prefix_cache_queries"], m["prefix_cache_hits"], m["kv_blocks_used"], m["kv_blocks_total"]
        line = (f"engine: running {m['requests_running']} | waiting {m['requests_waiting']} | KV "
                f"{used}/{total} blocks ({used / total:.1%}) | "
                f"prefix hits {h / q if q else 0:.1%} | prompt {(m['prompt_tokens'] - prev['prompt_tokens']) / dt:.1f} "
                f"tok/s | generation {(m['generated_tokens'] - prev['generated_tokens']) / dt:.1f} tok/s | "
                f"preemptions {m['preemptions']}")
        if m["spec_drafted"]:
            line += f" | drafts accepted {m['spec_accepted'] / m['spec_drafted']:.1%}"
        log.info(line)
