"""The discrete-event loop: arrivals, a router, R replicas, each an event source at its driver's next time.

    from moekit.sim import simulator, steptime, workload
    model = steptime.HardwareModel("gpt4", "A100-80GB", tp=8, pp=16)
    reqs = workload.synthetic(rate=2.0, duration=600, prompt="1024", output="256")
    dep = simulator.Deployment(replicas=1, kv_tokens=model.kv_tokens_capacity())
    run = simulator.simulate(reqs, lambda i: model, dep)
    run.summary(slos={"ttft": 2000, "tpot": 200})

Time only moves by events: the next arrival, or the next replica whose driver is ready (a min-heap by time).
An arrival at the same instant as a replica's iteration is added first (the server drains its queue at the
top of each loop iteration). Every replica's scheduler is the engine's own (moekit/sim/replica.py).
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from moekit.sim.replica import Replica, Results, prompt_ids
from moekit.sim.router import Router


@dataclass
class Deployment:
    replicas: int = 1
    kv_tokens: int | None = None  # K/V tokens one replica holds (None: num_blocks must be given)
    num_blocks: int | None = None  # overrides kv_tokens: the engine's pool exactly
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    router: str = "least-loaded"
    max_in_flight: int | None = None  # default: one micro-batch per pipeline stage

    @classmethod
    def of_engine(cls, engine: dict, **kw) -> Deployment:
        """The deployment of a server's (or a sweep's) engine settings: a step log's header, a profile's `engine`."""
        keys = ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                "enable_prefix_caching")
        return cls(**{k: engine[k] for k in keys if k in engine}, **kw)

    def blocks(self) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_tokens is None:
            raise ValueError("give the deployment kv_tokens or num_blocks")
        return self.kv_tokens // self.block_size

    def __post_init__(self) -> None:
        for name in ("replicas", "block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SimRun:
    results: Results
    replicas: list[Replica]
    wall_s: float
    n_requests: int
    model_info: dict = field(default_factory=dict)
    n_gpus_per_replica: int = 1
    clipped: int = 0  # requests whose lengths were cut to max_model_len

    @property
    def duration(self) -> float:
        """First arrival to last token: `moekit bench serve`'s benchmark duration."""
        r = self.results
        if not len(r):
            return 0.0
        return max(a + e for a, e in zip(r.arrival, r.e2el, strict=True)) - min(r.arrival)

    def summary(self, slos: dict[str, float] | None = None, percentiles=(50, 90, 99),
                price_per_gpu_hour: float | None = None, peak_flops: float | None = None,
                peak_bandwidth: float | None = None) -> dict:
        from moekit.sim.metrics import summarize

        return summarize(self, slos or {}, percentiles, price_per_gpu_hour, peak_flops, peak_bandwidth)


def simulate(requests, model_for, dep: Deployment, *, vocab: int = 50_000, seed: int = 0,
             record: bool = False, bin_s: float = 60.0, progress=None) -> SimRun:
    """Run `requests` (sorted by arrival) through `dep.replicas` replicas; `model_for(i)` gives replica i's
    step-time model (one shared model is fine: it is stateless but for its routing draws)."""
    # The loop makes millions of short-lived objects (scheduler outputs, updates) over a heap of millions of
    # long-lived ones (the pools' blocks, the requests), next to none of them in reference cycles: reference counting
    # frees them, and the cyclic collector's passes over that heap (15-20% of a run) find a few hundred objects. So
    # it is off while the simulator runs (vLLM's engine core freezes its start-up heap out of the collector for the
    # same reason: "Reduces pause times of oldest generation collections", vllm/v1/engine/core.py freeze_gc_heap).
    with _cyclic_gc_off():
        results = Results()
        nb = dep.blocks()
        if nb < 1:
            raise ValueError("the KV cache holds no block: give the replica more memory")
        if nb * dep.block_size < dep.max_model_len:
            # A request must always fit the whole pool, or it could wait forever (the engine caps it the same way).
            dep.max_model_len = nb * dep.block_size
        replicas = [Replica(i, model_for(i), results, num_blocks=nb, block_size=dep.block_size,
                            max_num_batched_tokens=dep.max_num_batched_tokens, max_num_seqs=dep.max_num_seqs,
                            max_model_len=dep.max_model_len, enable_prefix_caching=dep.enable_prefix_caching,
                            max_in_flight=dep.max_in_flight, record=record, bin_s=bin_s)
                    for i in range(dep.replicas)]
        router = Router(dep.router, replicas)
        heap: list[tuple[float, int]] = []
        n, i = len(requests), 0
        clipped = 0
        t_wall = time.perf_counter()
        inf = math.inf
        # A measured profile's time outside the engine (HTTP, tokenizing, streaming): each request reaches its replica
        # that much after it was sent, and its TTFT and E2E count from the sending.
        ingress = getattr(replicas[0].model, "latency_s", 0.0)
        while i < n or heap:
            ta = requests[i].arrival + ingress if i < n else inf
            if heap and heap[0][0] < ta:
                _, k = heapq.heappop(heap)
                rep = replicas[k]
                rep.iterate()
                if rep.has_work():
                    heapq.heappush(heap, (rep.time, k))
                else:
                    rep.active = False
                continue
            q = requests[i]
            p_len, o_len = q.prompt_len, q.output_len
            if p_len + o_len > dep.max_model_len:  # clip as `moekit bench serve --trace` does: the prompt first
                p_len = min(p_len, dep.max_model_len - 1)
                o_len = max(1, min(o_len, dep.max_model_len - p_len))
                clipped += 1
            rep = router.choose(q.prefix_id)
            prompt = prompt_ids(i, p_len, q.prefix_id, min(q.prefix_len, p_len - 1), vocab, seed)
            rep.add(i, q.arrival, prompt, o_len, getattr(q, "request_id", None))
            if not rep.active:
                rep.active = True
                rep.time = max(rep.time, ta)
                heapq.heappush(heap, (rep.time, rep.index))
            i += 1
            if progress is not None and i % 1000 == 0:
                progress(i)
        wall = time.perf_counter() - t_wall
        for rep in replicas:
            rep.kv.check_whole()  # every block came back: the simulated run leaked nothing
    m = replicas[0].model
    return SimRun(results, replicas, wall, n, m.describe(), getattr(m, "n_gpus", 1), clipped)


@contextmanager
def _cyclic_gc_off():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
