"""Prometheus metrics of one server (GET /metrics), in its own `CollectorRegistry`.

Two kinds, named after vLLM's (`vllm:time_to_first_token_seconds` -> `moekit_time_to_first_token_seconds`;
Prometheus reserves colons for recording rules, so moekit uses underscores):
- latency histograms, observed by the engine thread as requests progress: time to first token
  (arrival -> first output), time per output token ((last - first output) / (tokens - 1)),
  inter-token latency (between two outputs of a request), end-to-end latency, and queue time
  (arrival -> the first forward pass that includes the request);
- engine state, read at scrape time from the engine thread's latest snapshot (`Engine.metrics()`):
  running and waiting requests, KV blocks used / free / total, prefix-cache queries and hits (and
  their ratio), preemptions, tokens, speculative tokens drafted and accepted, and the tokens each
  expert of each MoE layer computed (the routing balance, SPEC section 4's "tokens per expert").

Bucket bounds are vLLM's, extended down to 1 ms so that a CPU-sized model is resolved too.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict], state: Callable[[], str]):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("moekit_time_to_first_token_seconds", "Arrival to the first output token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("moekit_time_per_output_token_seconds", "Per request: (last - first token time) / "
                              "(output tokens - 1)", buckets=TOKEN_BUCKETS, registry=r)
        self.itl = Histogram("moekit_inter_token_latency_seconds", "Time between two outputs of a request",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("moekit_e2e_request_latency_seconds", "Arrival to the last token, finished requests",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("moekit_request_queue_time_seconds", "Arrival to the first forward pass "
                                    "that includes the request", buckets=REQUEST_BUCKETS, registry=r)
        self.requests = Counter("moekit_request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)
        self.errors = Counter("moekit_request_errors", "HTTP error answers by status", ["status"], registry=r)
        r.register(_EngineCollector(snapshot, state))

    def finished(self, reason: str, tr, t: float) -> None:
        """A request ended (`tr` is the engine thread's record of it: arrival, first/last token, tokens)."""
        self.requests.labels(reason).inc()
        if reason in ("stop", "length"):
            self.e2e.observe(t - tr.arrival)
            if tr.num_tokens > 1 and tr.first_token is not None:
                self.tpot.observe((tr.last_token - tr.first_token) / (tr.num_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict], state: Callable[[], str]):
        self.snapshot, self.state = snapshot, state

    def collect(self):
        yield GaugeMetricFamily("moekit_server_ready", "1 when the model is loaded and requests are accepted",
                                value=1 if self.state() == "ready" else 0)
        m = self.snapshot()
        if not m:  # still loading
            return
        gauges = {"num_requests_running": ("requests_running", "Requests in the running batch"),
                  "num_requests_waiting": ("requests_waiting", "Requests waiting for a running slot or KV blocks"),
                  "kv_cache_blocks_used": ("kv_blocks_used", "KV-cache blocks held by requests"),
                  "kv_cache_blocks_free": ("kv_blocks_free", "KV-cache blocks free (cached prefixes included)"),
                  "kv_cache_blocks_total": ("kv_blocks_total", "KV-cache blocks in the pool"),
                  "kv_cache_blocks_cached": ("kv_blocks_cached", "Blocks holding a cached prefix"),
                  "max_model_len": ("max_model_len", "Prompt + output tokens one request may hold"),
                  "encoder_cache_requests": ("encoder_cache_requests", "Requests whose images' K/V are kept"),
                  "encoder_cache_bytes": ("encoder_cache_bytes", "Bytes of the images' cross-attention K/V kept")}
        for name, (key, doc) in gauges.items():
            yield GaugeMetricFamily(f"moekit_{name}", doc, value=m[key])
        yield GaugeMetricFamily("moekit_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                                value=m["kv_blocks_used"] / max(m["kv_blocks_total"], 1))
        q, h = m["prefix_cache_queries"], m["prefix_cache_hits"]
        yield GaugeMetricFamily("moekit_prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens, since start",
                                value=h / q if q else 0.0)
        counters = {"prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
                    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache"),
                    "num_preemptions": ("preemptions", "Requests preempted (KV freed, recomputed later)"),
                    "engine_steps": ("steps", "Engine steps (forward passes)"),
                    "prompt_tokens": ("prompt_tokens", "Prompt tokens of admitted requests"),
                    "generation_tokens": ("generated_tokens", "Tokens generated"),
                    "computed_tokens": ("computed_tokens", "Tokens through the forward pass, recomputation included"),
                    "spec_decode_num_draft_tokens": ("spec_drafted", "Speculative tokens drafted"),
                    "spec_decode_num_accepted_tokens": ("spec_accepted", "Speculative tokens accepted"),
                    "images_encoded": ("images_encoded", "Images through the vision encoder")}
        for name, (key, doc) in counters.items():
            yield CounterMetricFamily(f"moekit_{name}", doc, value=m[key])
        experts = CounterMetricFamily("moekit_expert_tokens", "Token assignments each expert computed, per MoE layer",
                                      labels=["moe_layer", "expert"])
        for layer, row in enumerate(m["tokens_per_expert"]):
            for e, v in enumerate(row):
                experts.add_metric([str(layer), str(e)], v)
        yield experts
        if m.get("workers"):
            yield from _worker_metrics(m["workers"])


def _worker_metrics(workers: list[dict]):
    """A sharded model's per-worker figures (moekit/infer/worker.py `Worker.metrics`), labelled by rank."""
    labels = ["rank", "stage", "tensor_rank"]
    gauges = {"worker_weight_bytes": ("weight_bytes", "Weight bytes this worker holds"),
              "worker_kv_cache_blocks": ("kv_blocks", "KV blocks this worker's part of the cache holds"),
              "worker_kv_cache_bytes": ("kv_cache_bytes", "Bytes of this worker's part of the KV cache"),
              "worker_resident_bytes": ("rss_bytes", "Resident memory of the worker process"),
              "worker_collective_share": ("collective_share", "Share of a sampled step spent in collectives")}
    counters = {"worker_steps": ("steps", "Steps this worker ran"),
                "worker_step_seconds": ("step_seconds", "Seconds this worker spent in steps"),
                "worker_collective_seconds": ("collective_seconds", "Seconds in collectives, sampled steps")}
    for name, (key, doc) in gauges.items():
        g = GaugeMetricFamily(f"moekit_{name}", doc, labels=labels)
        for w in workers:
            g.add_metric([str(w["rank"]), str(w["pp_rank"]), str(w["tp_rank"])], w[key])
        yield g
    for name, (key, doc) in counters.items():
        c = CounterMetricFamily(f"moekit_{name}", doc, labels=labels)
        for w in workers:
            c.add_metric([str(w["rank"]), str(w["pp_rank"]), str(w["tp_rank"])], w[key])
        yield c
    experts = CounterMetricFamily("moekit_worker_expert_tokens", "Token assignments each worker's experts computed",
                                  labels=["rank", "layer", "expert"])
    for w in workers:
        lo = w["experts"][0]
        for layer, row in w["tokens_per_expert"].items():
            for e, v in enumerate(row):
                experts.add_metric([str(w["rank"]), layer, str(lo + e)], v)
    yield experts
