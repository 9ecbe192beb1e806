"""Decode speed of the inference engine, with its baselines measured in the same run.

    python bench/decode.py                                   # gpt4-mini, random weights, CPU or GPU
    python bench/decode.py --preset tiny --tokens 16 --no-hf # a quick look
    python bench/decode.py --concurrency 1,8,32 --device cuda

Prints one JSON object:
- batch-1 decode tokens/s in fp32, bf16 and int8 (weight-only), each against the memory-bandwidth
  roofline: read bandwidth (a large streaming sum, measured here) / bytes read per token (the weights one token
  actually reads: every non-expert weight, top_k of n_expert experts, the lm_head, plus the KV cache
  at the average context), SPEC section 6;
- continuous-batching throughput (generated tokens/s) at each concurrency, and its gain over batch 1;
- speculative decoding: n-gram prompt lookup, and a 1-layer draft, against plain decoding (random
  weights accept few drafts: the acceptance rate is printed beside the speed);
- Hugging Face transformers `MixtralForCausalLM.generate` on identical weights (converted through
  moekit/hf.py) at batch 1 and at the largest concurrency. Mixtral experts are SwiGLU, so when the
  preset's MLP is GELU this section runs a SwiGLU variant of the same shape, for both sides;
- on a GPU, batch-1 decode without CUDA graphs (`enforce_eager`), to show what they buy;
- the planner's prediction (moekit.plan.serve) of each batch-1 decode and of the decode at each concurrency above 1,
  from this machine as `moekit bench hardware` measures it in the same run (the engine's weight-read bandwidth and
  overheads per weight format), measured / predicted beside it; on a GPU also the datasheet bound.
Random weights are fine for speed; greedy decoding runs for a fixed number of tokens (ignore_eos).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import torch

from moekit.counts import kv_bytes_per_token
from moekit.infer.engine import Engine
from moekit.infer.quant import quantize_int8, weight_bytes
from moekit.infer.sampler import SamplingParams
from moekit.model.transformer import Transformer
from moekit.presets import get_preset
from moekit.util import resolve_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": None}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth_gb_s(device: torch.device) -> dict:
    """Streaming bandwidth over a 1 GiB buffer (256 MiB on a CPU), best of 5 after a warm-up: "read"
    sums it (bytes read / time: what decoding does to weights, so the roofline uses it), "copy"
    copies it ((read + written bytes) / time, the figure most tools print)."""
    n = (1024 if device.type == "cuda" else 256) << 20
    x = torch.ones(n // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    out = {}
    for name, fn, moved in (("read", x.sum, n), ("copy", lambda: y.copy_(x), 2 * n)):
        best = float("inf")
        for _ in range(6):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        out[name] = moved / best / 1e9
    return out


def bytes_read_per_token(model: Transformer) -> float:
    """Weight bytes one decoded token reads: all of them but the unrouted experts and the embedding
    table (one row is read; a tied table is read whole as the lm_head, so it stays)."""
    cfg = model.cfg
    experts = sum(t.numel() * t.element_size() for m in model.moe_layers()  # float or int8 experts alike
                  for t in list(m.experts.parameters()) + list(m.experts.buffers()))
    emb = model.tok_emb.weight
    untied = getattr(model.lm_head, "weight", None) is not emb
    return weight_bytes(model) - experts * (1 - cfg.top_k / cfg.n_expert) - (emb.numel() * emb.element_size()
                                                                             if untied else 0)


def build(cfg, dtype_name: str, device: torch.device, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device=device, dtype=torch.float32 if dtype_name == "int8" else DTYPES[dtype_name])
    if dtype_name == "int8":  # int8 weights; compute dtype as `--quantize int8` picks it (bf16 on a GPU or bf16 CPU)
        model = quantize_int8(model.to(resolve_dtype("auto", device, "int8")))
    return model.eval()


def prompts(cfg, n: int, length: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg.vocab_size, (length,), generator=g).tolist() for _ in range(n)]


def run_engine(engine: Engine, batch: list[list[int]], tokens: int, device: torch.device) -> dict:
    """All requests at once; end-to-end and decode-only (after every first token) tokens/s."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in batch]
    sync(device)
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished():
        engine.step()
        if t_first is None and all(engine.requests[i].num_output_tokens > 0 for i in ids if i in engine.requests):
            sync(device)
            t_first = time.perf_counter()
    sync(device)
    t1 = time.perf_counter()
    for i in ids:
        engine.result(i)
    n = len(batch) * tokens
    return {"tok_s": n / (t1 - t0), "decode_tok_s": len(batch) * (tokens - 1) / (t1 - t_first),
            "seconds": t1 - t0}


