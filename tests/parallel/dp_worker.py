"""One rank of the data-parallel parity test: every mode of tests/parallel/test_data_parallel.py in one launch.

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/parallel/dp_worker.py OUT.pt

Rank 0 writes, for each mode, every step's losses and routing counts (averaged / summed over the ranks), the final
weights (whole), each rank's optimizer-state bytes and what the MoE's grouped kernel received under FSDP2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dp_steps  # noqa: E402

import moekit.model.moe as moe_module  # noqa: E402
from moekit.parallel.data import (  # noqa: E402
    apply_data_parallel,
    full_state_dict,
    has_fsdp2,
    optimizer_state_bytes,
    shard_optimizer,
    unwrap,
)
from moekit.parallel.mesh import ParallelDims, build_mesh, data_rank, destroy_distributed, init_distributed  # noqa: E402
from moekit.train.optim import build_optimizer  # noqa: E402

# name -> (--zero, router losses on, micro-batches per rank)
MODES = {
    "ddp": (0, False, 1),
    "zero1": (1, False, 1),
    "fsdp2": (2, False, 1),
    "fsdp3": (3, False, 1),
    "ddp_accum": (0, False, 2),
    "fsdp3_accum": (3, False, 2),
    "ddp_aux": (0, True, 1),
    "fsdp3_aux": (3, True, 1),
}


def all_reduce(t: torch.Tensor, op: str) -> None:
    dist.all_reduce(t)  # gloo has no ReduceOp.AVG: sum, then divide
    if op == "avg":
        t /= dist.get_world_size()


def record_kernel_inputs(seen: list) -> None:
    """Wrap the grouped expert kernel as moe.py calls it, recording the types and shapes of its weights."""
    kernel = moe_module.grouped_expert_mlp

    def spy(x_ND, counts, w1, w2, w3):
        seen.append([(type(w).__name__, tuple(w.shape)) for w in (w1, w2, w3)])
        return kernel(x_ND, counts, w1, w2, w3)

    moe_module.grouped_expert_mlp = spy


def run_mode(name: str, world: int) -> dict:
    zero, aux, micro = MODES[name]
    dims = ParallelDims.from_flags(world, zero=zero, cfg=dp_steps.CFG)
    mesh = build_mesh(dims, "cpu")
    model = apply_data_parallel(dp_steps.seed_model(dp_steps.model_config(aux)), dims, mesh)
    opt = shard_optimizer(build_optimizer(unwrap(model), dp_steps.TC), dims, mesh)
    rank, size = data_rank(mesh)
    seen: list = []
    if zero >= 2:
        record_kernel_inputs(seen)
    records = dp_steps.train(model, opt, rank=rank, size=size, micro=micro, all_reduce=all_reduce)
    opt_bytes = [None] * world
    dist.all_gather_object(opt_bytes, optimizer_state_bytes(opt))
    return {"records": records, "weights": full_state_dict(model), "opt_bytes": opt_bytes,
            "kernel_inputs": seen[:2], "layout": dims.describe(), "type": type(model).__name__}


def main(out: str) -> None:
    torch.set_num_threads(1)
    env = init_distributed("cpu", timeout=60)
    try:
        results = {}
        original = moe_module.grouped_expert_mlp
        for name in MODES:
            if MODES[name][0] >= 2 and not has_fsdp2():
                continue
            try:
                results[name] = run_mode(name, env.world_size)
            finally:
                moe_module.grouped_expert_mlp = original  # (run_mode's spy, for FSDP2 modes)
        if env.is_main:
            torch.save(results, out)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
