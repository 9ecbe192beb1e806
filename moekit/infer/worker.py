"""A serving worker: one process of a tp x pp sharded model, running the steps the driver's scheduler decides.

    python -m moekit.infer.worker        (started by moekit/infer/executor.py, or by torchrun's ranks)

vLLM v1's `MultiprocExecutor` form (vllm/v1/executor/multiproc_executor.py): one scheduler, in the driver (the
server process), decides every step; the step's plan, plain `RunItem`s, goes to every worker; each runs its shard;
the output, the logits, comes back from one rank only, the last stage's first tensor rank. Chosen over the
`external_launcher` form (every rank running the same deterministic scheduler) because requests arrive at one
HTTP server anyway, and a scheduler in one place keeps the KV bookkeeping, prefix cache, drafts and sampling
exactly one process's: the workers only ever see tensors to compute.

What a worker holds (DESIGN.md "Distributed code"): pipeline rank p's stage (the planner's placement rule,
moekit/plan/layout.py: the embedding and head stages hold fewer layers when the layers do not divide), tensor-
parallel over its stage's tp ranks through the training code's `apply_tensor_parallel` (no sequence parallelism),
with `--ep` giving each tensor rank whole experts instead of an F-slice of every expert (`split_experts`). The
weights are read tensor by tensor (moekit/infer/loader.py `open_weights`) into a model built on the meta device
and already sharded, so a worker never holds more than its shard and one checkpoint tensor. Its part of the
paged KV cache covers its stage's layers and its local KV heads (MQA's single head replicated on every tensor rank).

Between stages the hidden states (1, T, D) travel rank to rank (tensor rank t of stage p to tensor rank t of
p + 1) with torch.distributed send/recv, asynchronously, so a stage starts the next micro-batch while its last
one is on the wire: with the driver keeping up to P micro-batches in flight, every stage is busy at once.

The driver talks to each worker over one `multiprocessing.connection` socket (pickled plain data, authenticated):
    driver -> worker: ("cache", num_blocks, block_size) | ("step", id, items, count) | ("metrics",) | ("stop",)
    worker -> driver: ("progress", rank, text) | ("ready", rank, info) | ("output", id, logits_RV, counts_LE)
                      | ("metrics", rank, dict) | ("error", rank, traceback)
Workers never wait on each other outside a step, so an idle server holds no collective open (a gloo timeout
would otherwise fire on an idle server); a worker that dies closes its socket, which the driver sees at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection

import torch

from moekit.infer.batch import RunItem, RunOutput
from moekit.infer.kv_cache import PagedKVCache
from moekit.infer.loader import open_weights
from moekit.infer.runner import ModelRunner
from moekit.model.attention import rope_inv_freq
from moekit.model.moe import MoE
from moekit.model.transformer import Transformer
from moekit.parallel.stages import split_model, stage_layers

COUNT_EVERY = 16  # every 16th step runs inside a CollectiveCounter (its Python dispatch hook costs time)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to know, the same for every rank (the driver's command line)."""

    model: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_gb: float = 1.0
    block_size: int = 16

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int]:
        """(pipeline rank, tensor rank) of global rank `rank`: the pipeline dimension outermost, as mesh.py."""
        return divmod(rank, self.tp)

    def to_argv(self) -> list[str]:
        return ["--model", self.model, "--tp", str(self.tp), "--pp", str(self.pp), "--ep", str(self.ep),
                "--dtype", self.dtype, "--device", self.device, "--kv-cache-gb", str(self.kv_cache_gb),
                "--block-size", str(self.block_size)]


