"""`moekit train --init-from RUN --vision`: stage 2 of GPT-4's recipe as the article tells it (SPEC section 5).

Stage 1 is a text-only run. Stage 2 adds a vision encoder, a Perceiver resampler and gated cross-attention
layers (moekit/model/vision.py) to its trained weights and trains on image-text data, mixing in text so
that the language model does not forget:

    moekit train                                            # stage 1: runs/tiny
    moekit train --init-from runs/tiny --vision             # stage 2: runs/tiny-vision, ~4 minutes
    moekit train --init-from runs/tiny --vision --freeze-lm # Flamingo: only the new layers learn
    moekit train --init-from runs/tiny --vision --data-images ./my_pictures   # captions.jsonl + images

The image marker `<image>` becomes a special token of the run's tokenizer (a new id; the vocabulary grows by
one row when the tokenizer fills it). Gates start at 0, so step 0 is the text model exactly; the loss is
over every text token (Flamingo's): answers alone leave closed gates without a signal worth following.
Before and after, it reports text bits per byte on the text run's validation windows and multiple-choice
accuracy on held-out scenes (new images of seen combinations, and held-out colour-shape combinations)
for the vision model and for the text-only model asked the same questions. The run folder is an ordinary
moekit run (config.json with `vision`, tokenizer.json, checkpoints/), so `moekit generate --image` and
`moekit serve` load it; `vision_report.json` holds the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from moekit.config import ModelConfig, VisionConfig
from moekit.resolve import load_config, save_config
from moekit.train.checkpoint import CKPT_DIR, load_latest, save_checkpoint
from moekit.train.config import TrainConfig
from moekit.train.image_text import io_stats, load_image_text, scene_examples
from moekit.train.scenes import IMAGE, SceneConfig, mc_items
from moekit.train.setup import check_out_dir, create_out_dir, prepare_data
from moekit.train.tokenizer import load_tokenizer
from moekit.train.vision_batch import VisionSampler
from moekit.train.vision_eval import mc_accuracy
from moekit.train.vision_pretrain import pretrain_encoder
from moekit.util import atomic_write_text

VISION_LR = 2e-3  # the new layers' learning rate (from scratch); the LM's is --lr (a tenth of stage 1's)
# The tanh gates are scalars that must open from 0 before anything behind them learns (vision.py): Adam moves a
# parameter by about its learning rate per step, so at VISION_LR a gate would need hundreds of steps to open.
GATE_LR_MULT = 10
EVAL_ITEMS = 240  # multiple-choice items per split


def add_vision_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage 2: vision (with --init-from RUN)")
    g.add_argument("--vision", action="store_true", help="add a vision encoder + gated cross-attention to the "
                   "--init-from run and train on image-text data")
    g.add_argument("--freeze-lm", action="store_true", help="train only the new vision layers (Flamingo)")
    g.add_argument("--data-images", metavar="DIR", help="a folder of images + captions.jsonl (default: rendered "
                   "scenes)")
    g.add_argument("--scenes", type=int, default=6000, help="rendered training scenes (default 6000)")
    g.add_argument("--scene-objects", type=int, default=1, help="shapes per rendered scene, 1-3 (default 1; more "
                   "objects need a longer run)")
    g.add_argument("--encoder-steps", type=int, default=500, help="contrastive pre-training steps of the encoder "
                   "before it is frozen (default 500; 0 = none, the encoder trains with the rest)")
    g.add_argument("--eval-items", type=int, default=EVAL_ITEMS, help=f"multiple-choice questions per held-out "
                   f"split (default {EVAL_ITEMS})")
    g.add_argument("--text-mix", type=float, default=0.25, help="share of text-only rows per batch (default 0.25)")
    g.add_argument("--vision-lr", type=float, default=VISION_LR, help=f"learning rate of the new layers "
                   f"(default {VISION_LR:g})")


def check_args(args: argparse.Namespace) -> None:
    if not args.init_from:
        raise ValueError("--vision adds vision to a trained text model: pass --init-from RUN (a stage-1 run)")
    if args.resume:
        raise ValueError("--vision with --resume is not supported: start stage 2 again with --init-from")
    if args.nproc not in (None, 1):
        raise ValueError("--vision trains in one process: drop --nproc")
    if not 0 <= args.text_mix < 1:
        raise ValueError(f"--text-mix {args.text_mix}: the share of text rows must be in [0, 1)")
    if args.scenes < 1:
        raise ValueError(f"--scenes {args.scenes}: must be >= 1")
    if args.eval_items < 1:
        raise ValueError(f"--eval-items {args.eval_items}: must be >= 1")
    if not 1 <= args.scene_objects <= 3:
        raise ValueError(f"--scene-objects {args.scene_objects}: choose 1, 2 or 3")
    if args.encoder_steps < 0:
        raise ValueError(f"--encoder-steps {args.encoder_steps}: must be >= 0")
    if not 0 < args.vision_lr < 1:
        raise ValueError(f"--vision-lr {args.vision_lr}: must be in (0, 1)")


def add_marker(tokenizer) -> int:
    """The `<image>` special token's id, added to the tokenizer if it is not there yet."""
    if tokenizer.token_to_id(IMAGE) is None:
        tokenizer.add_special_tokens([IMAGE])
    return tokenizer.token_to_id(IMAGE)


