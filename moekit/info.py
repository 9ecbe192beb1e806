"""`moekit info PRESET|PATH [--json]`: the model card of a configuration.

Parameters (total and active, by component), forward FLOPs per token, KV-cache bytes per token
(and what full multi-head attention would need), and the bytes of the weights per precision; for a
vision model (SPEC section 5) also its vision side: encoder, resampler, projector and cross-attention
parameters and their share, FLOPs per image and the encoder cache per image.
All figures come from `moekit.counts`, which tests hold equal to the built model's `numel()`.
"""

from __future__ import annotations

import argparse
import json

from moekit.config import ModelConfig
from moekit.counts import count_params, encoder_cache_bytes, flops_per_token, kv_bytes_per_token, vision_flops_per_image
from moekit.resolve import apply_overrides, resolve_config

PRECISIONS = {"fp32": 4, "bf16": 2, "int8": 1}


def model_card(cfg: ModelConfig) -> dict:
    c = count_params(cfg)
    f0 = flops_per_token(cfg)
    f_ctx = flops_per_token(cfg, context=cfg.max_seq_len)
    card = {
        "name": cfg.name,
        "config": cfg.to_dict(),
        "params": c.as_dict(),
        "flops_per_token": {
            "matmul": f0.matmul,  # 2 x active matmul parameters
            "attention_at_max_context": f_ctx.attention,
            "max_context": cfg.max_seq_len,
            "attention_per_context_token": 4 * cfg.n_layer * cfg.q_dim,
        },
        "kv_bytes_per_token_bf16": {
            "this_model": kv_bytes_per_token(cfg, 2),
            "with_mha": kv_bytes_per_token(cfg, 2, n_kv_head=cfg.n_head),
            "n_kv_head": cfg.n_kv_head,
            "n_head": cfg.n_head,
        },
        "weight_bytes": {p: {"total": c.total * b, "active": c.active * b} for p, b in PRECISIONS.items()},
    }
    if cfg.has_vision:
        card["vision"] = vision_card(cfg)
    return card


def vision_card(cfg: ModelConfig) -> dict:
    c, v = count_params(cfg), cfg.vision
    return {
        "params": {"encoder": c.vision_encoder, "resampler": c.vision_resampler, "projector": c.vision_projector,
                   "cross_attn": c.cross_attn, "total": c.vision, "text_model": c.text,
                   "share_of_text_model": c.vision / c.text, "share_of_total": c.vision / c.total,
                   "per_image": c.per_image},
        "cross_attn_layers": cfg.cross_attn_layers,
        "n_patches": v.n_patches,
        "n_latents": v.n_latents,
        "flops_per_image": vision_flops_per_image(cfg).as_dict(),
        "cross_attention_flops_per_token": flops_per_token(cfg).cross_attention,
        "encoder_cache_bytes_per_image_bf16": encoder_cache_bytes(cfg, 2),
    }


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{suffix}{unit}"
    return f"{n:,.0f}{unit}"