def check_layout(cfg, tp: int, pp: int, ep: int) -> None:
    """Raise ValueError, one line naming the valid choices, when tp x pp (x ep) workers cannot serve `cfg`."""
    from moekit.parallel.mesh import check_ep, check_tp

    for flag, v in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be a positive integer, got {v!r}")
    if cfg.has_vision and tp * pp > 1:  # the stage split and tensor plans do not place the vision layers yet
        raise ValueError(f"model {cfg.name!r} has a vision encoder: it is served in one process for now; drop "
                         "--tp/--pp")
    check_tp(tp, cfg)
    if pp > cfg.n_layer:
        raise ValueError(f"--pp {pp} is more stages than the {cfg.n_layer} layers: choose --pp from 1 to {cfg.n_layer}")
    check_ep(ep, cfg)
    if ep > 1 and ep != tp:
        raise ValueError(f"--ep {ep}: serving splits the experts across the tensor-parallel ranks of each stage "
                         f"(vLLM's --enable-expert-parallel), so --ep must be 1 or equal --tp ({tp}): give "
                         f"--tp {ep} --ep {ep}, or --ep 1")


def no_delay(conn: Connection) -> Connection:
    """Turn Nagle's algorithm off on `conn`'s socket. multiprocessing writes a message over 16 KiB (a step's logits)
    as a header and a body, and with Nagle the body then waits for the delayed ACK of the header: ~40 ms per step
    on Linux (bench/parallel_serve.py found it)."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        s.close()
    return conn


def _send(conn: Connection, msg) -> None:
    """Plain pickle, so tensors travel as bytes: `Connection.send` would use torch's ForkingPickler reductions,
    which pass shared-memory file descriptors through a side channel (and fail across processes not forked)."""
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def _local_slice(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of the checkpoint tensor `full` that parameter `p` holds on this rank (all of it unless DTensor)."""
    if not hasattr(p, "device_mesh"):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def worker_device(spec: WorkerSpec, rank: int) -> torch.device:
    """A CUDA worker takes GPU rank % count ("cuda" given); an explicit "cuda:N" or "cpu" is kept."""
    if spec.device == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(spec.device)


def build_stage(spec: WorkerSpec, rank: int, tp_mesh, progress=lambda text: None) -> tuple[Transformer, dict]:
    """This rank's shard of the model, loaded tensor by tensor; (model, what it holds)."""
    from moekit.parallel.tensor import apply_tensor_parallel

    anon_before = _rss_bytes("RssAnon")
    reader = open_weights(spec.model)
    cfg, dtype, device = reader.cfg, getattr(torch, spec.dtype), worker_device(spec, rank)
    pp_rank, tp_rank = spec.coords(rank)
    with torch.device("meta"):
        model = Transformer(cfg)
    split_model(model, [pp_rank], n_stages=spec.pp)
    if spec.tp > 1:
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=False, loss_parallel=False,
                              split_experts=spec.ep > 1)
    model.to_empty(device=device)
    model.to(dtype)
    if cfg.tie_embeddings and model.tok_emb is not None and model.lm_head is not None:
        model.lm_head.weight = model.tok_emb.weight  # to_empty gave the shared weight two tensors: one again
    params = dict(model.named_parameters())
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for i, (name, p) in enumerate(params.items()):
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(_local_slice(reader.get(name), p))
                if (i + 1) % max(1, len(params) // 4) == 0:
                    progress(f"{i + 1}/{len(params)} tensors read")
    finally:
        reader.close()
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.eval()
    layers = stage_layers(cfg.n_layer, spec.pp)[pp_rank]

    def local_bytes(p):
        return (p.to_local() if hasattr(p, "to_local") else p).untyped_storage().nbytes()

    info = {"rank": rank, "pp_rank": pp_rank, "tp_rank": tp_rank, "pid": os.getpid(),
            "layers": [layers.start, layers.stop], "weight_bytes": sum(local_bytes(p) for p in params.values()),
            "n_params_local": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params.values()),
            "load_seconds": time.perf_counter() - t0,
            "anon_bytes_loaded": _rss_bytes("RssAnon") - anon_before}  # what loading the shard made resident
    return model, info


