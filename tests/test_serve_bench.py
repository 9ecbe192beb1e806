"""`moekit bench serve`: vLLM's metric definitions on known inputs, Poisson/gamma arrivals, prompts of an
exact token length, and a whole run against a live server (JSON on standard output, counts that add up)."""

import json
import random
import statistics
from argparse import Namespace

import pytest
from test_serve_utils import InProcessServer, ascii_tokenizer, tiny_engine

from moekit.cli import main
from moekit.serve.bench import Result, arrival_gaps, make_prompts, summarize


def test_summary_follows_vllm_definitions():
    results = [Result(ok=True, ttft=0.1, e2el=0.5, itl=[0.1, 0.2, 0.1, 0.1], prompt_tokens=10, output_tokens=5),
               Result(ok=True, ttft=0.3, e2el=0.3, itl=[], prompt_tokens=20, output_tokens=1),
               Result(ok=False, error="HTTP 429: at capacity")]
    s = summarize(results, duration=2.0, percentiles=[50, 99], slos={"ttft": 200, "tpot": 150})
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, ["HTTP 429: at capacity"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 6)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0 and s["total_token_throughput"] == 18.0
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)  # numpy's linear interpolation, as vLLM
    # TPOT excludes the first token: (0.5 - 0.1) / (5 - 1) = 100 ms; a 1-token request counts 0
    assert s["mean_tpot_ms"] == pytest.approx(50) and s["std_tpot_ms"] == pytest.approx(50)
    assert s["mean_itl_ms"] == pytest.approx(125) and s["p50_itl_ms"] == pytest.approx(100)
    assert s["mean_e2el_ms"] == pytest.approx(400)
    assert s["request_goodput"] == 0.5  # only the first meets TTFT <= 200 ms and TPOT <= 150 ms


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (4.0, 0.5)])
def test_arrivals_are_gamma_with_the_requested_rate(burstiness, cv):
    gaps = arrival_gaps(20_001, 10.0, burstiness, random.Random(0))[:-1]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.1, rel=0.03)  # rate 10/s
    assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.05)  # Poisson: coefficient of variation 1
    assert arrival_gaps(3, float("inf"), 1.0, random.Random(0)) == [0.0, 0.0, 0.0]


def test_prompts_from_a_tokenizer_or_a_dataset(tmp_path):
    tok = tmp_path / "tokenizer.json"
    ascii_tokenizer().save(str(tok))
    args = Namespace(dataset=None, tokenizer=str(tmp_path), num_prompts=5, prompt_len=37, output_len=9)
    prompts = make_prompts(args, random.Random(1))
    assert len(prompts) == 5 and len({p.text for p in prompts}) == 5
    assert all(len(ascii_tokenizer().encode(p.text, add_special_tokens=False).ids) == p.prompt_len == 37
               for p in prompts)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a b", "output_len": 3}\n\n{"prompt": "c"}\n')
    args = Namespace(dataset=str(data), tokenizer=None, num_prompts=3, prompt_len=1, output_len=7)
    assert [(p.text, p.output_len) for p in make_prompts(args, random.Random(0))] == [("a b", 3), ("c", 7), ("a b", 3)]
    data.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match='line 1 is not a JSON object with a "prompt" string'):
        make_prompts(args, random.Random(0))


def test_bench_serve_against_a_live_server(capsys):
    with InProcessServer(tiny_engine) as s:
        s.wait_ready()
        argv = ["bench", "serve", "--url", f"http://127.0.0.1:{s.port}", "--num-prompts", "8", "--prompt-len", "12",
                "--output-len", "6", "--ignore-eos", "--max-concurrency", "1,4", "--request-rate", "200",
                "--goodput", "e2el:60000", "--no-progress"]
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert [r["max_concurrency"] for r in report["runs"]] == [1, 4] and "4" in report["output_throughput_ratio"]
        for r in report["runs"]:
            assert r["model"] == "tiny" and r["completed"] == 8 and r["failed"] == 0
            assert r["total_output_tokens"] == 48 and r["total_input_tokens"] > 8
            assert r["max_concurrent_requests"] <= r["max_concurrency"]
            assert r["request_goodput"] == pytest.approx(r["request_throughput"])
            assert 0 < r["p50_ttft_ms"] <= r["p90_ttft_ms"] <= r["p99_ttft_ms"] <= r["mean_e2el_ms"] * 8
            assert r["mean_itl_ms"] > 0 and r["mean_tpot_ms"] > 0
        assert main(argv[:4] + ["--endpoint", "/v1/chat/completions", "--num-prompts", "2", "--prompt-len", "5",
                                "--output-len", "3", "--no-progress"]) == 0
        chat = json.loads(capsys.readouterr().out)
        assert chat["completed"] == 2 and chat["endpoint"] == "/v1/chat/completions"


