"""The worker of tests/parallel/test_pipeline_bubble.py (and bench/pipeline_bubble.py): 4 spawned ranks, one
pipeline of 4 stages, every schedule and M in one launch; each rank writes the idle fraction the Pipeline itself
measured (moekit/parallel/pipeline.py `Pipeline.times`, the trainer's `pp_idle`) for every step, to rank{r}.json.

The real work is small (a dense 8-layer model of width 8, one sequence of 8 tokens per micro-batch); the stage's
compute is modelled as "device time" of a fixed length per call (V local stages share a rank's forward per micro-batch):

    forward of a chunk          F = F_RANK / V
    full backward of a chunk    2 F                      (t_b = 2 t_f, Narayanan et al. 2021)
    split backward (ZB-V)       F for the input gradient, F for the weight gradient (t_f = t_b = t_w, Qi et al.)

Two clocks (PP_BUBBLE_CLOCK):

- "virtual" (the test's): the Pipeline reads a per-rank modelled device clock (`Pipeline.clock` / `Pipeline.flush`,
  the seams), a Lamport clock (Lamport 1978, "Time, clocks, and the ordering of events"): a compute call starts at
  max(this rank's clock, the time its inputs were finished on the rank that produced them) and advances the clock by
  its duration; the flush is a max over the pipeline's ranks. Producers stamp each finished chunk into a FileStore
  keyed by (case, step, kind, stage, micro-batch), and the consumer reads the stamp. F_RANK = 1: every time is a
  multiple of 1/2, exact in floats, so the step is the schedule's own makespan on ideal devices, the same on any
  host, however loaded: host overhead, scheduling and contention enter no figure.
- "wall" (bench/pipeline_bubble.py's default): the Pipeline reads wall time, and every compute call does its real
  work and then sleeps until its duration (F_RANK = 60 ms, PP_BUBBLE_F) has passed since it began; 4 ranks on 2
  cores then do not compete for the cores (gloo's receive does not spin: `spin_check`). The figures include the
  host's per-hop overhead.

Where the virtual clock's wait sits: a real stage waits for its inputs in the receive before its compute call
(torch's schedules wait on their recv ops, then call forward_one_chunk), outside the Pipeline's compute timer, so the
wait is added by a wrapper around the Pipeline's timed calls (`VirtualDevice.wait_for_inputs`, after attach) and the
duration inside them (`VirtualDevice.patch`, on the class, before attach). Only data dependencies are modelled, as
on devices whose sends do not block (the formula's assumption):

    forward(mb, s)        needs forward(mb, s - 1)
    backward(mb, s)       needs backward(mb, s + 1) (input gradient, full or split) and its own forward(mb, s)
    weight grad(mb, s)    needs backward-input(mb, s) on the same stage

Stage s is on the rank the schedule's placement puts it (interleaved: round robin; ZB-V: the V), read from the stage
(`stage.stage_index`); the micro-batch is the calls' first argument (the schedules pass it positionally).
"""

from __future__ import annotations

import os
import time

import torch

PP = 4
CLOCK = os.environ.get("PP_BUBBLE_CLOCK", "virtual")
# Device time of a micro-batch's forward on a rank (all its local stages together). Wall clock: seconds, large against
# the host's ~1-3 ms per hop, which the formula does not count. Virtual clock: the unit.
F_RANK = float(os.environ.get("PP_BUBBLE_F", "0.060")) if CLOCK == "wall" else 1.0
MS = (4, 8, 16)
# name -> (schedule, stages per rank)
SCHEDULES = {"gpipe": ("gpipe", 1), "1f1b": ("1f1b", 1), "interleaved-1f1b": ("interleaved-1f1b", 2),
             "zero-bubble": ("zero-bubble", 2)}
# The first step of a pipeline also infers the stages' shapes (extra sends): not measured on the wall clock; on the
# virtual one it is measured too (it must read the same as the second: host work does not count).
WARMUP, STEPS = (1, 1) if CLOCK == "wall" else (0, 2)
SEQ = 8
# The dependency check (virtual clock): GPipe, M = 4, with one rank's device twice as slow.
SLOW_RANK, SLOW, SLOW_M = 1, 2.0, 4
COMPUTE_CALLS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")


def model_config():
    from moekit.config import ModelConfig

    # 8 layers: 4 ranks x 2 stages each for the interleaved and V-shaped schedules (1 layer a stage), 2 per stage
    # with one stage per rank. Dense: the modelled device time is the compute; the real one only has to be small.
    return ModelConfig(vocab_size=16, n_layer=8, d_model=8, n_head=2, n_kv_head=1, d_ff=16, max_seq_len=SEQ)


