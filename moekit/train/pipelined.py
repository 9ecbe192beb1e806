"""The trainer's step under pipeline parallelism (`--pp P`): the step's micro-batches through the schedule.

    trainer = Trainer(model, tc, ..., layout=Layout.from_env(dims, env, pipeline=PipelineConfig("1f1b", 8)))
    rec = trainer.train_step()       # calls pipeline_train_step when the layout has pp > 1

`--microbatches M` is the trainer's `--grad-accum M` (one setting, saved in train_config.json): the same M
micro-batches, drawn in the same order and each data rank keeping the same slice, as one process accumulating
gradients over them, so a pipeline run and `--grad-accum M` on one process compute the same step (bitwise with
plain fp32 weights: tests/parallel/test_pipeline_launch.py). What differs is only who computes what.

The batch ramp cannot change a pipeline's micro-batch shape: torch's PipelineStage fixes its send/receive buffers at
its first step, so every step's micro-batches must hold the same number of sequences. A run with --pp must use a
constant batch (--batch-tokens-start 0) that splits into M x dp equal slices; `check_pipeline_batch` refuses
anything else before the first step. (Megatron-LM ramps a pipelined batch by changing the number of micro-batches,
not their size; moekit's ramp grows in single sequences, so it would rebuild the schedule nearly every step.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moekit.train.config import TrainConfig
    from moekit.train.loop import Trainer


def check_pipeline_batch(tc: TrainConfig, seq_len: int, dp: int, n: int) -> None:
    """Raise ValueError (one line) unless every step (`n` sequences: loop.sequences_at) is M micro-batches of the
    same whole number of sequences per data-parallel rank."""
    if tc.batch_tokens_start and tc.batch_tokens_start != tc.batch_tokens:
        raise ValueError("--pp needs a constant batch (a pipeline's micro-batches keep one shape): pass "
                         "--batch-tokens-start 0 to turn the batch ramp off")
    if n % (tc.grad_accum * dp) or n * seq_len != tc.batch_tokens:
        per = tc.grad_accum * dp * seq_len
        raise ValueError(f"--batch-tokens {tc.batch_tokens} does not split into --microbatches {tc.grad_accum} x "
                         f"{dp} data-parallel ranks of whole {seq_len}-token sequences: use a multiple of {per}")


def pipeline_train_step(trainer: Trainer, n_seqs: int, lr: float, micro: list[int]) -> dict:
    """One optimizer step of a pipelined trainer (Trainer.train_step's pipeline branch, which gives the step's
    sequences, learning rate and micro-batch sizes); the same record."""
    tc, s, pipe = trainer.tc, trainer.state, trainer.pipe
    for g in trainer.opt.param_groups:
        g["lr"] = lr
    xs, ys = [], []
    for m in micro:  # every rank draws every micro-batch (the data stream is one process's) and keeps its slice
        x_BT, y_BT, _ = trainer.mixture.next_batch(m)
        lo, hi = trainer.dp_rank * m // trainer.dp_size, (trainer.dp_rank + 1) * m // trainer.dp_size
        xs.append(x_BT[lo:hi].to(trainer.device, non_blocking=True))
        ys.append(y_BT[lo:hi].to(trainer.device, non_blocking=True))
    share = xs[0].shape[0] / n_seqs  # Trainer.train_step's loss weight of a slice: equal for every micro-batch
    with trainer._loss_context(), torch.autocast(trainer.device.type, dtype=trainer.dtype or torch.float32,
                                                  enabled=trainer.dtype is not None):
        sums = pipe.step(xs, ys, share * trainer.dp_size)  # [ce, aux, z] of this rank's stages, x dp_size
    # The gradient's weight is share x dp (data parallelism averages over the dp ranks); the logged terms are this
    # slice's share of the step, summed (not averaged) over the ranks below: as in Trainer.train_step.
    sums /= trainer.dp_size
    torch.distributed.all_reduce(sums, group=pipe.group)  # the stages' terms: the whole model's
    group = trainer.layout.dp_group
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    for routing in pipe.routing_by_microbatch():
        trainer.routing.add(routing)
    grad_norm = pipe.clip_grad_norm(tc.grad_clip).item() if tc.grad_clip > 0 else None
    trainer.opt.step()
    trainer.opt.zero_grad(set_to_none=True)
    s.step += 1
    s.tokens_seen += n_seqs * trainer.seq_len
    ce, aux, z = sums.tolist()
    cfg = trainer.raw.cfg
    moe = cfg.n_moe_layers > 0
    loss = ce + (cfg.aux_loss_coef * aux + cfg.z_loss_coef * z if moe else 0.0)
    return {"loss": loss, "ce_loss": ce, "aux_loss": aux if moe else None, "z_loss": z if moe else None, "lr": lr,
            "grad_norm": grad_norm, "batch_tokens": n_seqs * trainer.seq_len, "pp_idle": pipe.times.idle_fraction}
