"""`moekit generate`: stream a completion from a moekit run or a Hugging Face model folder.

    moekit generate --model runs/tiny "def parse_args(" --max-tokens 100
    moekit generate --model runs/tiny "import " --temperature 0 --draft runs/tiny-draft
    moekit generate --model Mixtral-8x7B-v0.1 "The capital of France is" --quantize int8
    echo "some prompt" | moekit generate --model runs/tiny -

Standard output carries only the generated text, so it pipes cleanly; statistics (tokens/s,
speculative acceptance, KV-cache use) go to standard error.
"""

from __future__ import annotations

import argparse
import sys
import time

from moekit.util import resolve_device, resolve_dtype


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    p.add_argument("--model", required=True, metavar="RUN|HF_DIR", help="a moekit run or a Hugging Face folder")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--draft", metavar="RUN|HF_DIR", help="speculative decoding with this smaller model")
    p.add_argument("--ngram", action="store_true", help="speculative decoding by prompt lookup (no draft model)")
    p.add_argument("--num-spec-tokens", type=int, default=4, help="draft tokens per step (default 4)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8 weight-only quantization")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache size in GiB (default 1)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations (auto: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: launch every decode kernel from Python")


def run(args: argparse.Namespace) -> int:
    from moekit.infer.engine import Engine
    from moekit.infer.loader import load_model
    from moekit.infer.quant import quantize_int8
    from moekit.infer.sampler import SamplingParams

    if args.overrides:
        raise ValueError(f"moekit generate takes no model overrides (got --{', --'.join(args.overrides)})")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)  # ValueError names a bad value
    if args.num_spec_tokens < 1:
        raise ValueError(f"--num-spec-tokens must be >= 1, got {args.num_spec_tokens}")
    if args.draft and args.ngram:
        raise ValueError("--draft and --ngram are two proposers: choose one")
    if not args.kv_cache_gb > 0:
        raise ValueError(f"--kv-cache-gb must be > 0, got {args.kv_cache_gb}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, args.quantize)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    t0 = time.perf_counter()
    model, codec = load_model(args.model, dtype, device)
    if codec is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer.json, which generate needs to read the prompt")
    draft = None
    if args.draft:
        draft, draft_codec = load_model(args.draft, dtype, device)
        if draft_codec is None or not codec.same_vocabulary(draft_codec):
            raise ValueError(f"--draft {args.draft} does not use the tokenizer of --model {args.model}: "
                             "a draft model must share the target's tokenizer")
    if args.quantize == "int8":
        quantize_int8(model)
    engine = Engine(model, codec, kv_cache_gb=args.kv_cache_gb, draft=draft, ngram=args.ngram,
                    num_spec_tokens=args.num_spec_tokens, enforce_eager=args.enforce_eager)
    rid = engine.add_request(prompt, params)
    t1 = time.perf_counter()
    n_tokens, t_first, reason = 0, None, None
    for delta in engine.stream(rid):
        if delta.new_token_ids and t_first is None:
            t_first = time.perf_counter()
        n_tokens += len(delta.new_token_ids)
        sys.stdout.write(delta.new_text)
        sys.stdout.flush()
        reason = delta.finish_reason
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    m = engine.metrics()
    decode_s = t2 - (t_first or t2)
    stats = (f"{n_tokens} tokens in {t2 - t1:.2f}s ({n_tokens / max(t2 - t1, 1e-9):.1f} tok/s; decode "
             f"{(n_tokens - 1) / decode_s if decode_s > 0 else 0:.1f} tok/s) | first token "
             f"{((t_first or t2) - t1) * 1e3:.0f} ms | load {t1 - t0:.1f}s | finish {reason} | "
             f"{m['prompt_tokens']} prompt tokens | KV {m['kv_blocks_total']} blocks of {m['kv_block_size']}, "
             f"{m['kv_bytes_per_token']} B/token | {device} {str(dtype).removeprefix('torch.')}"
             + (" int8" if args.quantize == "int8" else ""))
    if m["spec_drafted"]:
        per_pos = ", ".join(f"{a / d:.0%}" for a, d in zip(m["spec_accepted_per_pos"], m["spec_drafted_per_pos"],
                                                          strict=True) if d)
        stats += (f" | speculative: {m['spec_accepted']}/{m['spec_drafted']} drafts accepted "
                  f"({m['spec_accepted'] / m['spec_drafted']:.0%}; by position {per_pos})")
    print(stats, file=sys.stderr)
    return 0
