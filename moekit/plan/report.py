"""The GPT-4 report: every claim of SPEC sections 1-4 with the article's figure, moekit's, the assumptions.

    moekit plan            # the report as text
    moekit plan --json     # the same claims as JSON
    moekit plan --model gpt4-vision      # + section 5, vision, computed on a vision config
    from moekit.plan import gpt4_report; r = gpt4_report(); all(c.agrees for c in r.claims)

Each claim is recomputed from the presets (`moekit.presets`), the counts (`moekit.counts`) and the
cost models (`train.py`, `serve.py`, `wall.py`, `vision.py`); `agrees` says whether moekit lands where
the article does, within the tolerance written beside it. The errata (SPEC section 7) close the report.
Section 5 needs a model with a vision side, whose sizes the article does not give (moekit's gpt4-vision
preset states its assumptions), so it appears only when one is asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moekit.config import ModelConfig
from moekit.counts import count_params, flops_per_token, kv_bytes_per_token
from moekit.plan.hardware import get_gpu
from moekit.plan.layout import as_config, stages
from moekit.plan.serve import expert_coverage, serve
from moekit.plan.train import train
from moekit.plan.vision import IMAGES_PER_TOKEN, IO_TOLERANCE, vision_plan
from moekit.plan.wall import READING_SPEEDS, article_h100, flops_utilization, max_tokens_per_s, wall
from moekit.presets import get_preset

# The serving scenario behind the $ per 1k tokens (SPEC section 4: "8k seqlen, high utilization"):
# 8k-token sequences, half prompt and half output, under continuous batching with a paged KV cache, so
# a decoding sequence holds 4,096 + 4,096 / 2 = 6,144 tokens on average; the cluster is busy all the
# time at the largest batch that fits. A100: fp16 weights and cache (no FP8 tensor cores); H100: FP8
# weights, activations and cache, the H100 feature the article's price gap rests on.
# The article's figures come from its own utilization assumptions (kernels at flat 80% of bandwidth and 70% of peak,
# no launch or dispatch floors): `roofline=True` plans them so; the claim also says where the serving-time model
# from its parts (moekit/plan/serve_time.py, fitted on published measurements) lands.
SCENARIO = {"model": "gpt4", "tp": 8, "pp": 16, "context": 6144, "prompt_len": 4096, "roofline": True}
SERVE_A100 = dict(SCENARIO, gpu="A100-80GB", weight_dtype="bf16", kv_dtype="bf16")
SERVE_H100 = dict(SCENARIO, gpu="H100", weight_dtype="fp8", kv_dtype="fp8")
USEFUL_BATCH = 8  # 8 x top-2 / 16 experts = 1 token per expert: below this each expert sees less than one


@dataclass
class Claim:
    section: str
    claim: str
    article: str
    moekit: str
    assumptions: str
    agrees: bool
    value: float | None = None  # moekit's headline figure, for scripts and tests


@dataclass
class Report:
    claims: list[Claim] = field(default_factory=list)
    errata: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _n(x: float, unit: str = "") -> str:
    """1.83T parameters, 558 GFLOP: B(illion) for counts, G(iga) before a unit."""
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            v = x / scale
            if unit:
                return f"{v:.3g} {suffix}{unit}"
            return f"{v:.3g}{suffix}" if v < 100 else f"{v:,.0f}{suffix}"
    return f"{x:.3g} {unit}".strip()


def within(value: float, target: float, factor: float) -> bool:
    """`value` is within a factor `factor` of `target`, either way."""
    return target / factor <= value <= target * factor


def _gb(x: float) -> str:
    return f"{x / 1e12:.2f} TB" if x >= 1e12 else f"{x / 1e9:.1f} GB"


def _brick_wall() -> list[Claim]:
    h100, art = get_gpu("H100"), article_h100()
    dense = count_params(get_preset("dense-1t")).total
    tps = max_tokens_per_s(dense, h100, 8)
    w_art, w_data = wall(art, 8, 20), wall(h100, 8, 20)
    util_1t = flops_utilization(dense, 20, h100, 8)
    gpt4 = count_params(get_preset("gpt4"))
    ridge = h100.peak_flops("bf16") / h100.bandwidth
    return [
        Claim("1", "8x H100 cannot serve a 1T-parameter dense model at 33.33 tokens/s per user", "cannot",
              f"at most {tps:.1f} tokens/s per user ({2 * tps:.1f} if only the weights were read); its "
              f"{_gb(dense * 2)} of bf16 weights do not even fit in 8 x 80 GB",
              f"dense-1t preset ({_n(dense)} params), batch 1, bf16, 8 x {h100.hbm_gb_s / 1000:g} TB/s, "
              "overhead = weight reads (x2)", tps < READING_SPEEDS["1,000 words/min"], tps),
        Claim("1", "At 20 tokens/s per user, 8x H100 run at under 5% FLOPS utilization", "< 5%",
              f"{util_1t:.2%} of the bf16 peak for the 1T model ({util_1t / 2:.2%} of FP8); "
              f"{w_data.flops_utilization:.2%} for a model at the wall",
              "batch 1: 2 FLOPs per parameter per token against 8 x 989 TFLOP/s", util_1t < 0.05, util_1t),
        Claim("1", "An 8-way H100 system tops out near 300B parameters at 20 tokens/s per user", "~300B",
              f"{_n(w_art.max_params)} with the article's 3 TB/s; {_n(w_data.max_params)} with the "
              "datasheet's 3.35 TB/s", "8 x bandwidth / (2 overhead x 2 B x 20 tok/s), batch 1, bf16",
              abs(w_art.max_params / 300e9 - 1) <= 0.1, w_art.max_params),
        Claim("1", "H100 arithmetic balance ~ 2,000 TFLOP/s / 3 TB/s ~ 667 FLOP/byte; intensity at batch B "
              "~ 2B / bytes per param", "~667",
              f"{art.peak_flops('fp8') / art.bandwidth:.0f} with the article's figures; datasheet "
              f"{ridge:.0f} (bf16) and {2 * ridge:.0f} (FP8): a dense model turns compute-bound at batch "
              f"~{ridge:.0f}, and GPT-4's experts only when each sees that many, at batch "
              f"~{ridge * 16 / 2:,.0f} tokens",
              "2 FLOPs per parameter; bf16 2 B/param at 989 TFLOP/s, FP8 1 B/param at 1,979 TFLOP/s",
              abs(art.peak_flops("fp8") / art.bandwidth / 667 - 1) < 0.01, ridge),
        Claim("1", "Sparsity is the way out: total parameters grow, those read per token do not", "MoE",
              f"GPT-4 holds {_n(gpt4.total)} but reads {_n(gpt4.active)} per token: "
              f"{max_tokens_per_s(gpt4.active, h100, 8):.1f} tokens/s per user on 8 H100 at batch 1, where a "
              f"dense {_n(gpt4.total)} model gets {max_tokens_per_s(gpt4.total, h100, 8):.1f}",
              "as the wall above (datasheet H100)", gpt4.active < w_data.max_params < gpt4.total,
              gpt4.active),
    ]


def _model() -> list[Claim]:
    cfg = get_preset("gpt4")
    c, f = count_params(cfg), flops_per_token(cfg, context=8192)
    mqa, mha = kv_bytes_per_token(cfg, 2), kv_bytes_per_token(cfg, 2, n_kv_head=cfg.n_head)
    return [
        Claim("2", "~1.8T parameters: 16 experts of ~111B + ~55B shared", "1.8T (16 x 111B + 55B)",
              f"{_n(c.total)}: 16 x {_n(c.per_expert)} + {_n(c.attention)} attention + "
              f"{_n(c.embedding + c.lm_head)} embeddings",
              "gpt4 preset: d_model 10,752, 120 layers, 4d GELU experts",
              abs(c.total / 1.8e12 - 1) < 0.03, c.total),
        Claim("2", "~280B active parameters per token (top-2 of 16)", "~280B", _n(c.active),
              "2 experts + attention + embeddings", abs(c.active / 280e9 - 1) < 0.03, c.active),
        Claim("2", "~560 GFLOP per token forward ('TFLOPs' in the article, erratum 1); dense 1.8T ~3.7 TFLOP",
              "560 (G)FLOP",
              f"{_n(f.matmul, 'FLOP')} (+ {_n(f.attention, 'FLOP')} of attention at 8k context); a dense "
              f"model of the same total: {_n(2 * c.total, 'FLOP')}",
              "2 FLOPs per active matmul parameter (Kaplan et al. 2020)",
              abs(f.matmul / 560e9 - 1) < 0.03, f.matmul),
        Claim("2", "Multi-query attention keeps the KV cache small", "MQA (1 KV head)",
              f"{mqa / 1e3:.1f} kB per token with MQA; full multi-head attention ({cfg.n_head} KV heads) "
              f"would need {mqa * cfg.n_head / 1e6:.1f} MB ({mha / mqa:.0f}x)",
              "bf16 cache, 2 x layers x KV heads x head_dim x 2 B", mha / mqa == cfg.n_head, mqa),
    ]


def _training() -> list[Claim]:
    cfg = get_preset("gpt4")
    base = train(cfg, "A100-80GB", 25_000, 13e12, mfu=0.34)
    fast = train(cfg, "A100-80GB", 25_000, 13e12, mfu=0.36)
    slow = train(cfg, "A100-80GB", 25_000, 13e12, mfu=0.32)
    h100 = train(cfg, "H100", 8192, 13e12, days=55, price_per_hour=2.0)
    z3_40 = train(cfg, "A100-40GB", 25_000, 13e12, mfu=0.34, zero_stage=3)
    # The MFU predicted from the layout (moekit/plan/step_time.py), not assumed: plain 1F1B and interleaved 1F1B.
    plain = train(cfg, "A100-80GB", 25_000, 13e12)
    inter = train(cfg, "A100-80GB", 25_000, 13e12, schedule="interleaved", stages_per_rank=2)
    top = sorted(plain.step.shares().items(), key=lambda kv: -kv[1])[:5]
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in top)
    mem = base.memory
    return [
        Claim("3", "~2.15e25 training FLOPs = 6 x active x 13T tokens", "2.15e25",
              f"{base.flops:.3g} ({base.flops / 2.15e25 - 1:+.1%}); attention at 8k would add "
              f"{base.attention_flops_per_token / base.flops_per_token:.0%}",
              "6 x 278.9B matmul-active params x 13T tokens (2 epochs of text, 4 of code, counted as seen)",
              abs(base.flops / 2.15e25 - 1) <= 0.03, base.flops),
        Claim("3", "~25,000 A100 for 90-100 days at 32-36% MFU", "90-100 days",
              f"{fast.days:.1f}-{slow.days:.1f} days (34%: {base.days:.1f}). Predicted from the layout instead of "
              f"assumed: {inter.mfu:.1%} MFU, {inter.days:.0f} days with interleaved 1F1B (2 stages per rank); plain "
              f"1F1B only {plain.mfu:.1%}, {plain.days:.0f} days ({parts}): the article's 32-36% needs an "
              "interleaved schedule (Narayanan et al. 2021) or a larger batch, and leaves nothing for its restarts",
              "312 TFLOP/s bf16 peak, all 25,000 busy; the prediction: moekit/plan/step_time.py, constants fitted on "
              "published runs (`moekit plan calibration`), 8 x 15, 60M-token batches of 8k sequences, full "
              "recomputation, ZeRO-1, FlashAttention",
              89 <= fast.days and slow.days <= 102 and 0.31 <= inter.mfu <= 0.37 and plain.mfu < inter.mfu,
              base.days),
        Claim("3", "~$63M at $1 per A100-hour", "$63M",
              f"${fast.cost / 1e6:.1f}M-${slow.cost / 1e6:.1f}M (34%: ${base.cost / 1e6:.1f}M, "
              f"{base.cost / 63e6 - 1:+.0%}); the article's own 25k x 90-100 days x $1 is $54M-$60M "
              "(erratum 4)",
              "GPU-hours x $1", abs(base.cost / 63e6 - 1) <= 0.15, base.cost),
        Claim("3", "On H100: ~8,192 GPUs, ~55 days, ~$21.5M at $2 per H100-hour", "$21.5M",
              f"${h100.cost / 1e6:.2f}M ({h100.cost / 21.5e6 - 1:+.1%}); that needs {h100.mfu:.0%} MFU of "
              f"the bf16 peak, {h100.mfu * 989 / 1979:.0%} of FP8: the article must assume FP8 training",
              "same 2.2e25 FLOPs, 989 TFLOP/s bf16 (1,979 FP8)",
              abs(h100.cost / 21.5e6 - 1) <= 0.05, h100.cost),
        Claim("3", "60M-token batch = 7.5M tokens per expert", "7.5M", _n(base.tokens_per_expert),
              "60M x top-2 / 16 experts", base.tokens_per_expert == 7.5e6, base.tokens_per_expert),
        Claim("3", "8-way tensor x 15-way pipeline, ~30 GB of FP16 weights per GPU; ZeRO-1 or block FSDP",
              "~30 GB",
              f"{_gb(mem.weights)} of weights per GPU ({base.layers_per_stage[0]} layers per stage); with "
              f"ZeRO-1 a GPU needs {_gb(mem.total)} in all (grads {_gb(mem.gradients)}, Adam "
              f"{_gb(mem.optimizer)}, activations {_gb(mem.activations)}): an 80 GB A100; on 40 GB A100s "
              f"only FSDP (ZeRO-3) fits: {_gb(z3_40.memory.total)}",
              f"{base.dp} data-parallel replicas, full recomputation, sequence parallelism, 8k sequences",
              abs(mem.weights / 30e9 - 1) <= 0.1 and mem.fits and z3_40.memory.fits, mem.weights),
        Claim("3", "Low MFU (32-36%) from failures, pipeline bubbles and slow all-reduce", "bubbles",
              f"the 1F1B bubble alone idles {base.bubble:.0%} of every step: {base.micro_batches} "
              f"micro-batches of one 8k sequence per replica and 15 stages; MFU {base.mfu:.0%} / "
              f"(1 - bubble) = {base.mfu / (1 - base.bubble):.0%} while busy",
              "(p - 1) / (m + p - 1) with m = 60M / 8,192 / replicas", base.bubble > 0.2, base.bubble),
    ]


def _inference() -> list[Claim]:
    cfg = get_preset("gpt4")
    st16 = stages(cfg, 16)
    node = max(s.params for s in st16)
    layers = sorted({s.layers for s in st16})
    a100, h100 = serve(**SERVE_A100), serve(**SERVE_H100)
    int8 = serve(**dict(SERVE_A100, weight_dtype="int8"))
    a80_8k = serve(**dict(SERVE_A100, context=8192))
    a40_8k = serve("gpt4", "A100-40GB", tp=8, pp=16, context=8192)
    a40_32k = serve("gpt4-32k", "A100-40GB", tp=8, pp=16, context=32768)
    ratio = a100.cost_per_1k_output / h100.cost_per_1k_output
    small = serve(**SERVE_A100, batch=USEFUL_BATCH)
    read = serve(**SERVE_A100, target_tps=READING_SPEEDS["250 words/min"])
    busy = 0.4
    davinci = serve("gpt3-175b", "A100-80GB", tp=8, pp=1, context=1536, prompt_len=1024, roofline=True)
    # The same scenarios planned from their parts (serve_time.py): launch, all-reduce and MoE-dispatch floors.
    parts = {k: serve(**dict(v, roofline=False)) for k, v in (("A100", SERVE_A100), ("H100", SERVE_H100))}
    davinci_ratio = a100.cost_per_1k_output / davinci.cost_per_1k_output
    active_ratio = count_params(cfg).active / count_params(get_preset("gpt3-175b")).active
    cover8 = expert_coverage(16, 2, 8)
    prefill_mfu = a100.prefill.flops / a100.prefill.seconds / get_gpu("A100-80GB").peak_flops("bf16")
    return [
        Claim("4", "128 GPUs: 8-way tensor x 16-way pipeline; the head node holds fewer layers", "8 x 16",
              f"stages of {'/'.join(map(str, layers))} layers; the embedding and output stages get "
              f"{st16[0].layers}", "120 layers, extra layers to middle stages first",
              len(st16) == 16 and st16[0].layers < max(layers), None),
        Claim("4", "~130B parameters per 8-GPU node, < 30 GB per GPU in FP16, < 15 GB in FP8", "130B; <30 GB",
              f"{_n(node)} on the fullest node ({_n(sum(s.params for s in st16) / 16)} mean): "
              f"{_gb(a100.memory.weights)} per GPU in FP16, {_gb(int8.memory.weights)} in 8 bits; 130B "
              "would be 32.5 GB (erratum 3)",
              "8 layers x (16 experts + attention) / 8 GPUs",
              28e9 <= a100.memory.weights <= 33e9
              and abs(int8.memory.weights / a100.memory.weights - 0.5) < 0.01, a100.memory.weights),
        Claim("4", "Fits 40 GB A100s if the KV cache stays small; 8k context caps the batch, 32k cannot run",
              "8k capped, 32k no",
              f"8k: at most batch {a40_8k.max_batch} per micro-batch ({a40_8k.max_batch * 16} sequences in "
              f"flight); 32k (gpt4-32k): batch {a40_32k.max_batch}, under the {USEFUL_BATCH} at which each "
              f"expert sees one token; 80 GB A100s take batch {a80_8k.max_batch} at 8k",
              "full windows in cache, fp16, 90% of HBM usable, 16 micro-batches in flight",
              a40_32k.max_batch < USEFUL_BATCH <= a40_8k.max_batch < 64, a40_8k.max_batch),
        Claim("4", "Batch 4k+ gives each expert only ~500 tokens; at batch 8 each expert may see batch 1",
              "500; 1",
              f"{4096 * 2 / 16:.0f} tokens per expert at 4,096; at batch 8 an expert sees 1 token on "
              f"average, yet the batch touches {cover8:.1f} of 16 experts (batch 1: 2), so it reads "
              f"{cover8 / 2:.1f}x the expert weights of batch 1",
              "uniform random top-2 routing: E x (1 - (1 - k/E)^B) experts touched", True, cover8),
        Claim("4", "$0.0049 per 1k tokens on 128 A100s, $0.0021 on 128 H100s (8k, high utilization)",
              "$0.0049 / $0.0021",
              f"A100 ${a100.cost_per_1k_output:.4f} ({a100.cost_per_1k_output / 0.0049:.2f}x, batch "
              f"{a100.batch}), H100 ${h100.cost_per_1k_output:.4f} ({h100.cost_per_1k_output / 0.0021:.2f}x, "
              f"batch {h100.batch}): H100 {ratio:.1f}x cheaper; MFU {a100.mfu:.0%} / {h100.mfu:.0%}, "
              f"bandwidth used {a100.mbu:.0%} / {h100.mbu:.0%}. Planned from its parts instead (launch, all-reduce "
              f"and MoE-dispatch floors, fitted on published measurements: `moekit plan calibration`): "
              f"${parts['A100'].cost_per_1k_output:.4f} / ${parts['H100'].cost_per_1k_output:.4f} "
              f"({parts['A100'].cost_per_1k_output / 0.0049:.2f}x / {parts['H100'].cost_per_1k_output / 0.0021:.2f}x): "
              f"each stage also pays {parts['A100'].decode.overhead_s * 1e3:.1f} ms of floors per step, most of it "
              "dispatching every expert in each MoE layer, so the article's figures need its flat kernel "
              "efficiencies",
              "per output token; 4k prompt + 4k output (mean cache 6,144 tokens); largest batch in 90% of "
              "HBM; busy 100%; A100-80GB fp16, H100 FP8 weights and cache; the article's flat kernels: 80% of peak "
              "bandwidth, 70% of peak FLOP/s, no floors",
              within(a100.cost_per_1k_output, 0.0049, 1.5) and within(h100.cost_per_1k_output, 0.0021, 1.5)
              and ratio >= 2, a100.cost_per_1k_output),
        Claim("4", "Poor utilization would more than double the cost", "> 2x",
              f"{busy:.0%} busy: {1 / busy:.1f}x; batch {USEFUL_BATCH} instead of {a100.batch}: "
              f"{small.cost_per_1k_output / a100.cost_per_1k_output:.1f}x; reading speed (8.33 tokens/s "
              f"per user, batch {read.batch}): {read.cost_per_1k_output / a100.cost_per_1k_output:.1f}x - "
              f"at batch {a100.batch} a user gets only {a100.tokens_per_s_per_user:.1f} tokens/s",
              "the A100 scenario above", small.cost_per_1k_output / a100.cost_per_1k_output > 2,
              small.cost_per_1k_output / a100.cost_per_1k_output),
        Claim("4", "3x Davinci's cost with 1.6x its active parameters", "3x; 1.6x",
              f"{davinci_ratio:.1f}x the cost (Davinci ${davinci.cost_per_1k_output:.4f} on 8 A100-80GB, "
              f"batch {davinci.batch}) with {active_ratio:.2f}x the active parameters: at large batch GPT-4 "
              f"reads all {_n(count_params(cfg).total)} parameters every step",
              "gpt3-175b: tensor 8, its 2k window as 1k prompt + 1k output; same kernels and utilization",
              2 <= davinci_ratio <= 4.5 and abs(active_ratio - 1.6) < 0.05, davinci_ratio),
        Claim("4", "Prefill is parallel and cheap, decode sequential and bandwidth-bound: output costs more",
              "$0.06 per 1k output",
              f"input ${a100.cost_per_1k_input:.5f} vs output ${a100.cost_per_1k_output:.4f} per 1k on A100 "
              f"({a100.cost_per_1k_output / a100.cost_per_1k_input:.0f}x): prefill is compute-bound "
              f"(compute {a100.prefill.compute_s / a100.prefill.seconds:.0%} of its step, MFU "
              f"{prefill_mfu:.0%}); time to first token {a100.time_to_first_token:.2f} s",
              "2,048-token prefill chunks, same cluster",
              a100.cost_per_1k_output > 2 * a100.cost_per_1k_input, a100.cost_per_1k_input),
    ]


def _vision(cfg: ModelConfig) -> list[Claim]:
    """SPEC section 5 on a vision config (its sizes are the config's, not the article's)."""
    p = vision_plan(cfg)
    w, f, c, ft, io = p.params, p.image_flops, p.cache, p.finetune, p.io
    text_only = count_params(cfg.replace(vision=None))
    every = cfg.vision.cross_attn_every
    where = (f" before blocks {', '.join(map(str, cfg.cross_attn_layers))}" if cfg.vision.cross_attn_layers else
             f", one every {every} of the {cfg.n_layer} blocks" if every > 1 else ", one before each block")
    return [
        Claim("5", "A separate vision encoder, joined to the language model by cross-attention like Flamingo",
              "separate encoder + cross-attention",
              f"a ViT of {_n(w.encoder)} ({cfg.vision.n_layer} layers, width {cfg.vision.d_model:,}, "
              f"{io.n_patches} patches of {p.patch_size} x {p.patch_size} px), a resampler of {_n(w.resampler)} to "
              f"{io.n_latents} visual tokens, {w.n_cross_layers} tanh-gated cross-attention layers{where}; an "
              f"image is encoded once: {_n(f.total, 'FLOP')} ({p.image_in_text_tokens:.1f} text tokens' worth), "
              f"and a request keeps {c.per_image / 1e3:,.0f} kB of cross-attention K/V per image, "
              f"{c.per_image / c.text_kv_window:.2%} of a {cfg.max_seq_len:,}-token text KV cache",
              f"{cfg.name} preset: sizes chosen by moekit (the article gives none), bf16 cache",
              w.encoder > 0 and w.n_cross_layers > 0, f.total),
        Claim("5", "The vision side adds parameters on top of the 1.8T", "on top of 1.8T",
              f"+{_n(w.total)} ({w.share:.1%}) on top of {_n(w.text)}, of which cross-attention "
              f"{_n(w.cross_attn)} ({w.cross_attn / w.total:.0%}); a text token that sees an image uses "
              f"{_n(w.active_per_token)} (text only {_n(w.text_active_per_token)})",
              "cross-attention layers dense, of the LM's attention and MLP widths",
              w.total > 0 and w.text == text_only.total, w.total),
        Claim("5", "Fine-tuned on ~2T more tokens after text-only pre-training", "~2T tokens",
              f"{ft.flops:.3g} FLOPs, {ft.share:.0%} of the {ft.pretrain_flops:.3g} of pre-training "
              f"({ft.image_flops / ft.flops:.1%} of it the encoder's, {_n(ft.images)} images): "
              f"{ft.days:.3g} days on {ft.n_gpus:,} {ft.gpu} at {ft.mfu:.0%} MFU",
              f"6 x active per text token x 2T + 3 x FLOPs per image x {IMAGES_PER_TOKEN * 256:.0f} images per "
              "256 tokens (Flamingo's M3W), everything trained", ft.share < 0.25, ft.flops),
        Claim("5", "Image data needs ~150x the IO of text (~600 bytes per token vs ~4)", "~150x (600 B vs 4 B)",
              f"{io.patch_bytes} B per {p.patch_size} x {p.patch_size} RGB patch token / "
              f"{io.text_bytes_per_token:g} B per text token = {io.ratio:.0f}x "
              f"({io.ratio / io.article_ratio - 1:+.0%}); per resampled visual token {io.per_visual_token:,.0f} B "
              f"({io.per_visual_token / io.text_bytes_per_token:,.0f}x)",
              "raw 8-bit pixels; ~4 UTF-8 bytes per cl100k token (OpenAI: a token is ~4 characters of English); "
              f"within {IO_TOLERANCE:.0%}", io.agrees, io.ratio),
    ]


def errata() -> list[str]:
    """SPEC section 7, with the arithmetic that shows each one redone here."""
    lo, hi = 25_000 * 24 * 90 * 1.0, 25_000 * 24 * 100 * 1.0
    total = count_params(get_preset("gpt4")).total
    return [
        f"1. '560 TFLOPs' per token is ~560 GFLOP (2 x 280B); the dense '3,700 TFLOP' is "
        f"~{2 * total / 1e12:.1f} TFLOP (2 x {total / 1e12:.2f}T).",
        "2. '$0.0049 cents' and '$0.0021 cents' per 1k tokens are dollars ($0.0049 and $0.0021).",
        f"3. '~130B parameters per node' and '< 30 GB per GPU at FP16' disagree: 130B x 2 B / 8 = "
        f"{130e9 * 2 / 8 / 1e9:.1f} GB.",
        f"4. $63M is {63e6 / hi - 1:.0%}-{63e6 / lo - 1:.0%} above the article's own 25,000 GPUs x "
        f"90-100 days x $1/hour = ${lo / 1e6:.0f}M-${hi / 1e6:.0f}M.",
        "5. Training uses 15-way pipeline parallelism (120 layers / 15 = 8 per stage); inference uses "
        "16-way (8 x 16 = 128 GPUs, stages of 7 and 8 layers).",
        "6. Not in the article, whatever summaries say: '1.76T / 8 x 220B', token dropping, dropout.",
    ]


def gpt4_report(model: ModelConfig | str | None = None) -> Report:
    """Sections 1-4; with `model` (a vision config, e.g. "gpt4-vision") also section 5, vision."""
    claims = _brick_wall() + _model() + _training() + _inference()
    if model is not None:
        cfg = as_config(model)
        if not cfg.has_vision:
            raise ValueError(f"model {cfg.name!r} has no vision side: the report's --model is for section 5 "
                             "(vision); pass a vision model, e.g. --model gpt4-vision")
        claims += _vision(cfg)
    return Report(claims=claims, errata=errata())


_TITLES = {"1": "1. The brick wall: inference", "2": "2. Model", "3": "3. Training", "4": "4. Inference",
           "5": "5. Vision"}


def format_report(r: Report) -> str:
    lines = ["moekit plan: the GPT-4 article (SemiAnalysis, July 2023) recomputed"]
    section = None
    for i, c in enumerate(r.claims, 1):
        if c.section != section:
            section = c.section
            lines += ["", _TITLES[section], "-" * len(_TITLES[section])]
        lines += [f"[{i}] {c.claim}  ({'agrees' if c.agrees else 'DISAGREES'})",
                  f"    article: {c.article}", f"    moekit:  {c.moekit}", f"    assumes: {c.assumptions}"]
    n_ok = sum(c.agrees for c in r.claims)
    vision = any(c.section == "5" for c in r.claims)
    title = "Errata (the article is wrong here; moekit does not copy it)"
    lines += ["", title, "-" * len(title), *r.errata, "",
              f"{n_ok} of {len(r.claims)} claims agree. Reading speed: the article converts 250 and 1,000 "
              "words/min to 8.33 and 33.33 tokens/s (2 tokens per word).",
              f"Every figure: `moekit plan train|serve|wall{'|vision' if vision else ''} ... --json`; charts: "
              "`moekit plan chart`."]
    return "\n".join(lines)


__all__ = ["SERVE_A100", "SERVE_H100", "Claim", "Report", "errata", "format_report", "gpt4_report", "within"]
