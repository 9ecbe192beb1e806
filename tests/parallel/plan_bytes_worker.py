"""One rank of tests/parallel/test_plan_bytes.py (2 ranks) and test_plan_bytes_4.py (4): trains every layout for a
few steps and measures, on this rank, the bytes its sharded model holds and the bytes its collectives carry.

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/parallel/plan_bytes_worker.py OUT_DIR

Each layout is moekit's own trainer (`moekit.train.loop.Trainer` with a `Layout`: parallelize -> build_optimizer ->
shard_optimizer, then `train_step`) on random tokens, fp32. Every step runs inside a
`moekit.parallel.collectives.CollectiveCounter`; right after the optimizer's step (its state exists, the gradients
are not yet
cleared) `held_bytes` reads the local weights, gradients and AdamW state. "ddp_hook" is DDP with a communication
hook that records each gradient bucket it is handed, then reduces it as DDP would (torch's `allreduce_hook`): a
count of DDP's C++ reducer independent of the dispatch-mode counter. Rank r writes `rank{r}.json`; the tests assert
on the numbers. The test files import this module too, for `launch` (one torchrun launch) and `plan_for` (what
`moekit plan train` says of a run).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from moekit import plan
from moekit.model.transformer import Transformer
from moekit.parallel.collectives import CollectiveCounter, held_bytes
from moekit.parallel.mesh import ParallelDims, destroy_distributed, init_distributed
from moekit.parallel.parallelize import Layout
from moekit.presets import get_preset
from moekit.train.config import TrainConfig
from moekit.train.data import Mixture, PackedSource
from moekit.train.loop import Trainer

SEQ, SEQS = 64, 4  # each step's global batch: 4 sequences of 64 tokens
# name -> (--zero, --tp, sequence parallel, DDP bucket hook)
LAYOUTS = {
    "ddp": (0, 1, True, False),
    "ddp_hook": (0, 1, True, True),
    "zero1": (1, 1, True, False),
    "fsdp2": (2, 1, True, False),
    "fsdp3": (3, 1, True, False),
    "tp2": (0, 2, True, False),
    "tp2_nosp": (0, 2, False, False),
    # 4 ranks, a 2 x 2 mesh: data parallel over tensor-parallel pairs
    "ddp_x_tp2": (0, 2, True, False),
    "fsdp3_x_tp2": (3, 2, True, False),
    "zero1_x_tp2": (1, 2, True, False),  # ZeRO-1 over each tensor rank's shards (moekit.parallel.data ShardedZero1)
}
# gpt4-mini with 2 of its 8 layers: every tensor keeps its shape (74M parameters instead of 282M), so that DDP's
# 1.5 GB per rank fits beside other jobs; its full size is checked on the meta device (test_plan_bytes.py).
MODELS = {"tiny": (get_preset("tiny"), 3, ("ddp", "ddp_hook", "zero1", "fsdp2", "fsdp3", "tp2", "tp2_nosp")),
          "gpt4-mini": (get_preset("gpt4-mini").replace(n_layer=2), 1, ("ddp", "zero1", "fsdp2", "fsdp3", "tp2"))}
# tests/parallel/test_plan_bytes_4.py
MODELS_4 = {"tiny": (get_preset("tiny"), 3, ("ddp_x_tp2", "fsdp3_x_tp2", "zero1_x_tp2"))}


def models(world: int) -> dict:
    return MODELS_4 if world == 4 else MODELS


def model_configs() -> dict:
    return {name: cfg for name, (cfg, _, _) in {**MODELS_4, **MODELS}.items()}


def runs(world: int) -> list[tuple[str, str]]:
    return [(m, layout) for m, (_, _, layouts) in models(world).items() for layout in layouts]


def launch(out_dir: Path, world: int, timeout: float = 600) -> list[dict]:
    """Every rank's results from one `torchrun --standalone` launch of this file on `world` gloo ranks."""
    root = Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(Path(__file__).resolve()), str(out_dir)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the {world}-rank launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        if res["error"] is not None:
            raise RuntimeError(f"rank {r} failed:\n{res['error']}")
    return results


def plan_for(model: str, layout: str, world: int) -> tuple[plan.TrainPlan, int, int]:
    """`moekit plan train` for this worker's run of `layout` on `world` ranks: (the plan, dp, tp)."""
    zero, tp, sp, _ = LAYOUTS[layout]
    dp = world // tp
    p = plan.train(model_configs()[model], "H100", n_gpus=world, tokens=1e6, tp=tp, pp=1, zero_stage=zero,
                   batch_tokens=SEQS * SEQ, seq_len=SEQ, micro_batch=SEQS // dp, recompute="none",
                   sequence_parallel=sp, optimizer_precision="fp32")
    return p, dp, tp


def record_buckets(model, seen: list[int]) -> None:
    """A DDP communication hook that notes each bucket's bytes, then all-reduces it as DDP does by default."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, hook)


def run_layout(cfg, name: str, steps: int, env, run_dir: str) -> dict:
    zero, tp, sp, hook = LAYOUTS[name]
    dims = ParallelDims.from_flags(env.world_size, tp=tp, zero=zero, cfg=cfg)
    layout = Layout.from_env(dims, env, sequence_parallel=sp)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 64 * SEQ, dtype=np.uint16)
    tc = TrainConfig(steps=steps, batch_tokens=SEQS * SEQ, batch_tokens_start=0, warmup_steps=0, dtype="fp32",
                     device="cpu", grad_clip=1.0)
    trainer = Trainer(model, tc, SEQ, Mixture([PackedSource("random", 1.0, tokens, SEQ)], 0), {},
                      torch.ones(cfg.vocab_size), run_dir, env.device, None, layout=layout)
    buckets: list[int] = []
    if hook:
        record_buckets(trainer.model, buckets)
    held = {}
    step = trainer.opt.step

    def step_and_measure(*a, **k):  # after the update: AdamW state exists, gradients are still there
        out = step(*a, **k)
        held.update(held_bytes(trainer.model, trainer.opt))
        return out

    trainer.opt.step = step_and_measure
    records = []
    for _ in range(steps):
        buckets.clear()
        t0 = time.perf_counter()
        with CollectiveCounter() as comm:
            trainer.train_step()
        records.append({"payload": comm.payload_by_kind(), "calls": comm.calls_by_kind(),
                        "comm_s": comm.seconds, "step_s": time.perf_counter() - t0, "buckets": list(buckets)})
    return {"held": held, "steps": records, "layout": dims.describe()}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    env = init_distributed("cpu", timeout=120)
    result: dict = {"runs": {}, "error": None}
    try:
        for model_name, (cfg, steps, layouts) in models(env.world_size).items():
            for name in layouts:
                run_dir = Path(out_dir, f"run-{model_name}-{name}")  # the trainer's (rank 0 writes metrics there)
                result["runs"][f"{model_name}/{name}"] = run_layout(cfg, name, steps, env, str(run_dir))
                gc.collect()
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(result))
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
