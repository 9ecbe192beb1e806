"""What the pipeline parity test trains, shared by the one-process reference (test_pipeline.py) and the ranks
(pp_worker.py): a 4-layer MoE (so 2 ranks x 2 stages each can interleave), its seed weights, the global batches,
and a few fp32 AdamW steps with gradient accumulation over M micro-batches (the trainer's arithmetic: each
micro-batch's loss x 1/M, then global-norm clipping). Not a test module itself (no `test_` prefix).
"""

from __future__ import annotations

import torch

from moekit.config import ModelConfig
from moekit.model.transformer import Transformer
from moekit.parallel.data import clip_grad_norm
from moekit.train.config import TrainConfig
from moekit.train.optim import lr_at

CFG = ModelConfig(vocab_size=64, n_layer=4, d_model=32, n_head=4, n_kv_head=1, d_ff=48, n_expert=4, top_k=2,
                  max_seq_len=32, mlp="swiglu")
STEPS, GLOBAL_BATCH, SEQ, MICRO = 3, 8, 16, 4
# lr 1e-2 moves every weight far past fp32 noise in 3 steps; clip 0.5 acts at every step (the norm is ~1).
TC = TrainConfig(steps=STEPS, lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=0.5, batch_tokens=GLOBAL_BATCH * SEQ,
                 batch_tokens_start=0, dtype="fp32", device="cpu", grad_accum=MICRO)


def seed_model(cfg: ModelConfig = CFG) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    xy_BT = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return xy_BT[:, :-1], xy_BT[:, 1:]


def micro_batches(step: int, micro: int = MICRO, rank: int = 0, size: int = 1):
    """This data rank's slice of the step's batch, as `micro` equal micro-batches (the trainer's order)."""
    x_BT, y_BT = global_batch(step)
    b = GLOBAL_BATCH // micro
    xs, ys = [], []
    for i in range(micro):
        x, y = x_BT[i * b:(i + 1) * b], y_BT[i * b:(i + 1) * b]
        lo, hi = rank * b // size, (rank + 1) * b // size
        xs.append(x[lo:hi])
        ys.append(y[lo:hi])
    return xs, ys


def train_one_process(model: torch.nn.Module, opt: torch.optim.Optimizer, micro: int = MICRO) -> list[dict]:
    """Gradient accumulation over `micro` micro-batches, exactly Trainer.train_step's (loss x share)."""
    records = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, TC, STEPS)
        sums = torch.zeros(4, dtype=torch.float64)
        for x, y in zip(*micro_batches(step, micro), strict=True):
            out = model(x, y)
            (out.loss * (1 / micro)).backward()
            terms = (out.loss, out.ce_loss, out.aux_loss, out.z_loss)
            sums += torch.stack([t.detach().double() for t in terms]) / micro
        norm = clip_grad_norm(model.parameters(), TC.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        records.append({"loss": sums[0].item(), "ce_loss": sums[1].item(), "aux_loss": sums[2].item(),
                        "z_loss": sums[3].item(), "grad_norm": float(norm)})
    return records