def vision_config(text: ModelConfig, image_token_id: int) -> ModelConfig:
    """The stage-2 model: the text model's config (its vocabulary grown to hold the marker if needed) plus the
    default VisionConfig (moekit/config.py; the `tiny-vision` preset's numbers)."""
    cfg = text.replace(vocab_size=max(text.vocab_size, image_token_id + 1))
    every = 2 if text.n_layer >= 4 else 1
    return cfg.replace(name=f"{text.name}-vision", vision=VisionConfig(cross_attn_every=every,
                                                                       image_token_id=image_token_id))


def grow_from(model, text_tensors: dict[str, torch.Tensor]) -> None:
    """Copy the text model into the vision model; vocabulary rows it lacks start at the mean embedding."""
    own = model.state_dict()
    with torch.no_grad():
        for name, t in text_tensors.items():
            if name == "lm_head.weight" and model.cfg.tie_embeddings:
                continue  # the same tensor as tok_emb.weight
            if name not in own:
                raise ValueError(f"the text run's tensor {name} has no place in the vision model")
            dst = own[name]
            if dst.shape == t.shape:
                dst.copy_(t)
            else:  # tok_emb / lm_head with one more row: the marker
                dst[:t.shape[0]].copy_(t)
                dst[t.shape[0]:].copy_(t.mean(0) if name.startswith("tok_emb") else torch.zeros_like(dst[0]))