def best_of(engine: Engine, batch: list[list[int]], tokens: int, device: torch.device, repeats: int = 3) -> dict:
    """A warm-up at the same shape, then the fastest of `repeats` runs (the machine's noise only slows)."""
    run_engine(engine, batch, min(tokens, 8), device)
    runs = [run_engine(engine, batch, tokens, device) for _ in range(repeats)]
    return max(runs, key=lambda r: r["tok_s"])


def make_engine(model: Transformer, **kw) -> Engine:
    return Engine(model, kv_cache_gb=kw.pop("kv_cache_gb", 0.5), max_num_batched_tokens=4096, **kw)


def bench_hf(cfg, device: torch.device, batch: list[list[int]], tokens: int) -> dict:
    """transformers' MixtralForCausalLM.generate on the weights of a moekit model, and moekit on the same."""
    from transformers import MixtralForCausalLM

    from moekit.hf import save_hf

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(cfg, "bf16" if dtype == torch.bfloat16 else "fp32", device)
    out = {"dtype": str(dtype).removeprefix("torch.")}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = MixtralForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    for label, sub in (("batch1", batch[:1]), (f"concurrency{len(batch)}", batch)):
        ids = torch.tensor(sub, device=device)
        best = float("inf")
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
            for _ in range(2):
                sync(device)
                t0 = time.perf_counter()
                hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                sync(device)
                best = min(best, time.perf_counter() - t0)
        hf_tok_s = len(sub) * tokens / best
        ours = best_of(make_engine(model), sub, tokens, device, repeats=2)["tok_s"]
        out[label] = {"moekit_tok_s": round(ours, 2), "transformers_tok_s": round(hf_tok_s, 2),
                      "ratio": round(ours / hf_tok_s, 2)}
    return out


