"""Contrastive pre-training of the vision encoder: stage 2's first part, Flamingo's way (Alayrac et al. 2022,
section 2.1: the vision encoder is pre-trained contrastively on image-text pairs, then frozen).

Trained from scratch through the language model alone, the encoder collapses: at first the image-dependent
part of the visual tokens is noise to the LM, and the quickest way to lower the loss is to shrink it (measured
on the tiny recipe: after 25 steps the resampler's outputs varied across images by 3e-5 of their scale, and
the loss with each image was the loss with shuffled images to 6 digits). So the encoder is first taught to tell
captions apart, CLIP's objective (Radford et al. 2021, a symmetric InfoNCE over a batch with a learned
temperature), against a text embedding the stage-1 LM already has: the mean of its final hidden states over
the caption's tokens, frozen. Works for any image-text data, rendered scenes or a user's folder.

    pretrain_encoder(model, text_model, examples, encode, steps=300, log=print)  # trains model.vision only
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.train.scenes import IMAGE

EMBED = 128  # width of the shared embedding space (CLIP's heads, here two linear maps)


@torch.no_grad()
def caption_embeddings(text_model, encode: Callable[[str], list[int]], texts: Sequence[str]) -> torch.Tensor:
    """(N, D): the frozen LM's final hidden states (after its last norm) averaged over each text's tokens."""
    hidden = {}
    hook = text_model.norm.register_forward_hook(lambda mod, args, out: hidden.__setitem__("x", out))
    try:
        ids = [encode(t.replace(IMAGE, " ").strip())[: text_model.cfg.max_seq_len] or [0] for t in texts]
        out = []
        for i in range(0, len(ids), 64):
            chunk = ids[i:i + 64]
            T = max(len(c) for c in chunk)
            idx_BT = torch.zeros(len(chunk), T, dtype=torch.long)
            mask_BT = torch.zeros(len(chunk), T)
            for b, c in enumerate(chunk):
                idx_BT[b, :len(c)] = torch.tensor(c)
                mask_BT[b, :len(c)] = 1
            text_model(idx_BT)
            h_BTD = hidden["x"].float()
            out.append((h_BTD * mask_BT[..., None]).sum(1) / mask_BT.sum(1, keepdim=True))
        return torch.cat(out)
    finally:
        hook.remove()


def pretrain_encoder(model, text_model, examples: Sequence, encode: Callable[[str], list[int]], steps: int,
                     batch: int = 64, lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train model.vision (encoder, resampler, projection) with CLIP's loss for `steps` batches; its figures."""
    g = torch.Generator().manual_seed(seed)
    texts = [ex.text for ex in examples]
    t0 = time.perf_counter()
    text_emb = caption_embeddings(text_model.eval(), encode, texts)  # once: the LM is frozen here
    D = text_emb.shape[1]
    heads = nn.ModuleDict({"image": nn.Linear(D, EMBED), "text": nn.Linear(D, EMBED)})
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    params = list(model.vision.parameters()) + list(heads.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.vision.train()
    first = last = None
    warmup = max(1, steps // 10)  # without it, the first full-size Adam steps can collapse every embedding to one
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        pick = torch.randint(0, len(examples), (batch,), generator=g)
        pixels_ICHW = torch.stack([examples[int(i)].pixels_CHW for i in pick])
        z_img = F.normalize(heads["image"](model.encode_images(pixels_ICHW).mean(1)), dim=-1)
        z_txt = F.normalize(heads["text"](text_emb[pick]), dim=-1)
        logits = log_scale.clamp(max=math.log(100)).exp() * z_img @ z_txt.T
        # Two examples with the same text are both right answers: the targets spread over them.
        same = (text_emb[pick][:, None] == text_emb[pick][None]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"encoder pre-training step {step + 1}/{steps} | contrastive loss {last:.3f} "
                f"(chance {math.log(batch):.3f}) | {time.perf_counter() - t0:.0f}s")
    return {"steps": steps, "loss_first": first, "loss_last": last, "chance": math.log(batch),
            "seconds": round(time.perf_counter() - t0, 1)}


__all__ = ["caption_embeddings", "pretrain_encoder"]