def run_vision(args: argparse.Namespace, given: dict, log) -> int:
    from moekit.model.transformer import Transformer
    from moekit.train.loop import amp_dtype, evaluate, seed_everything

    check_args(args)
    init = Path(args.init_from)
    if not (init / "config.json").is_file() or not (init / CKPT_DIR).is_dir():
        raise ValueError(f"--init-from {init} is not a moekit run with checkpoints")
    text_cfg = load_config(init / "config.json")
    if text_cfg.has_vision:
        raise ValueError(f"--init-from {init} already has vision: train it further without --vision")
    out = Path(args.out or f"runs/{text_cfg.name}-vision")
    check_out_dir(out, args.overwrite)
    tc = TrainConfig(**{**given, "init_from": str(init)})
    seq_len = min(tc.seq_len or text_cfg.max_seq_len, text_cfg.max_seq_len)
    tokenizer = load_tokenizer(init / "tokenizer.json")
    marker = add_marker(tokenizer)
    cfg = vision_config(text_cfg, marker)
    v = cfg.vision
    scene_cfg = SceneConfig(image_size=v.image_size, seed=tc.seed, max_objects=args.scene_objects)
    if args.data_images:
        examples = pretrain_examples = load_image_text(args.data_images, v.image_size)
    else:
        examples = scene_examples("train", args.scenes, scene_cfg)
        # The contrastive step learns from descriptions: a caption names everything in the picture, a question
        # and its answer one thing of it.
        pretrain_examples = scene_examples("train", args.scenes, scene_cfg, forms=("caption",))

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    io = io_stats(examples, encode, v.n_latents, v.image_size)
    log(f"image-text data: {len(examples):,} examples; IO {io.line()}")
    data = prepare_data(tc, seq_len, text_cfg.vocab_size, str(init / "tokenizer.json"), log)  # text rows + val
    seed_everything(tc.seed)
    text_model = Transformer(text_cfg)
    path, _ = load_latest(init, text_model, log=log)
    log(f"stage 1 weights from {path}; <image> is token {marker}; "
        f"cross-attention before blocks {cfg.cross_attn_layers}")
    model = Transformer(cfg)
    model.init_weights(tc.seed)
    grow_from(model, text_model.state_dict())

    # With one shape per scene "how many shapes?" is always "one": no measure of seeing, left out.
    evals = {s: [it for it in mc_items(s, args.eval_items, scene_cfg) if args.scene_objects > 1 or it.kind != "count"]
             for s in ("val", "heldout")}
    device = torch.device("cpu")
    dtype = amp_dtype(tc.dtype, device)  # bf16 autocast where the CPU has bf16 matmuls, as stage 1
    report = {"before": _measure(text_model, encode, evals, data, marker, device, evaluate, with_images=False)}
    log(_report_line("text-only model (stage 1)", report["before"]))
    if args.encoder_steps:  # Flamingo: a contrastively pre-trained encoder, frozen (vision_pretrain.py says why)
        report["encoder_pretraining"] = pretrain_encoder(model, text_model, pretrain_examples, encode,
                                                         args.encoder_steps, seed=tc.seed, log=log)
        model.vision.encoder.requires_grad_(False)
    del text_model

    named = list(model.named_parameters())
    gates = [p for n, p in named if n.endswith("_gate")]
    new = [p for n, p in named if n.startswith(("vision.", "xattn.")) and not n.endswith("_gate") and p.requires_grad]
    lm = [p for n, p in named if not n.startswith(("vision.", "xattn."))]
    for p in lm:
        p.requires_grad_(not args.freeze_lm)
    groups = [{"params": new, "lr": args.vision_lr}, {"params": gates, "lr": args.vision_lr * GATE_LR_MULT}]
    if not args.freeze_lm:
        groups.append({"params": lm, "lr": tc.lr})
    opt = torch.optim.AdamW(groups, betas=(tc.beta1, tc.beta2), weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    rows = max(2, tc.batch_tokens // seq_len)
    sampler = VisionSampler(examples, encode, marker, seq_len, rows,
                            lambda: tuple(t[0] for t in data.mixture.next_batch(1)[:2]), args.text_mix, tc.seed)
    deadline = time.perf_counter() + 60 * tc.max_minutes if tc.max_minutes else math.inf
    step, t0, tokens = 0, time.perf_counter(), 0
    total = tc.steps or None
    model.train()
    log(f"stage 2: {rows} rows of {seq_len} tokens per step ({100 * args.text_mix:g}% text rows), vision lr "
        f"{args.vision_lr:g}, "
        f"LM {'frozen' if args.freeze_lm else f'lr {tc.lr:g}'}")
    while (total is None or step < total) and time.perf_counter() < deadline:
        frac = step / total if total else (time.perf_counter() - t0) / max(1.0, deadline - t0)
        scale = min(1.0, (step + 1) / max(1, tc.warmup_steps)) * (0.55 + 0.45 * math.cos(math.pi * min(frac, 1.0)))
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * scale
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = _loss(model, sampler.next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], tc.grad_clip)
        opt.step()
        step += 1
        tokens += rows * seq_len
        if step % tc.log_every == 0 or step == 1:
            gates = [torch.tanh(layer.attn_gate).abs().item() for layer in model.xattn.values()]
            el = time.perf_counter() - t0
            log(f"step {step} | loss {loss.item():.3f} | |tanh(attn gate)| {sum(gates) / len(gates):.3f} | "
                f"{tokens / el:,.0f} tok/s | {el:.0f}s")
    model.eval()
    report["after"] = _measure(model, encode, evals, data, marker, device, evaluate, with_images=True)
    report["after_without_images"] = {"mc": {k: mc_accuracy(model, encode, items, marker, False)
                                             for k, items in evals.items()}}
    report["gates"] = {k: {"attn": torch.tanh(layer.attn_gate).item(), "mlp": torch.tanh(layer.mlp_gate).item()}
                       for k, layer in model.xattn.items()}
    report.update(steps=step, seconds=round(time.perf_counter() - t0, 1), freeze_lm=bool(args.freeze_lm),
                  scene_objects=args.scene_objects,
                  examples=len(examples), io=io.as_dict() if hasattr(io, "as_dict") else io.line())
    log(_report_line("vision model (stage 2)", report["after"]))

    create_out_dir(out, args.overwrite)
    save_config(cfg, out / "config.json")
    tc.save(out / "train_config.json")
    atomic_write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    save_checkpoint(out, step, model, None, {"step": step, "stage": "vision"}, keep=1)
    atomic_write_text(out / "vision_report.json", json.dumps(report, indent=1) + "\n")
    log(f"saved {out}: moekit generate {out} --image PICTURE \"Q: what colour is the circle? A:\"")
    return 0


def _loss(model, batch) -> torch.Tensor:
    """Flamingo's loss: over every text token of the batch (image-text rows and the plain text rows mixed in)."""
    from moekit.model.vision import VisionInput, image_index

    vision = VisionInput(image_index(batch.idx_BT, model.cfg.vision.image_token_id),
                         visual_ILD=model.encode_images(batch.pixels_ICHW))
    return model(batch.idx_BT, batch.targets_BT, vision=vision).loss


def _measure(model, encode, evals, data, marker: int, device, evaluate, with_images: bool) -> dict:
    text = evaluate(model, data.val, data.token_bytes_V, 8, device, None)
    return {"text_bpb": text["all"]["bpb"],
            "mc": {k: mc_accuracy(model, encode, items, marker, with_images) for k, items in evals.items()}}


def _report_line(who: str, m: dict) -> str:
    mc = m["mc"]
    return (f"{who}: text {m['text_bpb']:.3f} bits/byte | answers right: val {100 * mc['val']['all']:.1f}%, "
            f"held-out combinations {100 * mc['heldout']['all']:.1f}%")
