"""`moekit generate`: stream a completion from a moekit run or a Hugging Face model folder.

    moekit generate --model runs/tiny "def parse_args(" --max-tokens 100
    moekit generate --model runs/tiny "import " --temperature 0 --draft runs/tiny-draft
    moekit generate --model Mixtral-8x7B-v0.1 "The capital of France is" --quantize int8
    echo "some prompt" | moekit generate --model runs/tiny -
    moekit generate --model runs/tiny-vision --image cat.png "Q: what colour is the circle? A:"

Standard output carries only the generated text, so it pipes cleanly; statistics (tokens/s,
speculative acceptance, KV-cache use) go to standard error.
"""

from __future__ import annotations

import argparse
import sys
import time

from moekit.infer.build import EngineConfig, add_engine_arguments, build_engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    p.add_argument("--model", required=True, metavar="RUN|HF_DIR", help="a moekit run or a Hugging Face folder")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image the prompt is about (repeatable; a vision model: its <image> marker goes before "
                        "the prompt unless the prompt places it)")
    add_engine_arguments(p, batching=False)  # one request: the batching flags are `moekit serve`'s


def run(args: argparse.Namespace) -> int:
    from moekit.infer.sampler import SamplingParams

    if args.overrides:
        raise ValueError(f"moekit generate takes no model overrides (got --{', --'.join(args.overrides)})")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)  # ValueError names a bad value
    cfg = EngineConfig.from_args(args)  # checks the engine's flags (and --device) before anything loads
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt, images = _images(args, prompt)  # checked before the model loads

    t0 = time.perf_counter()
    engine = build_engine(cfg, tokenizer_for="generate", progress=lambda line: print(line, file=sys.stderr))
    try:
        return _generate(engine, cfg, prompt, params, t0, images)
    finally:
        engine.close()


def _images(args: argparse.Namespace, prompt: str) -> tuple[str, list]:
    """The prompt with one `<image>` marker per --image (placed first unless the prompt has them) and the pixels."""
    if not args.image:
        return prompt, []
    from moekit.images import load_image
    from moekit.infer.loader import load_codec

    model_cfg, _ = load_codec(args.model)
    if not model_cfg.has_vision:
        raise ValueError(f"--image: model {args.model} has no vision encoder (train one with "
                         f"moekit train --init-from RUN --vision)")
    v = model_cfg.vision
    if len(args.image) > v.max_images:
        raise ValueError(f"{len(args.image)} images; the model takes at most {v.max_images}")
    marks = prompt.count("<image>")
    if marks == 0:
        prompt = "<image>" * len(args.image) + prompt
    elif marks != len(args.image):
        raise ValueError(f"the prompt places {marks} <image> markers but {len(args.image)} --image files were given")
    return prompt, [load_image(path, v.image_size) for path in args.image]


def _generate(engine, cfg: EngineConfig, prompt: str, params, t0: float, images=()) -> int:
    rid = engine.add_request(prompt, params, images=images)
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
             f"{m['kv_bytes_per_token']} B/token | {cfg.describe()}")
    if m["spec_drafted"]:
        per_pos = ", ".join(f"{a / d:.0%}" for a, d in zip(m["spec_accepted_per_pos"], m["spec_drafted_per_pos"],
                                                          strict=True) if d)
        stats += (f" | speculative: {m['spec_accepted']}/{m['spec_drafted']} drafts accepted "
                  f"({m['spec_accepted'] / m['spec_drafted']:.0%}; by position {per_pos})")
    print(stats, file=sys.stderr)
    return 0