def _patch_stage_class(around):
    """Replace PipelineStage's compute calls on the class (so Pipeline.attach's timer wraps the replacement) by
    `around(kind, stage, mb, duration_in_F, call)`; returns the function that restores them."""
    from torch.distributed.pipelining.stage import _PipelineStageBase as Base

    originals = {n: getattr(Base, n) for n in COMPUTE_CALLS}

    def forward_one_chunk(stage, fwd_chunk_id, *args, **kwargs):
        call = lambda: originals["forward_one_chunk"](stage, fwd_chunk_id, *args, **kwargs)
        return around("F", stage, fwd_chunk_id, 1, call)

    def backward_one_chunk(stage, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        call = lambda: originals["backward_one_chunk"](stage, bwd_chunk_id, loss=loss, full_backward=full_backward,
                                                       last_backward=last_backward)
        return around("B", stage, bwd_chunk_id, 2 if full_backward else 1, call)

    def backward_weight_one_chunk(stage, bwd_chunk_id, *args, **kwargs):
        call = lambda: originals["backward_weight_one_chunk"](stage, bwd_chunk_id, *args, **kwargs)
        return around("W", stage, bwd_chunk_id, 1, call)

    Base.forward_one_chunk = forward_one_chunk
    Base.backward_one_chunk = backward_one_chunk
    Base.backward_weight_one_chunk = backward_weight_one_chunk
    return lambda: [setattr(Base, n, f) for n, f in originals.items()]


class DeviceTime:
    """Wall clock: make every compute call of a PipelineStage last its modelled duration (module docstring)."""

    def __init__(self, f_chunk: float):
        self.f = f_chunk
        self.overruns = 0  # calls whose real work took longer than the modelled duration
        self.overrun_s = 0.0
        self.real_s = 0.0  # wall seconds of the real work inside the calls

    def _around(self, kind, stage, mb, n_f, call):
        t0 = time.perf_counter()
        try:
            return call()
        finally:
            duration = n_f * self.f
            real = time.perf_counter() - t0
            self.real_s += real
            if real > duration:
                self.overruns += 1
                self.overrun_s += real - duration
            else:
                time.sleep(duration - real)

    def patch(self):
        return _patch_stage_class(self._around)


class VirtualDevice:
    """Virtual clock: this rank's modelled device clock, a Lamport clock over the compute calls' data dependencies
    (module docstring). `now` is in units of F_RANK; the Pipeline reads it through `clock` and ends a step with
    `flush`."""

    def __init__(self, store, f_chunk: float, slow: float = 1.0):
        self.store, self.f, self.slow = store, f_chunk, slow
        self.now = 0.0
        self.step = ""  # the store keys' prefix: case and step

    def clock(self) -> float:
        return self.now

    def flush(self, group) -> None:
        """The pipeline flush: every pipeline rank's clock becomes the latest one, the last stage's finish."""
        import torch.distributed as dist

        t = torch.tensor([self.now], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        self.now = float(t)

    def start(self, step: str) -> None:
        """A step begins on every rank at 0 (after the barrier that precedes it)."""
        self.now, self.step = 0.0, step

    def _key(self, kind: str, stage: int, mb: int) -> str:
        return f"{self.step}/{kind}/{stage}/{mb}"

    def _around(self, kind, stage, mb, n_f, call):
        # Inside the Pipeline's timer: the real work (0 device time), then the modelled duration, stamped for the
        # consumers before the schedule sends the output.
        out = call()
        self.now += n_f * self.f * self.slow
        self.store.set(self._key(kind, stage.stage_index, mb), repr(self.now))
        return out

    def patch(self):
        return _patch_stage_class(self._around)

    def _ready(self, kind: str, stage: int, mb: int) -> float:
        # The producer stamped it before sending the data this call has already received (get would block until
        # then otherwise); stamps of this rank's own chunks are behind its clock already, and read the same way.
        return float(self.store.get(self._key(kind, stage, mb)))

    def wait_for_inputs(self, pipe) -> None:
        """Wrap the Pipeline's timed compute calls (outside its timer, where a real stage waits in its receive):
        the clock moves on to the moment the call's inputs were produced, if later than now."""

        def needs(name: str, s: int, n: int) -> list[tuple[str, int]]:
            if name == "forward_one_chunk":
                return [("F", s - 1)] if s > 0 else []
            if name == "backward_one_chunk":
                return [("F", s)] + ([("B", s + 1)] if s < n - 1 else [])
            return [("B", s)]  # the weight gradient of the chunk whose input gradient this stage computed

        for stage in pipe.stages:
            for name in COMPUTE_CALLS:
                timed, deps = getattr(stage, name), needs(name, stage.stage_index, stage.num_stages)

                def waited(mb, *args, _timed=timed, _deps=deps, **kwargs):
                    self.now = max([self.now] + [self._ready(kind, s, mb) for kind, s in _deps])
                    return _timed(mb, *args, **kwargs)

                setattr(stage, name, waited)


def spin_check(rank: int, seconds: float = 0.3) -> dict:
    """Wall clock: CPU seconds a rank spends blocked in gloo's recv (and in an irecv's wait, the pipelining path)
    while its peer sleeps `seconds` before sending: ~0 if gloo waits on a condition, ~`seconds` if it busy-polls."""
    import torch.distributed as dist

    peer, out = rank ^ 1, {}
    for how in ("recv", "irecv_wait"):
        buf = torch.zeros(4)
        dist.barrier()
        if rank % 2 == 0:
            time.sleep(seconds)
            dist.send(buf + 1, peer)
            continue
        w0, c0 = time.perf_counter(), time.process_time()
        if how == "recv":
            dist.recv(buf, peer)
        else:
            dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, peer)])[0].wait()
        out[how] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    dist.barrier()
    return out


