"""What the data-parallel parity test trains, shared by the one-process reference (test_data_parallel.py) and the
ranks (dp_worker.py): the tiny MoE, its seed weights, the global batches and a few AdamW steps.

Not a test module itself (no `test_` prefix). Each data-parallel rank r of D takes the r-th contiguous slice of
every global batch, split further into `micro` micro-batches, as the rank-aware trainer will (issue 10, item 4).
"""

from __future__ import annotations

import torch

from moekit.config import ModelConfig
from moekit.model.transformer import Transformer
from moekit.parallel.data import clip_grad_norm, gradient_sync
from moekit.train.config import TrainConfig
from moekit.train.optim import lr_at

CFG = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=1, d_ff=48, n_expert=4, top_k=2,
                  max_seq_len=32, mlp="swiglu")
STEPS, GLOBAL_BATCH, SEQ = 5, 8, 16
# lr 1e-2: large enough that 5 steps move every weight well past fp32 noise; warmup 0 so that step 0 moves too.
TC = TrainConfig(steps=STEPS, lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=0.5, batch_tokens=GLOBAL_BATCH * SEQ,
                 batch_tokens_start=0, dtype="fp32", device="cpu")


def model_config(aux: bool) -> ModelConfig:
    """The tiny MoE with (aux=True, moekit's defaults) or without the router's load-balancing and z-losses."""
    return CFG if aux else CFG.replace(aux_loss_coef=0.0, z_loss_coef=0.0)


def seed_model(cfg: ModelConfig) -> Transformer:
    """Identical weights in every process: a seeded init is the seed checkpoint of this test."""
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    xy_BT = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return xy_BT[:, :-1], xy_BT[:, 1:]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, *, rank: int = 0, size: int = 1, micro: int = 1,
          all_reduce=None) -> list[dict]:
    """STEPS optimizer steps on this rank's slices; per step: loss terms (averaged over ranks by `all_reduce`,
    a function (tensor, op) -> None), tokens per expert per layer (summed over ranks), the grad norm."""
    records = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, TC, STEPS)
        x_BT, y_BT = global_batch(step)
        b = GLOBAL_BATCH // size
        x_BT, y_BT = x_BT[rank * b:(rank + 1) * b], y_BT[rank * b:(rank + 1) * b]
        losses = torch.zeros(4, dtype=torch.float64)  # loss, ce, aux, z: this rank's mean over its micro-batches
        counts = torch.zeros(CFG.n_moe_layers, CFG.n_expert, dtype=torch.long)
        for i, (x, y) in enumerate(zip(x_BT.chunk(micro), y_BT.chunk(micro), strict=True)):
            with gradient_sync(model, enabled=i == micro - 1):
                out = model(x, y)
                (out.loss / micro).backward()
            terms = [out.loss, out.ce_loss, out.aux_loss, out.z_loss]
            losses += torch.stack([t.detach().double() for t in terms]) / micro
            counts += torch.stack([r.tokens_per_expert_E for r in out.routing])
        if all_reduce is not None:
            all_reduce(losses, "avg")
            all_reduce(counts, "sum")
        grad_norm = clip_grad_norm(model.parameters(), TC.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        records.append({"loss": losses[0].item(), "ce_loss": losses[1].item(), "aux_loss": losses[2].item(),
                        "z_loss": losses[3].item(), "tokens_per_expert": counts.tolist(),
                        "grad_norm": float(grad_norm)})
    return records