def test_bench_serve_without_a_server_is_one_line(capsys):
    code = main(["bench", "serve", "--url", "http://127.0.0.1:9", "--num-prompts", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot list the models of http://127.0.0.1:9" in err and len(err.strip().splitlines()) == 1


# ---- traces, shared prefixes, mixed lengths, the detail file ---------------------------------------------
TRACE_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def _args(tmp_path=None, **kw) -> Namespace:
    base = dict(dataset=None, tokenizer=None, num_prompts=6, prompt_len="40", output_len="9", shared_prefix_len=0)
    return Namespace(**(base | kw))


def test_plain_lengths_give_the_prompts_they_always_did():
    from moekit.serve.bench import WORDS

    rng = random.Random(4)  # the prompts of a plain --prompt-len before length specs: one word draw per token
    old = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(6)]
    assert [p.text for p in make_prompts(_args(), random.Random(4))] == old
    assert [p.text for p in make_prompts(_args(prompt_len=40, output_len=9), random.Random(4))] == old


def test_mixed_lengths_from_a_spec(tmp_path):
    ascii_tokenizer().save(str(tmp_path / "tokenizer.json"))
    args = _args(tokenizer=str(tmp_path), num_prompts=40, prompt_len="uniform:5:30", output_len="uniform:2:7")
    prompts = make_prompts(args, random.Random(0))
    assert {p.prompt_len for p in prompts} <= set(range(5, 31)) and len({p.prompt_len for p in prompts}) > 5
    assert {p.output_len for p in prompts} <= set(range(2, 8)) and len({p.output_len for p in prompts}) > 2
    assert all(len(ascii_tokenizer().encode(p.text, add_special_tokens=False).ids) == p.prompt_len for p in prompts)
    with pytest.raises(ValueError, match="--output-len 'uniform:7': give N, uniform:LO:HI"):
        make_prompts(_args(output_len="uniform:7"), random.Random(0))


def test_shared_prefix_prompts_share_their_first_tokens(tmp_path):
    ascii_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = ascii_tokenizer()
    prompts = make_prompts(_args(tokenizer=str(tmp_path), shared_prefix_len=24), random.Random(2))
    ids = [tok.encode(p.text, add_special_tokens=False).ids for p in prompts]
    assert all(len(i) == p.prompt_len == 40 for i, p in zip(ids, prompts, strict=True))
    assert len({tuple(i[:24]) for i in ids}) == 1  # one prefix ...
    assert len({tuple(i[24:]) for i in ids}) == len(ids)  # ... and each its own rest
    assert len({p.text[:24] for p in prompts}) == 1  # the same decoded text
    words = [p.text.split() for p in make_prompts(_args(shared_prefix_len=10, prompt_len="uniform:5:30"),
                                                  random.Random(2))]
    assert all(len(w) >= 5 for w in words) and len({tuple(w[:4]) for w in words}) == 1
    assert len({tuple(w[:10]) for w in words if len(w) > 10}) == 1 and len({tuple(w) for w in words}) == len(words)


def test_bench_serve_replays_a_trace(tmp_path, capsys):
    from moekit.sim.workload import load_trace

    ascii_tokenizer().save(str(tmp_path / "tokenizer.json"))
    rows = [(0.0, 20, 5), (0.4, 300, 4), (0.8, 10, 150), (1.2, 7, 0)]  # the 2nd and 3rd do not fit 128 tokens
    trace = tmp_path / "t.csv"
    trace.write_text(TRACE_HEAD + "".join(f"2023-11-16 18:00:{1 + t:010.7f},{p},{o}\n" for t, p, o in rows))
    detail = tmp_path / "sent.jsonl"
    with InProcessServer(tiny_engine) as s:
        s.wait_ready()
        assert main(["bench", "serve", "--url", f"http://127.0.0.1:{s.port}", "--trace", str(trace),
                     "--time-scale", "2", "--tokenizer", str(tmp_path), "--ignore-eos", "--num-prompts", "50",
                     "--save-detailed", str(detail), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 4 and report["failed"] == 0 and report["num_prompts"] == 4  # not --num-prompts
    t = report["trace"]
    assert (t["count"], t["clipped"], t["max_model_len"], t["server_added_tokens"]) == (4, 2, 128, 1)  # its BOS
    sent = [json.loads(line) for line in detail.read_text().splitlines()]
    # the trace's lengths, clipped to 128 - 1 tokens (prompt first), each prompt + the server's BOS
    assert [(r["prompt_len"], r["output_len"]) for r in sent] == [(21, 5), (127, 1), (11, 117), (8, 1)]
    assert all(r["ok"] and r["e2el"] >= r["ttft"] > 0 and len(r["itl"]) <= r["output_len"] - 1 for r in sent)
    arrivals = [r["arrival"] for r in sent]
    assert arrivals == sorted(arrivals) and 0.6 - 0.05 <= arrivals[-1] < 0.6 + 30  # 1.2 s at 2x, loosely
    assert report["total_output_tokens"] == 124
    back = load_trace(detail)  # the simulator replays what the server saw
    assert [(r.prompt_len, r.output_len) for r in back] == [(r["prompt_len"], r["output_len"]) for r in sent]


@pytest.mark.parametrize("extra, message", [
    (["--trace", "BAD"], "bad.csv line 3: output length -1 (GeneratedTokens)"),
    (["--trace", "MISSING"], "none.csv: no such file"),
    (["--trace", "conv", "--dataset", "BAD"], "--dataset gives its own prompts"),
    (["--trace", "conv", "--trace-start", "9999"], "has no request in the window"),
    (["--prompt-len", "lognormal:5"], "--prompt-len 'lognormal:5': give N, uniform:LO:HI"),
])
def test_bench_serve_bad_trace_or_lengths_is_one_line(extra, message, tmp_path, capsys):
    trace = tmp_path / "bad.csv"
    trace.write_text(TRACE_HEAD + "2023-11-16 18:00:01.0,10,5\n2023-11-16 18:00:02.0,12,-1\n")
    files = {"BAD": str(trace), "MISSING": str(tmp_path / "none.csv")}
    # all caught before the (absent) server is asked anything
    code = main(["bench", "serve", "--url", "http://127.0.0.1:9", "--no-progress", *[files.get(a, a) for a in extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