def planner(cfg, device: torch.device, batch1: dict, batched: dict, context: int) -> dict:
    """The planner's prediction of each decode measured above (batch 1 per weight format; the main dtype at each
    concurrency, decode tokens/s after every first token) from this machine's entry as `moekit bench hardware`
    measures it in this same run (the engine's weight-read bandwidth and overheads per format, with this preset's
    shapes: moekit/engine_profile.py), next to the measurement; on a GPU also the datasheet bound (no overhead)
    when the table knows the GPU."""
    from moekit.bench_hardware import measure
    from moekit.plan.hardware import get_gpu
    from moekit.plan.serve import serve

    entry = measure(str(device), model=cfg.name)
    out = {"hardware": {k: getattr(entry, k) for k in ("hbm_gb_s", "gemv_gb_s", "tflops", "overhead_by_dtype")}}

    def plan(name: str, batch: int):
        compute = "bf16" if name == "bf16" or (name == "int8" and resolve_dtype("auto", device, "int8")
                                              == torch.bfloat16) else "fp32"
        return serve(cfg, gpu=entry, n_gpus=1, tp=1, pp=1, weight_dtype=name, kv_dtype=compute,
                     compute_dtype=compute, batch=batch, context=context)

    def row(measured: float, predicted: float) -> dict:
        return {"predicted_tok_s": round(predicted, 2), "measured_tok_s": measured,
                "measured_over_predicted": round(measured / predicted, 3)}

    for name, r in batch1.items():
        out[name] = row(r["decode_tok_s"], plan(name, 1).tokens_per_s_per_user)
    for c, r in batched["decode_tok_s"].items():
        out[f"{batched['dtype']}_concurrency{c}"] = row(r, plan(batched["dtype"], int(c)).tokens_per_s)
    if device.type == "cuda":
        try:
            name = torch.cuda.get_device_name(device).replace("NVIDIA ", "").split()[0]
            p = serve(cfg, gpu=get_gpu(name), n_gpus=1, tp=1, pp=1, weight_dtype="bf16", kv_dtype="bf16",
                      batch=1, context=context)
            out["datasheet_bound_bf16"] = {"gpu": name, "tok_s": round(p.tokens_per_s_per_user, 2)}
        except ValueError as e:  # a GPU the table does not list
            out["datasheet_bound_bf16"] = {"error": str(e)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt4-mini")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-spec", action="store_true", help="skip speculative decoding")
    ap.add_argument("--no-plan", action="store_true", help="skip the planner's prediction")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    conc = [int(c) for c in args.concurrency.split(",")]
    bws = bandwidth_gb_s(device)
    bw = bws["read"]
    res: dict = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "prompt_len": args.prompt_len, "tokens": args.tokens,
                 "bandwidth_gb_s": round(bw, 1), "copy_bandwidth_gb_s": round(bws["copy"], 1), "batch1": {}}
    one = prompts(cfg, 1, args.prompt_len)
    models = {}
    for name in args.dtypes.split(","):
        if name == "bf16" and device.type == "cpu" and not torch.backends.mkldnn.is_available():
            continue
        model = build(cfg, name, device)
        engine = make_engine(model)
        r = best_of(engine, one, args.tokens, device)
        w = bytes_read_per_token(model)
        kv = kv_bytes_per_token(cfg, engine.cache.k_SGDh[0].element_size()) * (args.prompt_len + args.tokens / 2)
        roof = bw * 1e9 / (w + kv)
        res["batch1"][name] = {"decode_tok_s": round(r["decode_tok_s"], 2), "roofline_tok_s": round(roof, 2),
                               "fraction_of_roofline": round(r["decode_tok_s"] / roof, 3),
                               "weight_mb_read_per_token": round(w / 1e6, 1),
                               "kv_mb_read_per_token": round(kv / 1e6, 3)}
        models[name] = model
        print(f"batch-1 {name}: {r['decode_tok_s']:.1f} tok/s, roofline {roof:.1f}", file=sys.stderr)
    if device.type == "cuda":  # what the CUDA graphs buy: the same batch-1 decode launched kernel by kernel
        name = "bf16" if "bf16" in models else next(iter(models))
        eager = best_of(make_engine(models[name], enforce_eager=True), one, args.tokens, device)["decode_tok_s"]
        res["batch1_eager"] = {"dtype": name, "decode_tok_s": round(eager, 2),
                               "graphs_speedup": round(res["batch1"][name]["decode_tok_s"] / eager, 2)}
    b1 = res["batch1"]
    res["ratios"] = {f"{a}_vs_{b}": round(b1[a]["decode_tok_s"] / b1[b]["decode_tok_s"], 3)
                     for a, b in (("bf16", "fp32"), ("int8", "fp32"), ("int8", "bf16")) if a in b1 and b in b1}

    main_dtype = "bf16" if device.type == "cuda" else "fp32"
    model = models.get(main_dtype) or build(cfg, main_dtype, device)
    res["throughput_dtype"] = main_dtype
    res["throughput_tok_s"], res["throughput_decode_tok_s"] = {}, {}
    for c in conc:
        r = best_of(make_engine(model), prompts(cfg, c, args.prompt_len, seed=c), args.tokens, device, repeats=2)
        res["throughput_tok_s"][str(c)] = round(r["tok_s"], 2)
        res["throughput_decode_tok_s"][str(c)] = round(r["decode_tok_s"], 2)  # after every first token
        print(f"concurrency {c}: {r['tok_s']:.1f} tok/s", file=sys.stderr)
    base = res["throughput_tok_s"].get("1")
    if base:
        res["throughput_gain_vs_1"] = {c: round(v / base, 2) for c, v in res["throughput_tok_s"].items()}

    if not args.no_spec:
        t_plain = best_of(make_engine(model), one, args.tokens, device)["tok_s"]
        spec = {"plain_tok_s": round(t_plain, 2)}
        for label, kw in (("ngram", {"ngram": True}),
                          ("draft_1_layer", {"draft": build(cfg.replace(n_layer=1), main_dtype, device, seed=1)})):
            engine = make_engine(model, **kw)
            t = best_of(engine, one, args.tokens, device)["tok_s"]
            m = engine.metrics()
            spec[label] = {"tok_s": round(t, 2), "speedup": round(t / t_plain, 3),
                           "acceptance": round(m["spec_accepted"] / max(m["spec_drafted"], 1), 3)}
        res["speculative_batch1"] = spec

    if not args.no_hf:
        try:
            hf_cfg = cfg if cfg.mlp == "swiglu" else cfg.replace(mlp="swiglu")
            res["transformers"] = {"shape": "the preset" if cfg.mlp == "swiglu" else
                                   "the preset with SwiGLU experts (Mixtral's), for both sides"}
            res["transformers"].update(bench_hf(hf_cfg, device, prompts(cfg, max(conc), args.prompt_len, seed=7),
                                                args.tokens))
        except ImportError as e:
            res["transformers"] = {"skipped": f"transformers is not installed ({e})"}
    if not args.no_plan:
        batched = {"dtype": main_dtype, "decode_tok_s": {c: v for c, v in res["throughput_decode_tok_s"].items()
                                                         if c != "1"}}
        res["planner"] = planner(cfg, device, b1, batched, args.prompt_len + args.tokens // 2)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
