"""`moekit sample RUN "prompt"`: sample text from a trained run with a simple KV-cache sampler.

    moekit sample runs/tiny "def parse_args("
    moekit sample runs/tiny "" --temperature 0 --max-new-tokens 100     # greedy, from a document start

Temperature and top-k sampling (Fan et al. 2018); the prompt is prefilled in one forward pass into
the model's contiguous KV cache (`Transformer.new_cache`), then one token per step. Generation
stops at `<|endoftext|>` (the end of a document). The serving engine (paged cache, batching,
speculative decoding) is `moekit.infer`; this is the quick look at a run's output.
Shape legend: B batch (1 here), T tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moekit.model.attention import ContiguousContext
from moekit.model.transformer import Transformer
from moekit.resolve import load_config
from moekit.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_model_tensors
from moekit.train.tokenizer import EOT, load_tokenizer


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", log=print):
    """(model in eval mode, tokenizer, step) of a run: its newest good checkpoint, else model.safetensors."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a moekit run (no config.json); train one with `moekit train`")
    cfg = load_config(run / "config.json")
    tok = load_tokenizer(run / "tokenizer.json")
    model = Transformer(cfg)
    step = None
    for path in reversed(list_checkpoints(run)):
        try:
            step = load_checkpoint(path, model)["step"]
            break
        except CheckpointError as e:
            log(f"warning: {e}; trying the previous checkpoint")
    if step is None:
        export = run / "model.safetensors"
        if not export.is_file():
            raise FileNotFoundError(f"{run} has neither a usable checkpoint nor model.safetensors")
        with safe_open(str(export), "pt") as f:
            step = int((f.metadata() or {}).get("step", -1))
        load_model_tensors(model, load_file(export), str(export))
    return model.to(device).eval(), tok, step


def sample_next(logits_V: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """One token id: argmax at temperature 0, else from softmax(logits / T) over the top-k logits."""
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / temperature
    if 0 < top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 50, generator: torch.Generator | None = None, stop_id: int | None = None) -> list[int]:
    """New token ids after `prompt_ids`, decoding with the KV cache (prefill once, then one token a step)."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    max_len = model.cfg.max_seq_len
    if len(prompt_ids) >= max_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_len}")
    device = model.tok_emb.weight.device
    total = min(len(prompt_ids) + max_new_tokens, max_len)
    cache = model.new_cache(1, total)
    logits_V = model(torch.tensor([prompt_ids], device=device), ctx=ContiguousContext(cache, 0)).logits[0, -1]
    out: list[int] = []
    pos = len(prompt_ids)
    while pos < total:
        nxt = sample_next(logits_V, temperature, top_k, generator)
        out.append(nxt)
        if nxt == stop_id or pos + 1 >= total:
            break
        logits_V = model(torch.tensor([[nxt]], device=device), ctx=ContiguousContext(cache, pos)).logits[0, -1]
        pos += 1
    return out


def complete(model: Transformer, tok, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0) -> str:
    """The text the model writes after `prompt` (from the start of a document), stopping at its end."""
    eot = tok.token_to_id(EOT)
    ids = [eot] + tok.encode(prompt, add_special_tokens=False).ids
    room = model.cfg.max_seq_len - 1
    ids = ids[-room:]  # a prompt longer than the context keeps its end
    gen = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    new = generate(model, ids, max_new_tokens, temperature, top_k, gen, stop_id=eot)
    return tok.decode([i for i in new if i != eot], skip_special_tokens=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by `moekit train`")
    p.add_argument("prompt", nargs="?", default="", help="text to continue (default: a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {prompt, samples, step} as JSON")


def run(args: argparse.Namespace) -> int:
    if args.overrides:
        raise ValueError(f"moekit sample takes no model overrides (got {', '.join(args.overrides)})")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--max-new-tokens and --num-samples must be >= 1")
    if args.temperature < 0 or args.top_k < 0:
        raise ValueError("--temperature and --top-k must be >= 0")
    model, tok, step = load_run(args.run)
    samples = [complete(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed + i)
               for i in range(args.num_samples)]
    if args.json:
        print(json.dumps({"run": str(args.run), "step": step, "prompt": args.prompt, "samples": samples}, indent=2))
    else:
        for i, text in enumerate(samples):
            if args.num_samples > 1:
                print(f"----- sample {i + 1} -----")
            print(args.prompt + text)
    return 0
