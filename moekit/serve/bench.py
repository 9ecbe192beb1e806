"""`moekit bench serve`: load an OpenAI-compatible server and report latency and throughput as JSON.

    moekit bench serve --url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8 --max-concurrency 16
    moekit bench serve --url http://127.0.0.1:8000 --max-concurrency 1,16 --ignore-eos   # a sweep, with ratios
    moekit bench serve --url http://my-vllm:8000 --dataset prompts.jsonl --goodput ttft:500 tpot:50
    moekit bench serve --url http://127.0.0.1:8000 --trace conv --trace-duration 300 --tokenizer run/ --ignore-eos \
        --save-detailed sent.jsonl          # an Azure 2023 hour's first 5 minutes; `moekit sim --trace sent.jsonl`

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
`--prompt-len` / `--output-len` also take a length spec (uniform:16:512, lognormal:MEAN:SIGMA: moekit.sim.workload)
drawn with the --seed rng; `--shared-prefix-len N` starts every random prompt with the same N tokens (a system
prompt, for the prefix cache), as vLLM's random dataset's `--random-prefix-len`.

`--trace FILE|conv|code` replays a request trace instead (an Azure LLM inference trace CSV, the shipped 2023
hours, or a `--save-detailed` file; moekit.sim.workload.load_trace): requests are sent at the trace's arrival
times (offsets from the start, so a slow server does not slow the offered load down) with its prompt and output
lengths, clipped to fit `--max-model-len` (default: the server's, from GET /v1/models) less the tokens the server
adds itself (a BOS, a chat template), which the test request measures. `--save-detailed FILE.jsonl` writes
one line per request (arrival, prompt_len, output_len, ok, ttft, e2el, itl): what the simulator replays.
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
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100; not with --trace)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (default inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1 = Poisson)")
    p.add_argument("--max-concurrency", default=None, metavar="C[,C...]",
                   help="requests in flight at most (default: no limit); a list runs one benchmark per value")
    p.add_argument("--dataset", metavar="FILE.jsonl", help='prompts, one {"prompt": ..., "output_len": N} per line')
    p.add_argument("--prompt-len", default="128", metavar="N|SPEC",
                   help="random prompts: tokens each, or a spec: uniform:LO:HI, lognormal:MEAN:SIGMA (default 128)")
    p.add_argument("--output-len", default="64", metavar="N|SPEC", help="max_tokens of each request, or a spec "
                                                                        "as --prompt-len (default 64)")
    p.add_argument("--shared-prefix-len", type=int, default=0, metavar="N",
                   help="random prompts start with the same N tokens (a system prompt: the prefix cache's work)")
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder): random prompts of exactly --prompt-len")
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens (vLLM's ignore_eos)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, as vLLM)")
    p.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50")
    p.add_argument("--percentiles", default="50,90,99", help="percentiles to report (default 50,90,99)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    p.add_argument("--trace", metavar="FILE|conv|code",
                   help="send a trace's requests at its arrival times with its lengths (an Azure trace CSV, a "
                        "--save-detailed .jsonl; conv/code: the shipped Azure 2023 hours); then --num-prompts, "
                        "--request-rate, --burstiness and --prompt-len/--output-len do not apply; prompts of exactly "
                        "its token counts need --tokenizer (else words, about one token each)")
    p.add_argument("--trace-start", type=float, default=0.0, metavar="S", help="seconds into the trace (default 0)")
    p.add_argument("--trace-duration", type=float, metavar="S", help="seconds of the trace (default: all of it)")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                   help="trace speed-up: 2 = arrivals twice as often (default 1)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="--trace: clip prompt + output to N tokens (default: the server's, else 2048)")
    p.add_argument("--save-detailed", metavar="FILE.jsonl",
                   help="one JSON line per request (arrival, prompt_len, output_len, ok, ttft, e2el, itl); a "
                        "--max-concurrency list writes FILE.cC.jsonl per value")
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
    sent: float = 0.0  # seconds since the run's start at which it was sent
    error: str = ""
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0


def make_prompts(args: argparse.Namespace, rng: random.Random,
                 lengths: list[tuple[int, int]] | None = None) -> list[Prompt]:
    """The run's prompts: `lengths` (prompt tokens, max_tokens) one per request (a trace), else --num-prompts of
    --prompt-len / --output-len (fixed lengths draw nothing from `rng`, so the prompts are those of a plain N)."""
    from moekit.sim.workload import parse_lengths

    if lengths is None:
        n = args.num_prompts
        ins = parse_lengths(args.prompt_len, "--prompt-len").sample(n, rng)
        outs = parse_lengths(args.output_len, "--output-len").sample(n, rng)
        lengths = list(zip(ins, outs, strict=True))
    if getattr(args, "dataset", None):
        return _dataset_prompts(Path(args.dataset), [o for _, o in lengths])
    shared = getattr(args, "shared_prefix_len", 0)
    if args.tokenizer:
        tok = _tokenizer(args.tokenizer)
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        vocab = [i for i in range(tok.get_vocab_size()) if i not in special]

        def random_text(n: int) -> str:  # vLLM's random dataset: random non-special ids, decoded, re-encoded, cut
            ids = [rng.choice(vocab) for _ in range(n + 8)]
            return tok.decode(tok.encode(tok.decode(ids), add_special_tokens=False).ids[:n])

        prefix = tok.encode(random_text(shared), add_special_tokens=False).ids if shared else []
        out = []
        for p, o in lengths:
            k = min(len(prefix), p - 1)  # a prompt no longer than the prefix shares all but its last token
            text = (tok.decode(prefix[:k]) if k else "") + random_text(p - k)
            out.append(Prompt(text, o, len(tok.encode(text, add_special_tokens=False).ids)))
        return out
    prefix = [rng.choice(WORDS) for _ in range(shared)]
    out = []
    for p, o in lengths:
        k = min(shared, p - 1)
        out.append(Prompt(" ".join(prefix[:k] + [rng.choice(WORDS) for _ in range(p - k)]), o))
    return out


def _tokenizer(name: str):
    from tokenizers import Tokenizer

    tok_path = Path(name)
    tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    if not tok_path.is_file():
        raise FileNotFoundError(f"--tokenizer {name}: no tokenizer.json there")
    return Tokenizer.from_file(str(tok_path))


def _dataset_prompts(path: Path, default_outs: list[int]) -> list[Prompt]:
    """--dataset lines, cycled over the requests; a line without output_len asks for the request's --output-len."""
    if not path.is_file():
        raise FileNotFoundError(f"--dataset {path}: no such file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["prompt"]
            out = row.get("output_len", row.get("max_tokens"))
            out = None if out is None else int(out)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--dataset {path} line {i} is not a JSON object with a \"prompt\" string") from None
        if not isinstance(text, str) or (out is not None and out < 1):
            raise ValueError(f"--dataset {path} line {i}: prompt must be a string and output_len >= 1")
        rows.append((text, out))
    if not rows:
        raise ValueError(f"--dataset {path} holds no prompts")
    return [Prompt(rows[i % len(rows)][0], rows[i % len(rows)][1] or o) for i, o in enumerate(default_outs)]


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
                        concurrency: int | None, rng: random.Random,
                        offsets: list[float] | None = None) -> tuple[list[Result], float, int]:
    """Send the prompts: after arrival_gaps(rng) each, or at `offsets` (seconds from the start: a trace)."""
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
        sent = time.perf_counter() - start  # the clock starts when it is sent, not while it waits for a slot
        try:
            r = await one_request(url, args.endpoint, model, p, args)
            r.sent = sent
            return r
        finally:
            in_flight -= 1
            if sem is not None:
                sem.release()
            if bar is not None:
                bar.update()

    gaps = arrival_gaps(len(prompts), args.request_rate, args.burstiness, rng) if offsets is None else None
    start = time.perf_counter()
    tasks = []
    for i, p in enumerate(prompts):
        if offsets is not None:  # absolute times: lateness does not accumulate over a long trace
            wait = start + offsets[i] - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(limited(p)))
        if gaps is not None and gaps[i]:
            await asyncio.sleep(gaps[i])
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return results, duration, peak