class Worker:
    """One rank's loop: receive the driver's messages, run steps, send the output when this rank owns it."""

    def __init__(self, spec: WorkerSpec, rank: int, conn: Connection, tp_mesh):
        self.spec, self.rank, self.conn = spec, rank, conn
        self.pp_rank, self.tp_rank = spec.coords(rank)
        self.first, self.last = self.pp_rank == 0, self.pp_rank == spec.pp - 1
        self.model, self.info = build_stage(spec, rank, tp_mesh, lambda t: _send(conn, ("progress", rank, t)))
        cfg = self.cfg = self.model.cfg
        layers = stage_layers(cfg.n_layer, spec.pp)[self.pp_rank]
        self.layers = layers
        self.n_kv_head = cfg.n_kv_head // spec.tp if cfg.n_kv_head % spec.tp == 0 else 1
        dtype = getattr(torch, spec.dtype)
        self.dtype = dtype
        per_token = 2 * len(layers) * self.n_kv_head * cfg.head_dim * torch.finfo(dtype).bits // 8
        self.info["kv_bytes_per_block"] = per_token * spec.block_size
        self.info["kv_capacity_blocks"] = int(spec.kv_cache_gb * 2**30 // (per_token * spec.block_size))
        self.runner: ModelRunner | None = None
        self.counts: dict[int, torch.Tensor] = {}  # MoE layer -> tokens per expert, cumulative
        self._step_counts: list[tuple[int, torch.Tensor]] = []
        for i, block in self.model.blocks.items():
            if isinstance(block.mlp, MoE):
                block.mlp.register_forward_hook(self._count_hook(int(i)))
        self.sends: list = []  # in-flight sends to the next stage
        self.stats = {"steps": 0, "step_seconds": 0.0, "tokens": 0, "counted_steps": 0, "counted_seconds": 0.0,
                      "collective_seconds": 0.0, "last_counted": None}

    def _count_hook(self, layer: int):
        def hook(module, args, out):
            self._step_counts.append((layer, out[1].tokens_per_expert_E.cpu()))
        return hook

    def _peer(self, pp_rank: int) -> int:
        return pp_rank * self.spec.tp + self.tp_rank

    def step(self, step_id: int, items: list[RunItem], count: bool) -> None:
        import torch.distributed as dist

        from moekit.parallel.collectives import CollectiveCounter

        t0 = time.perf_counter()
        T = sum(len(it.token_ids) for it in items)
        counter = CollectiveCounter() if count else None
        with torch.inference_mode(), counter if counter is not None else contextlib.nullcontext():
            inputs = None
            if not self.first:
                inputs = torch.empty(1, T, self.cfg.d_model, dtype=self.dtype, device=self.runner.device)
                dist.recv(inputs, src=self._peer(self.pp_rank - 1))
            out = self.runner.forward(items, inputs)
            if not self.last:
                self.sends = [w for w in self.sends if not w.is_completed()]
                self.sends.append(dist.isend(out.contiguous(), dst=self._peer(self.pp_rank + 1)))
        for layer, c in self._step_counts:
            self.counts[layer] = self.counts.get(layer, 0) + c
        counts_LE = torch.stack([c for _, c in self._step_counts]) if self._step_counts else None
        self._step_counts = []
        if self.last and self.tp_rank == 0:
            assert isinstance(out, RunOutput)
            _send(self.conn, ("output", step_id, out.logits_RV, counts_LE))
        dt = time.perf_counter() - t0
        st = self.stats
        st["steps"] += 1
        st["step_seconds"] += dt
        st["tokens"] += T
        if counter is not None:
            st["counted_steps"] += 1
            st["counted_seconds"] += dt
            st["collective_seconds"] += counter.seconds
            st["last_counted"] = {"tokens": T, "logit_rows": sum(it.num_logits for it in items),
                                  "payload": counter.payload_by_kind(), "calls": counter.calls_by_kind(),
                                  "seconds": counter.seconds, "step_seconds": dt}

    def metrics(self) -> dict:
        st, cfg = self.stats, self.cfg
        lo, hi = 0, cfg.n_expert
        if self.spec.ep > 1:
            per = cfg.n_expert // self.spec.ep
            lo, hi = self.tp_rank * per, (self.tp_rank + 1) * per
        cache = self.runner.cache if self.runner else None
        return {**self.info, **{k: v for k, v in st.items()},
                "kv_blocks": cache.num_blocks if cache else 0, "kv_cache_bytes": cache.nbytes if cache else 0,
                "experts": [lo, hi],
                "tokens_per_expert": {str(layer): c[lo:hi].tolist() for layer, c in sorted(self.counts.items())},
                "collective_share": st["collective_seconds"] / st["counted_seconds"] if st["counted_seconds"] else 0.0,
                "rss_bytes": _rss_bytes()}

    def serve(self) -> None:
        _send(self.conn, ("ready", self.rank, self.info))
        while True:
            msg = _recv(self.conn)
            kind = msg[0]
            if kind == "step":
                _, step_id, items, count = msg
                self.step(step_id, items, count)
            elif kind == "cache":
                _, num_blocks, block_size = msg
                cache = PagedKVCache(self.cfg, num_blocks, block_size, self.dtype, worker_device(self.spec, self.rank),
                                     layers=self.layers, n_kv_head=self.n_kv_head)
                self.runner = ModelRunner(self.model, cache)
            elif kind == "metrics":
                _send(self.conn, ("metrics", self.rank, self.metrics()))
            elif kind == "stop":
                for w in self.sends:
                    w.wait()
                return


def _rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS), or its anonymous part (RssAnon: what it allocated, without the
    checkpoint's memory-mapped file pages), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def init_worker_group(spec: WorkerSpec, rank: int, init_method: str | None = None):
    """Join the process group (gloo on a CPU, NCCL on GPUs) and build the (pp, tp) mesh; the tensor mesh."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if spec.device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=spec.world_size,
                                timeout=timedelta(minutes=10))
    mesh = init_device_mesh(spec.device.split(":")[0], (spec.pp, spec.tp), mesh_dim_names=("pp", "tp"))
    return mesh["tp"]


def run_worker(spec: WorkerSpec, rank: int, address, authkey: bytes, init_method: str | None = None) -> None:
    """Connect to the driver, load this rank's shard, serve steps until told to stop (or the driver goes)."""
    conn = no_delay(Client(address, authkey=authkey))
    try:
        _send(conn, ("progress", rank, "joining the process group"))
        tp_mesh = init_worker_group(spec, rank, init_method)
        Worker(spec, rank, conn, tp_mesh).serve()
    except (EOFError, ConnectionError):  # the driver went away: nothing to report to
        return
    except BaseException:
        try:
            _send(conn, ("error", rank, traceback.format_exc()))
        except OSError:
            pass
        raise


def run_in_thread(spec: WorkerSpec, rank: int, address, authkey: bytes) -> threading.Thread:
    """Rank 0 of a torchrun launch runs its worker beside the driver (the process group is already initialised)."""
    t = threading.Thread(target=run_worker, args=(spec, rank, address, authkey), name="moekit-worker-0", daemon=True)
    t.start()
    return t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moekit.infer.worker")
    p.add_argument("--model", required=True)
    for flag in ("--tp", "--pp", "--ep"):
        p.add_argument(flag, type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--driver", required=True, help="HOST:PORT of the driver's socket")
    p.add_argument("--init-method", required=True)
    a = p.parse_args(argv)
    spec = WorkerSpec(a.model, a.tp, a.pp, a.ep, a.dtype, a.device, a.kv_cache_gb, a.block_size)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    host, port = a.driver.rsplit(":", 1)
    authkey = bytes.fromhex(os.environ.pop("MOEKIT_WORKER_KEY"))
    try:
        run_worker(spec, a.rank, (host, int(port)), authkey, a.init_method)
    except BaseException:
        sys.exit(1)


if __name__ == "__main__":
    main()


__all__ = ["COUNT_EVERY", "WorkerSpec", "_recv", "_send", "build_stage", "check_layout", "no_delay", "run_in_thread",
           "run_worker"]
