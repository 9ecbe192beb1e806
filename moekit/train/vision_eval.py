"""Multiple-choice accuracy of a model on questions about images (the stage-2 recipe's measure).

Each item is a prompt `<image>Q: what colour is the circle? A:` with its choices; a choice's score is
the sum of the log-probabilities of its tokens as the continuation of the prompt (how evaluation
harnesses rank choices, lm-evaluation-harness's `loglikelihood`), and the item is right when the answer
scores highest. A text-only model is asked the same questions without the picture (the marker
removed): it can only guess from the question, which is the baseline the vision model must beat.

    acc = mc_accuracy(model, encode, items, image_token_id, image_size, with_images=True)
    acc["all"], acc["colour"]        # shares right; acc["n"] items
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moekit.images import pixels_from_array
from moekit.model.vision import VisionInput, image_index
from moekit.train.scenes import IMAGE, MCItem


@torch.no_grad()
def choice_scores(model, encode: Callable[[str], list[int]], item: MCItem, image_token_id: int,
                  with_images: bool) -> list[float]:
    """Sum of log p(choice tokens | prompt) for each choice of one item."""
    prompt = item.prompt if with_images else item.prompt.replace(IMAGE, "")
    p_ids = encode(prompt)
    rows = [p_ids + encode(" " + c) for c in item.choices]
    T = max(len(r) for r in rows)
    idx_BT = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx_BT[b, :len(r)] = torch.tensor(r)
    dev = model.tok_emb.weight.device
    idx_BT = idx_BT.to(dev)
    vision = None
    if with_images:
        visual = model.encode_images(pixels_from_array(item.image_HWC)[None].to(dev))
        image_BT = image_index(idx_BT, image_token_id, torch.zeros(len(rows), dtype=torch.long, device=dev))
        vision = VisionInput(image_BT, visual_ILD=visual)  # every row reads the item's one image
    logp_BTV = F.log_softmax(model(idx_BT, vision=vision).logits.float(), dim=-1)
    scores = []
    for b, r in enumerate(rows):
        n = len(p_ids)
        targets = torch.tensor(r[n:], device=dev)
        scores.append(float(logp_BTV[b, n - 1:len(r) - 1].gather(1, targets[:, None]).sum()))
    return scores


def mc_accuracy(model, encode: Callable[[str], list[int]], items: list[MCItem], image_token_id: int,
                with_images: bool) -> dict:
    """Share of items whose answer scores highest, overall ("all") and per question kind; "n" items."""
    was_training = model.training
    model.eval()
    right, total = defaultdict(int), defaultdict(int)
    for item in items:
        scores = choice_scores(model, encode, item, image_token_id, with_images)
        ok = item.choices[max(range(len(scores)), key=scores.__getitem__)] == item.answer
        for key in ("all", item.kind):
            right[key] += ok
            total[key] += 1
    model.train(was_training)
    out = {k: right[k] / total[k] for k in total}
    out["n"] = total["all"]
    return out


__all__ = ["choice_scores", "mc_accuracy"]