def detail_lines(results: list[Result]) -> str:
    """--save-detailed: one JSON object per request, in sending order; `moekit.sim.workload.load_trace` reads it
    back as a workload (the lengths the server reported, or the prompt's own count when it did not)."""
    lines = []
    for r in sorted(results, key=lambda r: r.sent):
        row = {"arrival": round(r.sent, 6), "prompt_len": r.prompt_tokens, "output_len": r.output_tokens,
               "ok": r.ok, "ttft": round(r.ttft, 6), "e2el": round(r.e2el, 6), "itl": [round(x, 6) for x in r.itl]}
        if not r.ok:
            row["error"] = r.error
        lines.append(json.dumps(row))
    return "".join(line + "\n" for line in lines)


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


def _check_args(args: argparse.Namespace) -> None:
    from moekit.sim.workload import parse_lengths

    parse_lengths(args.prompt_len, "--prompt-len")
    parse_lengths(args.output_len, "--output-len")
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if not args.request_rate > 0 or not args.burstiness > 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    if args.shared_prefix_len < 0:
        raise ValueError(f"--shared-prefix-len must be >= 0 tokens, got {args.shared_prefix_len}")
    if args.dataset and (args.trace or args.shared_prefix_len):
        raise ValueError("--dataset gives its own prompts: drop --trace / --shared-prefix-len (or --dataset)")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be >= 2 tokens, got {args.max_model_len}")


