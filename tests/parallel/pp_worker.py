"""One rank of the pipeline tests: every 2-rank pipeline mode of tests/parallel/test_pipeline.py in one launch.

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/parallel/pp_worker.py OUT.pt

Per mode (a schedule, stages per rank, tied embeddings or not): STEPS fp32 AdamW steps of pp_steps.CFG through the
pipeline from the seed weights; rank 0 writes each step's losses (summed over stages) and grad norm, the final
weights of every stage merged by name, and what each rank held.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pp_steps  # noqa: E402

from moekit.parallel.mesh import ParallelDims, destroy_distributed, init_distributed  # noqa: E402
from moekit.parallel.parallelize import Layout, parallelize  # noqa: E402
from moekit.parallel.pipeline import build_pipeline  # noqa: E402
from moekit.parallel.stages import PipelineConfig  # noqa: E402
from moekit.train.optim import build_optimizer, lr_at  # noqa: E402

# name -> (schedule, stages per rank, tied embeddings)
MODES = {
    "gpipe": ("gpipe", 1, False),
    "1f1b": ("1f1b", 1, False),
    "interleaved-1f1b": ("interleaved-1f1b", 2, False),
    "zero-bubble": ("zero-bubble", 2, False),
    "1f1b_tied": ("1f1b", 1, True),
}


def run_mode(name: str, env) -> dict:
    schedule, v, tied = MODES[name]
    cfg = pp_steps.CFG.replace(tie_embeddings=tied)
    layout = Layout.from_env(ParallelDims(pp=env.world_size), env)
    pipe = build_pipeline(pp_steps.seed_model(cfg), layout, PipelineConfig(schedule, pp_steps.MICRO, v))
    pipe.attach([parallelize(part, layout) for part in pipe.parts])
    opt = build_optimizer(pipe.raw, pp_steps.TC)
    records = []
    for step in range(pp_steps.STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, pp_steps.TC, pp_steps.STEPS)
        xs, ys = pp_steps.micro_batches(step)
        sums = pipe.step(xs, ys, 1 / pp_steps.MICRO)
        dist.all_reduce(sums, group=pipe.group)
        ce, aux, z = sums.tolist()
        norm = pipe.clip_grad_norm(pp_steps.TC.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        records.append({"loss": ce + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z, "ce_loss": ce, "aux_loss": aux,
                        "z_loss": z, "grad_norm": float(norm), "idle": pipe.times.idle_fraction})
    held = {k: v.detach().clone() for k, v in pipe.raw.state_dict().items()}
    everything: list = [None] * env.world_size
    dist.all_gather_object(everything, held)
    return {"records": records, "held": [sorted(h) for h in everything],
            "weights": {k: v for h in everything for k, v in h.items()},
            "copies": [h.get("lm_head.weight") for h in everything], "owned": pipe.owned}


def main(out: str) -> None:
    torch.set_num_threads(1)
    env = init_distributed("cpu", timeout=120)
    try:
        results = {}
        for name in MODES:
            results[name] = run_mode(name, env)
        if env.is_main:
            torch.save(results, out)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
