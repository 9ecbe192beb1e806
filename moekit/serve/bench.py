"""`moekit bench serve`: load an OpenAI-compatible server and report latency and throughput as JSON.

    moekit bench serve --url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8 --max-concurrency 16
    moekit bench serve --url http://127.0.0.1:8000 --max-concurrency 1,16 --ignore-eos   # a sweep, with ratios
    moekit bench serve --url http://my-vllm:8000 --dataset prompts.jsonl --goodput ttft:500 tpot:50

Definitions are those of vLLM's `vllm bench serve` (benchmarks/serve.py), so the figures can be set
beside vLLM's or llama.cpp's for the same workload:
- requests arrive as a Poisson process of `--request-rate` per second (gamma inter-arrival times of
  shape `--burstiness`, 1 = Poisson; `inf` = all at once); at most `--max-concurrency` are in
  flight, and a request's clock starts when it is sent, not while it waits for a slot;
- TTFT: send -> first streamed text; ITL: every gap between two streamed text chunks; TPOT per
  request: (E2EL - TTFT) / (output tokens - 1); E2EL: send -> last chunk. Each as mean, median,
  std and the `--percentiles` (default 50, 90, 99), in milliseconds;
- throughputs divide by the whole run's duration: requests/s, output tokens/s, total tokens/s;
  goodput is requests/s that met every SLO given with `--goodput` (ms).
Token counts come from the server's usage (`stream_options.include_usage`), else one per chunk.

Prompts: `--dataset FILE.jsonl` ({"prompt": ..., optional "output_len"} per line), or random text
of `--prompt-len` tokens: random token ids decoded with `--tokenizer` (a tokenizer.json or a folder
with one) as vLLM's random dataset does, else random English words (about one token each).
The client is asyncio + the standard library (moekit/serve/sse_client.py); standard output is the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from moekit.serve.sse_client import URL, HTTPError, get_json, parse_url, post_events

WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or has had "
         "not first one their its new after but who they have her she two been other when there all during "
         "into school time may years more most only over city some world would where later up such used many "
         "can state about national out known university united then made year between three people so before "
         "than team well house what age through them while system both game group like part three series also "
         "water light river model expert token route layer cache batch serve query value market north").split()
METRICS = ("ttft", "tpot", "itl", "e2el")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", help="the model name to request (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (default inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1 = Poisson)")
    p.add_argument("--max-concurrency", default=None, metavar="C[,C...]",
                   help="requests in flight at most (default: no limit); a list runs one benchmark per value")
    p.add_argument("--dataset", metavar="FILE.jsonl", help='prompts, one {"prompt": ..., "output_len": N} per line')
    p.add_argument("--prompt-len", type=int, default=128, help="random prompts: tokens each (default 128)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder): random prompts of exactly --prompt-len")
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens (vLLM's ignore_eos)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, as vLLM)")
    p.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50")
    p.add_argument("--percentiles", default="50,90,99", help="percentiles to report (default 50,90,99)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")


@dataclass
class Prompt:
    text: str
    output_len: int
    prompt_len: int | None = None  # known when a tokenizer made it


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0


def make_prompts(args: argparse.Namespace, rng: random.Random) -> list[Prompt]:
    if args.dataset:
        path = Path(args.dataset)
        if not path.is_file():
            raise FileNotFoundError(f"--dataset {path}: no such file")
        prompts = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["prompt"]
                out = int(row.get("output_len", row.get("max_tokens", args.output_len)))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--dataset {path} line {i} is not a JSON object with a \"prompt\" string") from None
            if not isinstance(text, str) or out < 1:
                raise ValueError(f"--dataset {path} line {i}: prompt must be a string and output_len >= 1")
            prompts.append(Prompt(text, out))
        if not prompts:
            raise ValueError(f"--dataset {path} holds no prompts")
        return [prompts[i % len(prompts)] for i in range(args.num_prompts)]
    if args.tokenizer:
        from tokenizers import Tokenizer

        tok_path = Path(args.tokenizer)
        tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
        if not tok_path.is_file():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
        tok = Tokenizer.from_file(str(tok_path))
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        vocab = [i for i in range(tok.get_vocab_size()) if i not in special]
        out = []
        for _ in range(args.num_prompts):  # vLLM's random dataset: random non-special ids, decoded, re-encoded, cut
            ids = [rng.choice(vocab) for _ in range(args.prompt_len + 8)]
            text = tok.decode(tok.encode(tok.decode(ids), add_special_tokens=False).ids[:args.prompt_len])
            out.append(Prompt(text, args.output_len, len(tok.encode(text, add_special_tokens=False).ids)))
        return out
    return [Prompt(" ".join(rng.choice(WORDS) for _ in range(args.prompt_len)), args.output_len)
            for _ in range(args.num_prompts)]


async def one_request(url: URL, endpoint: str, model: str, prompt: Prompt, args: argparse.Namespace) -> Result:
    chat = endpoint.endswith("chat/completions")
    body = {"model": model, "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body |= {"messages": [{"role": "user", "content": prompt.text}], "max_completion_tokens": prompt.output_len}
    else:
        body |= {"prompt": prompt.text, "max_tokens": prompt.output_len}
    if args.ignore_eos:
        body["ignore_eos"] = True
    r = Result(prompt_tokens=prompt.prompt_len)
    chunks, last = 0, None
    st = time.perf_counter()
    try:
        async with asyncio.timeout(args.timeout):
            async for t, data in post_events(url, endpoint, body, args.api_key):
                if data.get("usage"):
                    r.prompt_tokens = data["usage"].get("prompt_tokens", r.prompt_tokens)
                    r.output_tokens = data["usage"].get("completion_tokens", 0)
                choices = data.get("choices") or []
                if not choices:
                    continue
                text = choices[0].get("delta", {}).get("content") if chat else choices[0].get("text")
                if not text:
                    continue
                chunks += 1
                if last is None:
                    r.ttft = t - st
                else:
                    r.itl.append(t - last)
                last = t
    except (HTTPError, OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
        r.error = f"{type(e).__name__}: {e}" if not isinstance(e, HTTPError) else str(e)
        return r
    r.e2el = (last or time.perf_counter()) - st
    r.output_tokens = r.output_tokens or chunks
    r.ok = True
    return r


def arrival_gaps(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds to wait after each request before the next: gamma(shape = burstiness, mean = 1 / rate), so
    burstiness 1 is a Poisson process and larger values are more regular (vLLM); rate inf: no wait."""
    if not math.isfinite(rate):
        return [0.0] * n
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n - 1)] + [0.0]