async def _models(url: URL, args: argparse.Namespace) -> tuple[str, int | None]:
    """The model to request and its context length, from GET /v1/models (vLLM and moekit give max_model_len)."""
    try:
        cards = (await get_json(url, "/v1/models", args.api_key))["data"]
        card = next((c for c in cards if c.get("id") == args.model), None) or cards[0]
        model = args.model or card["id"]
    except (OSError, HTTPError, KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot list the models of {args.url} ({e}); is the server up? (or pass --model)") from None
    ctx = card.get("max_model_len")
    return model, ctx if isinstance(ctx, int) and ctx > 1 else None


async def _main(args: argparse.Namespace) -> dict:
    url = parse_url(args.url)
    percentiles = _parse_list(args.percentiles, "--percentiles")
    concurrencies = _parse_list(args.max_concurrency, "--max-concurrency", int)
    slos = _parse_slos(args.goodput)
    _check_args(args)
    trace = None
    if args.trace:  # read (and reject) the trace before the server is asked anything
        from moekit.sim import workload as wl

        trace = wl.load_trace(wl.resolve_trace(args.trace), start=args.trace_start, duration=args.trace_duration,
                              time_scale=args.time_scale)
        if not trace:
            raise ValueError(f"--trace {args.trace} has no request in the window --trace-start {args.trace_start} "
                             f"--trace-duration {args.trace_duration}: widen it")
    rng = random.Random(args.seed)
    prompts = make_prompts(args, rng) if trace is None else None
    model, server_ctx = await _models(url, args)
    # vLLM's initial test run: a misconfiguration fails in one line, not N times. With a trace it is a prompt
    # of known length, so that the tokens the server adds to every prompt (a BOS, a chat template) are measured.
    probe = prompts[0] if trace is None else make_prompts(args, random.Random(args.seed + 1), [(4, 4)])[0]
    test = await one_request(url, args.endpoint, model, Prompt(probe.text, min(4, probe.output_len)), args)
    if not test.ok:
        raise ValueError(f"the test request to {args.url}{args.endpoint} failed: {test.error}")
    offsets, trace_info = None, None
    if trace is not None:
        added = max(0, (test.prompt_tokens or 0) - probe.prompt_len) if probe.prompt_len else 0
        ctx = args.max_model_len or server_ctx or 2048
        trace = wl.clip(trace, ctx - added)
        prompts = make_prompts(args, rng, [(r.prompt_len, r.output_len) for r in trace])
        offsets = [r.arrival for r in trace]
        trace_info = {"file": str(args.trace), "trace_start": args.trace_start,
                      "trace_duration": args.trace_duration, "time_scale": args.time_scale, "max_model_len": ctx,
                      "server_added_tokens": added, **wl.summary(trace)}
    runs = []
    for c in concurrencies:
        results, duration, peak = await run_benchmark(url, model, prompts, args, c, random.Random(args.seed), offsets)
        rate = trace_info["offered_rate"] if trace_info else args.request_rate
        runs.append({"model": model, "endpoint": args.endpoint, "num_prompts": len(prompts),
                     "request_rate": rate if rate is not None and math.isfinite(rate) else "inf",
                     "burstiness": args.burstiness, "max_concurrency": c, "max_concurrent_requests": peak,
                     **summarize(results, duration, percentiles, slos)})
        if trace_info:
            runs[-1]["trace"] = trace_info
        if args.save_detailed:
            from moekit.util import atomic_write_text

            path = Path(args.save_detailed)
            if len(concurrencies) > 1:
                path = path.with_name(f"{path.stem}.c{c or 'inf'}{path.suffix}")
            atomic_write_text(path, detail_lines(results))
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
