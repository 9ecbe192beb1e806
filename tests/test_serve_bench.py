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