def format_card(card: dict) -> str:
    cfg, p, f, kv = card["config"], card["params"], card["flops_per_token"], card["kv_bytes_per_token_bf16"]
    attn = {1: "MQA", cfg["n_head"]: "MHA"}.get(cfg["n_kv_head"], "GQA")
    moe = (f"{cfg['n_expert']} experts, top-{cfg['top_k']}, {cfg['d_ff']:,} hidden ({cfg['mlp']})"
           if cfg["n_expert"] > 1 else f"dense MLP, {cfg['d_ff']:,} hidden ({cfg['mlp']})")
    lines = [
        f"{card['name']}: {cfg['n_layer']} layers, d_model {cfg['d_model']:,}, {cfg['n_head']} query heads x "
        f"{cfg['head_dim']} ({attn}, {cfg['n_kv_head']} KV head{'s' if cfg['n_kv_head'] > 1 else ''}), {moe}, "
        f"vocab {cfg['vocab_size']:,}, context {cfg['max_seq_len']:,}",
        "",
        "parameters",
        f"  total              {human(p['total']):>12}   ({p['total']:,})",
        f"  active per token   {human(p['active_per_token']):>12}   ({p['active_per_token']:,})",
    ]
    if card.get("vision"):
        lines[-1] += " for a text token that sees an image"
    if cfg["n_expert"] > 1:
        lines.append(f"  one expert         {human(p['per_expert']):>12}   (its MLP summed over the MoE layers)")
        lines.append(f"  all experts        {human(p['experts']):>12}")
    for key in ("attention", "dense_mlp", "router", "embedding", "lm_head", "norms"):
        if p[key]:
            lines.append(f"  {key:<18} {human(p[key]):>12}")
    lines += [
        "",
        "forward FLOPs per token",
        f"  2 x active matmul  {human(f['matmul'], 'FLOP'):>12}",
        f"  + attention        {human(f['attention_at_max_context'], 'FLOP'):>12}   at {f['max_context']:,} "
        f"tokens of context ({human(f['attention_per_context_token'], 'FLOP')} per context token)",
        *([f"  + cross-attention  {human(card['vision']['cross_attention_flops_per_token'], 'FLOP'):>12}   over the "
           f"{card['vision']['n_latents']} visual tokens of its image"] if card.get("vision") else []),
        "",
        "KV cache per token (bf16)",
        f"  this model ({attn})  {human(kv['this_model'], 'B'):>11}",
        f"  with full MHA      {human(kv['with_mha'], 'B'):>12}   ({kv['with_mha'] / kv['this_model']:.0f}x)",
        "",
        "weights",
    ]
    for prec, b in card["weight_bytes"].items():
        lines.append(f"  {prec:<5} total {human(b['total'], 'B'):>11}   active {human(b['active'], 'B'):>11}")
    if card.get("vision"):
        lines += ["", *format_vision(card["vision"], cfg["vision"])]
    return "\n".join(lines)


def format_vision(vc: dict, v: dict) -> list[str]:
    p, f = vc["params"], vc["flops_per_image"]
    layers = vc["cross_attn_layers"]
    shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
    return [
        f"vision: {v['image_size']} px images, {vc['n_patches']} patches of {v['patch_size']} px, "
        f"{vc['n_latents']} visual tokens each; {len(layers)} cross-attention layers (before blocks {shown})",
        f"  on top of the text {human(p['total']):>12}   ({p['share_of_text_model']:.2%} of the text model's "
        f"{human(p['text_model'])}; {p['share_of_total']:.2%} of the total)",
        f"  encoder (ViT)      {human(p['encoder']):>12}   ({v['n_layer']} layers, width {v['d_model']:,})",
        f"  resampler          {human(p['resampler']):>12}   ({v['resampler_layers']} layer"
        f"{'s' if v['resampler_layers'] > 1 else ''})",
        f"  projector          {human(p['projector']):>12}",
        f"  cross-attention    {human(p['cross_attn']):>12}   (dense: every token that sees an image uses them)",
        f"  FLOPs per image    {human(f['total'], 'FLOP'):>12}   forward, once per image (encoder "
        f"{human(f['encoder'], 'FLOP')}, resampler {human(f['resampler'], 'FLOP')}, cross-attention K/V "
        f"{human(f['cross_kv'], 'FLOP')})",
        f"  encoder cache      {human(vc['encoder_cache_bytes_per_image_bf16'], 'B'):>12}   per image (bf16): "
        "cross-attention K/V of its visual tokens, kept per request",
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset name, a moekit run folder or a Hugging Face model folder")
    p.add_argument("--json", action="store_true", help="print the card as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = apply_overrides(resolve_config(args.model), args.overrides)
    card = model_card(cfg)
    print(json.dumps(card, indent=2) if args.json else format_card(card))
    return 0
