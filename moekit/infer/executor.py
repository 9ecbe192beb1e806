"""The driver's side of a sharded model: start tp x pp workers, send them each step's plan, take the output.

    group = WorkerGroup(WorkerSpec("runs/tiny", tp=2, pp=2), threads=1)      # spawns 4 workers, waits for them
    engine = Engine(None, codec, executor=group, kv_cache_gb=...)            # the same engine, scheduler, sampler
    ...
    group.close()

The engine calls `submit(items)` (the step's plain-data plan, sent to every worker: vLLM v1's MultiprocExecutor
broadcasts its SchedulerOutput the same way) and later `wait(handle)`, which returns the `RunOutput` that the
last stage's first tensor rank sent back. With a pipeline the engine keeps up to `max_in_flight` = pp steps
submitted, so that every stage has a micro-batch (moekit/infer/worker.py has the worker side).

Failure is loud and quick: each worker's socket has a reader thread, and a worker that exits (a crash, an
out-of-memory kill, SIGKILL) closes it; from then on every `wait`, `submit` and `check` raises `WorkerFailed`
naming the worker (rank, stage, tensor rank, pid, exit status), and the server answers 503 and exits non-zero
(moekit/serve/async_engine.py). `close()` stops the workers and kills any that do not stop.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection, Listener

import torch

from moekit.infer.batch import RunItem, RunOutput
from moekit.infer.worker import WorkerSpec, _recv, _send, no_delay

START_TIMEOUT_S = 600.0  # loading a large shard from a slow disk is slow; a dead worker is seen at once anyway


class WorkerFailed(RuntimeError):
    """A worker died or raised: the sharded model cannot run any more steps."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    def __init__(self, spec: WorkerSpec, *, threads: int = 1, progress: Callable[[str], None] = print,
                 launch: str = "spawn", start_timeout_s: float = START_TIMEOUT_S):
        """Start the workers (launch="spawn": tp x pp child processes) and wait until every one has loaded its shard.
        launch="torchrun": this process is rank 0 of a torchrun launch whose process group is initialised; its own
        worker runs in a thread and the other ranks connect to the address broadcast to them (`serve_torchrun`)."""
        from moekit.counts import kv_bytes_per_token
        from moekit.infer.loader import open_weights

        self.spec, self.progress = spec, progress
        reader = open_weights(spec.model)  # the configuration only (a bad folder fails before anything starts)
        self.cfg = reader.cfg
        reader.close()
        self.kv_bytes_per_token = int(kv_bytes_per_token(self.cfg, torch.finfo(getattr(torch, spec.dtype)).bits // 8))
        self.max_in_flight = spec.pp
        self._authkey = secrets.token_bytes(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=self._authkey)
        self.procs: dict[int, subprocess.Popen] = {}
        self.conns: dict[int, Connection] = {}
        self.infos: dict[int, dict] = {}
        self.failure: str | None = None
        self._lock = threading.Lock()  # one writer per socket at a time (engine thread and /metrics)
        self._futures: dict[int, Future] = {}
        self._metrics: dict[int, Future] = {}
        self._next_id = 0
        self._closing = False
        self._threads: list[threading.Thread] = []
        try:
            if launch == "spawn":
                self._spawn(threads)
            elif launch == "torchrun":
                self._join_torchrun()
            else:
                raise ValueError(f"launch must be spawn or torchrun, got {launch!r}")
            self._accept(start_timeout_s)
        except BaseException:
            self.close()
            raise
        self.output_rank = (spec.pp - 1) * spec.tp  # the last stage's first tensor rank sends the logits
        info = self.infos[0]
        self.capacity_blocks = min(i["kv_capacity_blocks"] for i in self.infos.values())
        self.kv_bytes_per_block = max(i["kv_bytes_per_block"] for i in self.infos.values())
        self.dtype = getattr(torch, spec.dtype)
        self.describe = f"{spec.world_size} workers (tp {spec.tp} x pp {spec.pp}" + (
            f", ep {spec.ep}" if spec.ep > 1 else "") + f"), {info['load_seconds']:.1f} s to load"

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.address

    # ---- start-up -------------------------------------------------------------------------------------------
    def _spawn(self, threads: int) -> None:
        init = f"tcp://127.0.0.1:{_free_port()}"
        host, port = self._listener.address
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MOEKIT_WORKER_KEY": self._authkey.hex()}
        for rank in range(self.spec.world_size):
            cmd = [sys.executable, "-m", "moekit.infer.worker", *self.spec.to_argv(), "--rank", str(rank),
                   "--driver", f"{host}:{port}", "--init-method", init]
            self.procs[rank] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def _join_torchrun(self) -> None:
        """Rank 0 of a torchrun launch: tell the other ranks where the driver listens, run worker 0 in a thread."""
        import torch.distributed as dist

        from moekit.infer.worker import run_in_thread

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.spec.world_size:
            raise ValueError(f"torchrun started {world} processes but --tp {self.spec.tp} x --pp {self.spec.pp} "
                             f"needs {self.spec.world_size}: give --nproc-per-node {self.spec.world_size}")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.spec.device.startswith("cuda") else "gloo")
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        self._listener.close()  # listen where the other ranks can reach: MASTER_ADDR (their rank 0)
        self._listener = Listener((host if host != "localhost" else "127.0.0.1", 0), authkey=self._authkey)
        dist.broadcast_object_list([(self._listener.address, self._authkey.hex())], src=0)
        self._threads.append(run_in_thread(self.spec, 0, self._listener.address, self._authkey))

    def _accept(self, timeout_s: float) -> None:
        """Take every worker's connection, relay their progress, return when all are ready."""
        n = self.spec.world_size
        self._listener._listener._socket.settimeout(1.0)
        deadline = time.monotonic() + timeout_s
        pending: dict[int, Connection] = {}
        unnamed: list[Connection] = []
        while len(self.infos) < n:
            if time.monotonic() > deadline:
                raise WorkerFailed(f"the workers did not load within {timeout_s:.0f} s "
                                   f"({len(self.infos)}/{n} ready)")
            self._check_procs()
            if len(pending) + len(self.infos) + len(unnamed) < n:
                try:
                    unnamed.append(no_delay(self._listener.accept()))
                except TimeoutError:
                    pass
            for conn in list(unnamed) + list(pending.values()):
                while conn.poll(0.05):
                    try:
                        msg = _recv(conn)
                    except (EOFError, OSError):
                        self._check_procs()
                        raise WorkerFailed("a worker closed its connection while loading") from None
                    kind, rank = msg[0], msg[1]
                    if conn in unnamed:
                        unnamed.remove(conn)
                        pending[rank] = conn
                    if kind == "progress":
                        self.progress(f"worker {rank} ({self._where(rank)}): {msg[2]}")
                    elif kind == "ready":
                        self.infos[rank] = msg[2]
                        self.conns[rank] = pending.pop(rank)
                        self.progress(f"worker {rank} ({self._where(rank)}) ready: "
                                      f"{msg[2]['weight_bytes'] / 2**20:.1f} MiB of weights, layers "
                                      f"{msg[2]['layers'][0]}-{msg[2]['layers'][1] - 1}")
                        break
                    elif kind == "error":
                        raise WorkerFailed(f"worker {rank} ({self._where(rank)}) failed while loading:\n{msg[2]}")
        for rank, conn in self.conns.items():
            t = threading.Thread(target=self._read, args=(rank, conn), name=f"moekit-worker-{rank}-reader",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _where(self, rank: int) -> str:
        p, t = self.spec.coords(rank)
        pid = self.procs[rank].pid if rank in self.procs else self.infos.get(rank, {}).get("pid")
        return f"stage {p}, tensor rank {t}" + (f", pid {pid}" if pid else "")

    def _check_procs(self) -> None:
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None and not self._closing:
                raise WorkerFailed(self._died(rank, code))

    def _died(self, rank: int, code: int | None) -> str:
        how = (f"killed by signal {-code}" if code is not None and code < 0 else
               f"exit status {code}" if code is not None else "its connection closed")
        return f"worker {rank} ({self._where(rank)}) died: {how}"

    # ---- steps ------------------------------------------------------------------------------------------------
    def _read(self, rank: int, conn: Connection) -> None:
        """One worker's replies, routed to the futures waiting for them; EOF means the worker is gone."""
        while True:
            try:
                msg = _recv(conn)
            except (EOFError, OSError):
                if self._closing:
                    return
                proc = self.procs.get(rank)
                code = None
                if proc is not None:
                    try:
                        code = proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                self._fail(self._died(rank, code))
                return
            kind = msg[0]
            if kind == "output":
                _, step_id, logits_RV, counts_LE = msg
                fut = self._futures.pop(step_id, None)
                if fut is not None:
                    fut.set_result(RunOutput(logits_RV, counts_LE))
            elif kind == "metrics":
                fut = self._metrics.pop(msg[1], None)
                if fut is not None:
                    fut.set_result(msg[2])
            elif kind == "error":
                self._fail(f"worker {rank} ({self._where(rank)}) raised:\n{msg[2]}")
                return

    def _fail(self, why: str) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = why
            futures = list(self._futures.values()) + list(self._metrics.values())
            self._futures.clear()
            self._metrics.clear()
        for f in futures:
            if not f.done():
                f.set_exception(WorkerFailed(self.failure))

    def check(self) -> None:
        """Raise WorkerFailed if any worker has died (the server's engine thread calls this when idle)."""
        if self.failure is None and not self._closing:
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is not None:
                    self._fail(self._died(rank, code))
        if self.failure is not None:
            raise WorkerFailed(self.failure)

    def _send_all(self, msg) -> None:
        with self._lock:
            if self.failure is not None:
                raise WorkerFailed(self.failure)
            for rank, conn in self.conns.items():
                try:
                    _send(conn, msg)
                except OSError:
                    self.failure = self.failure or self._died(rank, None)
        if self.failure is not None:
            self._fail(self.failure)
            raise WorkerFailed(self.failure)

    def start_cache(self, num_blocks: int, block_size: int) -> None:
        """Every worker allocates its part of the paged KV cache (the driver's KVCacheManager hands out the ids)."""
        if num_blocks > self.capacity_blocks:
            raise ValueError(f"{num_blocks} KV blocks asked, the workers hold {self.capacity_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._send_all(("cache", num_blocks, block_size))

    def submit(self, items: list[RunItem], count: bool | None = None) -> Future:
        """Send one step's plan to every worker; the Future of its output, for `wait`. count: run it inside a
        CollectiveCounter (default: every COUNT_EVERY-th step)."""
        from moekit.infer.worker import COUNT_EVERY

        step_id = self._next_id
        self._next_id += 1
        fut: Future = Future()
        with self._lock:
            self._futures[step_id] = fut
        self._send_all(("step", step_id, items, step_id % COUNT_EVERY == 0 if count is None else count))
        return fut

    def wait(self, fut: Future) -> RunOutput:
        while True:
            try:
                return fut.result(timeout=1.0)
            except TimeoutError:
                self.check()  # a worker that died without closing its socket yet (it will, at exit)

    def forward(self, items: list[RunItem]) -> RunOutput:
        return self.wait(self.submit(items))

    def metrics(self, timeout_s: float = 30.0) -> list[dict]:
        """Each worker's figures (KV blocks, weight bytes, tokens per expert, time in collectives), rank order."""
        futs = {}
        with self._lock:
            if self.failure is not None:
                raise WorkerFailed(self.failure)
            for rank in self.conns:
                futs[rank] = self._metrics[rank] = Future()
        self._send_all(("metrics",))
        return [futs[r].result(timeout=timeout_s) for r in sorted(futs)]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker (politely, then by force) and the listener."""
        self._closing = True
        with self._lock:
            for conn in self.conns.values():
                try:
                    _send(conn, ("stop",))
                except OSError:
                    pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns.values():
            conn.close()
        self._listener.close()

    def kill(self) -> None:
        """Kill every worker now (after a failure the survivors may sit in a collective with a dead peer)."""
        self._closing = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started several (WORLD_SIZE > 1), else None."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def join_as_worker(spec: WorkerSpec) -> None:
    """A torchrun rank other than 0: learn where the driver (rank 0) listens, then be a worker until it stops."""
    import torch.distributed as dist

    from moekit.infer.worker import run_worker

    rank = torchrun_rank()
    if int(os.environ["WORLD_SIZE"]) != spec.world_size:
        raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but --tp {spec.tp} x --pp "
                         f"{spec.pp} needs {spec.world_size}: give --nproc-per-node {spec.world_size}")
    dist.init_process_group("nccl" if spec.device.startswith("cuda") else "gloo")
    got = [None]
    dist.broadcast_object_list(got, src=0)
    address, key = got[0]
    run_worker(spec, rank, tuple(address), bytes.fromhex(key))


__all__ = ["WorkerFailed", "WorkerGroup", "join_as_worker", "torchrun_rank"]
