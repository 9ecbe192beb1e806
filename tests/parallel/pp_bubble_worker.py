"""The worker of tests/parallel/test_pipeline_bubble.py (and bench/pipeline_bubble.py): 4 spawned ranks, one
pipeline of 4 stages, every schedule and M in one launch; each rank writes the idle fraction the Pipeline itself
measured (moekit/parallel/pipeline.py `Pipeline.times`, the trainer's `pp_idle`) for every step, to rank{r}.json.

Contention (4 ranks, 2 cores). The formula describes a schedule on devices that compute independently; 4 CPU
processes on 2 cores do not: when two stages overlap they share a core and their wall-clock compute inflates. So
the compute of a stage is modelled as a fixed "device time" that costs no CPU: each compute call the Pipeline times
(PipelineStage.forward_one_chunk / backward_one_chunk / backward_weight_one_chunk, patched on the class before
`Pipeline.attach`, so the patched call is the one inside the Pipeline's own timer) does its real work (a dense 8-layer
model of width 8, one sequence of 8 tokens per micro-batch: 1-3 ms a call on the shared cores) and then sleeps
until its modelled duration has passed since it began:

    forward of a chunk          F = F_RANK / V           (V local stages share a rank's per-micro-batch forward)
    full backward of a chunk    2 F                      (t_b = 2 t_f, Narayanan et al. 2021)
    split backward (ZB-V)       F for the input gradient, F for the weight gradient (t_f = t_b = t_w, Qi et al.)

A call's duration is therefore the same whether its process got a core at once or a few milliseconds late, and a
sleeping rank leaves the cores to the others. Waiting in gloo's send/recv does not spin either (measured first,
`spin_check`: a rank blocked 0.3 s in a recv uses ~0 CPU seconds), so a waiting stage does not steal a core from a
computing one. Each step records the rank's CPU seconds (time.process_time) beside its wall time, and every call
whose real work overran its modelled duration is counted (`overruns`): both show the cores were not the bottleneck.
"""

from __future__ import annotations

import os
import time

import torch

PP = 4
# Seconds of modelled forward per micro-batch on a rank (all its local stages together): large against the host's
# ~1-3 ms per hop (test_pipeline_bubble.py), which the formula does not count.
F_RANK = float(os.environ.get("PP_BUBBLE_F", "0.060"))
MS = (4, 8, 16)
# name -> (schedule, stages per rank)
SCHEDULES = {"gpipe": ("gpipe", 1), "1f1b": ("1f1b", 1), "interleaved-1f1b": ("interleaved-1f1b", 2),
             "zero-bubble": ("zero-bubble", 2)}
WARMUP, STEPS = 1, 1  # the first step of a pipeline also infers the stages' shapes (extra sends): not measured
SEQ = 8


def model_config():
    from moekit.config import ModelConfig

    # 8 layers: 4 ranks x 2 stages each for the interleaved and V-shaped schedules (1 layer a stage), 2 per stage
    # with one stage per rank. Dense: the modelled device time is the compute; the real one only has to be small.
    return ModelConfig(vocab_size=16, n_layer=8, d_model=8, n_head=2, n_kv_head=1, d_ff=16, max_seq_len=SEQ)


class DeviceTime:
    """Make every compute call of a PipelineStage last its modelled duration (see the module docstring)."""

    def __init__(self, f_chunk: float):
        self.f = f_chunk
        self.overruns = 0  # calls whose real work took longer than the modelled duration
        self.overrun_s = 0.0
        self.real_s = 0.0  # wall seconds of the real work inside the calls

    def _pad(self, t0: float, duration: float) -> None:
        real = time.perf_counter() - t0
        self.real_s += real
        if real > duration:
            self.overruns += 1
            self.overrun_s += real - duration
        else:
            time.sleep(duration - real)

    def patch(self):
        from torch.distributed.pipelining.stage import _PipelineStageBase as Base

        originals = {n: getattr(Base, n) for n in ("forward_one_chunk", "backward_one_chunk",
                                                   "backward_weight_one_chunk")}
        dev = self

        def forward_one_chunk(stage, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return originals["forward_one_chunk"](stage, *args, **kwargs)
            finally:
                dev._pad(t0, dev.f)

        def backward_one_chunk(stage, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
            t0 = time.perf_counter()
            try:
                return originals["backward_one_chunk"](stage, bwd_chunk_id, loss=loss, full_backward=full_backward,
                                                       last_backward=last_backward)
            finally:
                dev._pad(t0, 2 * dev.f if full_backward else dev.f)

        def backward_weight_one_chunk(stage, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return originals["backward_weight_one_chunk"](stage, *args, **kwargs)
            finally:
                dev._pad(t0, dev.f)

        Base.forward_one_chunk = forward_one_chunk
        Base.backward_one_chunk = backward_one_chunk
        Base.backward_weight_one_chunk = backward_weight_one_chunk
        return lambda: [setattr(Base, n, f) for n, f in originals.items()]


def spin_check(rank: int, seconds: float = 0.3) -> dict:
    """CPU seconds a rank spends blocked in gloo's recv (and in an irecv's wait, the pipelining path) while its peer
    sleeps `seconds` before sending: ~0 if gloo waits on a condition, ~`seconds` if it busy-polls."""
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


def run_case(schedule: str, v: int, m: int, env) -> dict:
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
    dev = DeviceTime(0.0)  # no modelled time in the warm-up step: only its shapes matter
    restore = dev.patch()
    try:
        pipe = build_pipeline(model, layout, PipelineConfig(schedule, m, v))
        pipe.attach([parallelize(part, layout) for part in pipe.parts])
        steps = []
        gen = torch.Generator().manual_seed(m)
        for step in range(WARMUP + STEPS):
            xy = torch.randint(0, cfg.vocab_size, (m, SEQ + 1), generator=gen)
            xs, ys = list(xy[:, :-1].split(1)), list(xy[:, 1:].split(1))
            dist.barrier()  # every stage starts the step together (the trainer's steps follow collectives too)
            if step == WARMUP:
                dev.f, dev.overruns, dev.overrun_s, dev.real_s = F_RANK / v, 0, 0.0, 0.0
            c0 = time.process_time()
            pipe.step(xs, ys, 1 / m)
            cpu = time.process_time() - c0
            t = pipe.times
            for p in pipe.raw.parameters():
                p.grad = None
            if step >= WARMUP:
                steps.append({"wall_s": t.wall, "compute_s": t.compute, "idle": t.idle_fraction, "cpu_s": cpu})
        return {"steps": steps, "overruns": dev.overruns, "overrun_s": dev.overrun_s, "real_s": dev.real_s,
                "owned": pipe.owned}
    finally:
        restore()


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from spawn import rank_main

    from moekit.parallel.mesh import DistEnv

    def body(result: dict) -> None:
        env = DistEnv(rank, world, rank, torch.device("cpu"))
        result["spin"] = spin_check(rank)
        only = os.environ.get("PP_BUBBLE_SCHEDULES")  # a subset, for a quick look (bench/pipeline_bubble.py)
        for name, (schedule, v) in SCHEDULES.items():
            if only and name not in only.split(","):
                continue
            for m in MS:
                result["cases"][f"{name}_m{m}"] = run_case(schedule, v, m, env)

    rank_main(rank, world, init_file, out_dir, body)