def run_case(case: str, schedule: str, v: int, m: int, env, store=None, slow: float = 1.0) -> dict:
    """One pipeline (`schedule`, V = v, M = m) over the 4 ranks, WARMUP + STEPS steps; this rank's measured steps.
    `store` (virtual clock) carries the producers' stamps; `slow` multiplies this rank's device time."""
    import torch.distributed as dist

    from moekit.model.transformer import Transformer
    from moekit.parallel.mesh import ParallelDims
    from moekit.parallel.parallelize import Layout, parallelize
    from moekit.parallel.pipeline import build_pipeline
    from moekit.parallel.stages import PipelineConfig

    cfg = model_config()
    model = Transformer(cfg)
    model.init_weights(seed=0)
    layout = Layout.from_env(ParallelDims(pp=PP), env)
    # Wall clock: no modelled time in the warm-up step, only its shapes matter.
    dev = DeviceTime(0.0) if CLOCK == "wall" else VirtualDevice(store, F_RANK / v, slow)
    restore = dev.patch()
    try:
        pipe = build_pipeline(model, layout, PipelineConfig(schedule, m, v))
        if CLOCK == "virtual":
            pipe.clock, pipe.flush = dev.clock, dev.flush
        pipe.attach([parallelize(part, layout) for part in pipe.parts])
        if CLOCK == "virtual":
            dev.wait_for_inputs(pipe)
        steps = []
        gen = torch.Generator().manual_seed(m)
        for step in range(WARMUP + STEPS):
            xy = torch.randint(0, cfg.vocab_size, (m, SEQ + 1), generator=gen)
            xs, ys = list(xy[:, :-1].split(1)), list(xy[:, 1:].split(1))
            dist.barrier()  # every stage starts the step together (the trainer's steps follow collectives too)
            if CLOCK == "virtual":
                dev.start(f"{case}/{step}")
            elif step == WARMUP:
                dev.f, dev.overruns, dev.overrun_s, dev.real_s = F_RANK / v, 0, 0.0, 0.0
            c0 = time.process_time()
            pipe.step(xs, ys, 1 / m)
            cpu = time.process_time() - c0
            t = pipe.times
            for p in pipe.raw.parameters():
                p.grad = None
            if step >= WARMUP:
                steps.append({"wall": t.wall, "compute": t.compute, "idle": t.idle_fraction, "cpu_s": cpu})
        out = {"steps": steps, "owned": pipe.owned}
        if CLOCK == "wall":
            out.update(overruns=dev.overruns, overrun_s=dev.overrun_s, real_s=dev.real_s)
        return out
    finally:
        restore()


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from spawn import rank_main

    from moekit.parallel.mesh import DistEnv

    def body(result: dict) -> None:
        import torch.distributed as dist

        env = DistEnv(rank, world, rank, torch.device("cpu"))
        store = None
        if CLOCK == "wall":
            result["spin"] = spin_check(rank)
        else:
            store = dist.FileStore(os.path.join(out_dir, "clock_store"), world)
        result["clock"] = CLOCK
        only = os.environ.get("PP_BUBBLE_SCHEDULES")  # a subset, for a quick look (bench/pipeline_bubble.py)
        for name, (schedule, v) in SCHEDULES.items():
            if only and name not in only.split(","):
                continue
            for m in MS:
                result["cases"][f"{name}_m{m}"] = run_case(f"{name}_m{m}", schedule, v, m, env, store)
        if CLOCK == "virtual":  # the dependency check: one rank's device twice as slow
            result["slow"] = run_case("slow", "gpipe", 1, SLOW_M, env, store, SLOW if rank == SLOW_RANK else 1.0)

    rank_main(rank, world, init_file, out_dir, body)
