"""AdamW and the schedules that shape each step: the learning rate (linear warmup, then cosine over steps or over
the time budget) and the batch-size ramp (GPT-4 ramped its batch to 60M tokens, SPEC section 3; GPT-3 over its
first 4-12B tokens, Brown et al. 2020 appendix B), with its split into micro-batches. AdamW with decoupled weight
decay on matrices only (nanoGPT `configure_optimizers`, torchtitan); expert-parallel weights in a group of their own.

Pure functions of the TrainConfig and the state a checkpoint records (moekit/train/loop.py says why that makes
--resume bit-exact); the Trainer and the tests use the same ones.
"""

from __future__ import annotations

import math

import torch

from moekit.train.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay tensors of 2+ dimensions (matmul weights, embeddings, stacked experts), not norms or biases.

    Expert parallelism puts the experts' weights on a mesh of their own (moekit/parallel/expert.py), and the fused
    AdamW kernel takes the tensors of a group together, which DTensor refuses across meshes (or with plain tensors):
    such weights get groups of their own, after the usual two (same hyper-parameters, same update)."""
    decay, no_decay, experts = [], [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (experts if _on_expert_mesh(p) else decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if experts:  # (E, out, in) matrices: decayed
        groups.append({"params": experts, "weight_decay": weight_decay})
    return groups


def _on_expert_mesh(p: torch.Tensor) -> bool:
    mesh = getattr(p, "device_mesh", None)  # a DTensor's mesh; None for a plain tensor
    return mesh is not None and "ep" in (mesh.mesh_dim_names or ())


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, tc.weight_decay)
    kwargs = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # one kernel for all tensors (CPU and CUDA)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_at(step: int, tc: TrainConfig, total_steps: int | None, progress: float | None = None) -> float:
    """Learning rate of the step with 0-based index `step`: linear warmup, then cosine to lr x min_lr_ratio.

    The cosine's progress is (step - warmup) / (total_steps - warmup), or `progress` when given (a
    --max-minutes run measures it in time: the fraction of the post-warmup time budget spent).
    """
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if progress is None:
        if not total_steps:
            return tc.lr
        progress = (step - tc.warmup_steps) / max(1, total_steps - tc.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_tokens_at(tokens_seen: int, tc: TrainConfig) -> float:
    """Tokens per step after `tokens_seen` tokens: linear from batch_tokens_start to batch_tokens."""
    if not tc.batch_tokens_start or tokens_seen >= tc.batch_ramp_tokens:
        return float(tc.batch_tokens)
    frac = tokens_seen / tc.batch_ramp_tokens
    return tc.batch_tokens_start + (tc.batch_tokens - tc.batch_tokens_start) * frac


def sequences_at(tokens_seen: int, tc: TrainConfig, seq_len: int) -> int:
    """Sequences in the next step: the ramp's tokens in whole sequences, at least one per micro-batch."""
    return max(tc.grad_accum, round(batch_tokens_at(tokens_seen, tc) / seq_len))


def micro_sizes(n_seqs: int, grad_accum: int) -> list[int]:
    """Split a step's sequences into `grad_accum` micro-batches as evenly as possible."""
    q, r = divmod(n_seqs, grad_accum)
    return [q + (i < r) for i in range(grad_accum) if q + (i < r) > 0]


def steps_that_fit(step: int, tokens_seen: int, token_budget: float, tc: TrainConfig, seq_len: int) -> int:
    """The total step count when `token_budget` more tokens are trained, following the batch ramp."""
    while True:
        n = sequences_at(tokens_seen, tc, seq_len) * seq_len
        if n > token_budget:
            return step
        token_budget -= n
        tokens_seen += n
        step += 1


__all__ = ["batch_tokens_at", "build_optimizer", "lr_at", "micro_sizes", "param_groups", "sequences_at",
           "steps_that_fit"]