async def run_benchmark(url: URL, model: str, prompts: list[Prompt], args: argparse.Namespace,
                        concurrency: int | None, rng: random.Random) -> tuple[list[Result], float, int]:
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    in_flight, peak = 0, 0
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), file=sys.stderr, desc=f"concurrency {concurrency or 'unlimited'}")

    async def limited(p: Prompt) -> Result:
        nonlocal in_flight, peak
        if sem is not None:
            await sem.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await one_request(url, args.endpoint, model, p, args)
        finally:
            in_flight -= 1
            if sem is not None:
                sem.release()
            if bar is not None:
                bar.update()

    gaps = arrival_gaps(len(prompts), args.request_rate, args.burstiness, rng)
    start = time.perf_counter()
    tasks = []
    for p, gap in zip(prompts, gaps, strict=True):
        tasks.append(asyncio.create_task(limited(p)))
        if gap:
            await asyncio.sleep(gap)
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return results, duration, peak


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(values_s or [0.0]) * 1000
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(results: list[Result], duration: float, percentiles: list[float], slos: dict[str, float]) -> dict:
    """vLLM's `calculate_metrics` over the results of one run."""
    ok = [r for r in results if r.ok]
    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in ok]
    per_request = {"ttft": [r.ttft for r in ok], "tpot": tpots, "e2el": [r.e2el for r in ok]}
    good = sum(all(per_request[k][i] * 1000 <= slo for k, slo in slos.items()) for i in range(len(ok)))
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
           "total_token_throughput": (total_in + total_out) / duration}
    if slos:
        out["request_goodput"] = good / duration
    for name in METRICS:
        values = [x for r in ok for x in r.itl] if name == "itl" else per_request[name]
        out |= _stats(name, values, percentiles)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        out["errors"] = errors[:5]
    return out


def _parse_slos(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        try:
            slos[name] = float(value)
        except ValueError:
            name = ""
        if name not in ("ttft", "tpot", "e2el") or slos.get(name, -1) < 0:
            raise ValueError(f"--goodput {item!r}: give METRIC:MS with METRIC ttft, tpot or e2el, e.g. ttft:500")
    return slos


def _parse_list(text: str | None, flag: str, kind=float) -> list:
    if text is None:
        return [None]
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give numbers separated by commas") from None
    if any(v <= 0 or (kind is float and v > 100) for v in values):
        raise ValueError(f"{flag} {text!r}: values must be > 0" + (" and <= 100" if kind is float else ""))
    return values


async def _main(args: argparse.Namespace) -> dict:
    url = parse_url(args.url)
    percentiles = _parse_list(args.percentiles, "--percentiles")
    concurrencies = _parse_list(args.max_concurrency, "--max-concurrency", int)
    slos = _parse_slos(args.goodput)
    if args.num_prompts < 1 or args.prompt_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --prompt-len and --output-len must be >= 1")
    if not args.request_rate > 0 or not args.burstiness > 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    rng = random.Random(args.seed)
    prompts = make_prompts(args, rng)
    try:
        model = args.model or (await get_json(url, "/v1/models", args.api_key))["data"][0]["id"]
    except (OSError, HTTPError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"cannot list the models of {args.url} ({e}); is the server up? (or pass --model)") from None
    test = await one_request(url, args.endpoint, model, Prompt(prompts[0].text, min(4, prompts[0].output_len)), args)
    if not test.ok:  # vLLM's initial test run: a misconfiguration fails in one line, not N times
        raise ValueError(f"the test request to {args.url}{args.endpoint} failed: {test.error}")
    runs = []
    for c in concurrencies:
        results, duration, peak = await run_benchmark(url, model, prompts, args, c, random.Random(args.seed))
        runs.append({"model": model, "endpoint": args.endpoint, "num_prompts": len(prompts),
                     "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
                     "burstiness": args.burstiness, "max_concurrency": c, "max_concurrent_requests": peak,
                     **summarize(results, duration, percentiles, slos)})
    if len(runs) == 1:
        return runs[0]
    base = runs[0]["output_throughput"]
    return {"runs": runs, "baseline_max_concurrency": concurrencies[0],
            "output_throughput_ratio": {str(r["max_concurrency"]): r["output_throughput"] / base if base else None
                                        for r in runs[1:]}}


def run(args: argparse.Namespace) -> int:
    report = asyncio.run(_main(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from moekit.util import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0
