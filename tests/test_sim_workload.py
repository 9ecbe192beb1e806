"""Simulator workloads: arrival processes (bench serve's), the daily curve, length specs, the shipped Azure
traces (window, speed-up, clipping), bad trace files named by line, bench-detail JSONL and dataset files."""

import json
import math
import random
import statistics

import pytest

from moekit.serve.bench import arrival_gaps
from moekit.sim import workload as wl


def _gaps(t):
    return [b - a for a, b in zip([0.0] + t[:-1], t, strict=True)]


def test_poisson_and_gamma_arrivals_have_the_asked_mean_and_variance():
    gaps = _gaps(wl.arrivals(5.0, n=20000, seed=1))
    assert statistics.mean(gaps) == pytest.approx(1 / 5, rel=0.03)
    assert statistics.pvariance(gaps) / statistics.mean(gaps) ** 2 == pytest.approx(1.0, rel=0.06)  # CV^2 = 1/shape
    gaps = _gaps(wl.arrivals(5.0, n=20000, burstiness=4.0, seed=1))
    assert statistics.pvariance(gaps) / statistics.mean(gaps) ** 2 == pytest.approx(0.25, rel=0.08)
    t = wl.arrivals(2.0, duration=100, seed=0)
    assert max(t) <= 100 and len(t) == pytest.approx(200, rel=0.25) and t == sorted(t)
    # the same draws as `moekit bench serve`: its request k is sent at arrivals(...)[k - 1]
    assert _gaps(wl.arrivals(3.0, n=9, burstiness=2.0, seed=7)) == pytest.approx(
        arrival_gaps(10, 3.0, 2.0, random.Random(7))[:-1])
    for bad in (dict(rate=0.0, duration=10), dict(rate=math.inf, n=3), dict(rate=1.0)):
        with pytest.raises(ValueError, match="rate must be > 0|give a duration"):
            wl.arrivals(bad.pop("rate"), **bad)


def test_daily_curve_follows_its_rate():
    # a day in 4 hours (time_scale 6): bins of 600 simulated seconds are the day's hours
    t = wl.daily_curve(20.0, time_scale=6, seed=0)
    assert max(t) <= 86400 / 6 and t == sorted(t)
    counts = [0] * 24
    for x in t:
        counts[int(x // 600)] += 1
    for h in (2, 8, 14, 20):
        expect = sum(wl.daily_rate((h + f / 10) * 600, 20.0, time_scale=6) for f in range(10)) / 10 * 600
        assert counts[h] == pytest.approx(expect, rel=0.15)
    assert counts[14] > 3 * counts[2]  # the afternoon peak against the night
    assert wl.daily_rate(14 * 3600, 8.0) == pytest.approx(8.0) and wl.daily_rate(2 * 3600, 8.0) == pytest.approx(2.0)
    assert wl.daily_rate(3600, 8.0, time_scale=24) == pytest.approx(wl.daily_rate(86400, 8.0))  # an hour = a day
    # peak_hour moves the peak; duration is the day's clock (6 h at 3x: 2 simulated hours of the night)
    assert wl.daily_rate(9 * 3600, 4.0, peak_hour=9) == pytest.approx(4.0)
    night = wl.daily_curve(10.0, duration=6 * 3600, time_scale=3, seed=1)
    assert max(night) <= 7200 and len(night) < 0.5 * 10 * 7200
    with pytest.raises(ValueError, match="trough must be"):
        wl.daily_curve(5.0, trough=2.0)


def test_length_specs():
    rng = random.Random(0)
    assert wl.parse_lengths("128").sample(3, rng) == [128] * 3 and wl.parse_lengths(64).fixed == 64
    u = wl.parse_lengths("uniform:16:32").sample(2000, rng)
    assert min(u) == 16 and max(u) == 32
    ln = wl.parse_lengths("lognormal:500:1.0").sample(20000, rng)
    assert statistics.mean(ln) == pytest.approx(500, rel=0.05) and min(ln) >= 1
    assert statistics.median(ln) == pytest.approx(500 * math.exp(-0.5), rel=0.05)
    assert min(wl.parse_lengths("lognormal:1:3").sample(1000, rng)) == 1
    for bad in ("x", "uniform:5", "lognormal:0:1", "uniform:9:3", "-4", "zipf:1.1", "12.5", "lognormal:9:-1"):
        with pytest.raises(ValueError, match=r"--prompt-len .*(give N, uniform:LO:HI or lognormal:MEAN:SIGMA)"):
            wl.parse_lengths(bad, "--prompt-len")


def test_synthetic_shares_a_prefix():
    reqs = wl.synthetic(10, 20, "uniform:1:40", "8", shared_prefix_len=64, num_prefixes=2, seed=3)
    assert all(r.prompt_len >= 65 and r.prefix_len == 64 for r in reqs)
    assert {r.prefix_id for r in reqs} == {0, 1}
    s = wl.summary(reqs)
    assert s["count"] == len(reqs) and s["shared_prefix_share"] == 1.0 and 0.5 < s["shared_prefix_token_share"] < 1


def test_shipped_conv_trace():
    reqs = wl.load_trace(wl.builtin_trace("conv"))
    assert len(reqs) == 19366 and reqs[0].arrival == 0.0 and (reqs.clipped, reqs.skipped) == (0, 0)
    assert 3400 < reqs[-1].arrival < 3601
    assert all(a.arrival <= b.arrival for a, b in zip(reqs, reqs[1:], strict=False))
    assert (reqs[0].prompt_len, reqs[0].output_len) == (374, 44)  # the file's first row
    assert reqs[1].arrival == pytest.approx(4.314579, abs=1e-6)  # 18:15:50.9951690 - 18:15:46.6805900
    s = wl.summary(reqs)
    assert s["count"] == 19366 and 5 < s["offered_rate"] < 6 and s["prompt_len"]["p50"] <= s["prompt_len"]["p90"]
    assert wl.resolve_trace("conv") == wl.builtin_trace("conv")
    readme = (wl.builtin_trace("code").parent / "README.md").read_text()
    assert "Splitwise" in readme and "CC-BY 4.0" in readme


def test_trace_window_speed_up_and_clipping():
    full = wl.load_trace(wl.builtin_trace("conv"))
    win = wl.load_trace(wl.builtin_trace("conv"), start=600, duration=300, time_scale=2.0)
    inside = [r for r in full if 600 <= r.arrival < 900]
    assert len(win) == len(inside) and 0 <= win[0].arrival and win[-1].arrival < 150
    assert win[0].arrival == pytest.approx((inside[0].arrival - 600) / 2)
    assert len(wl.load_trace(wl.builtin_trace("conv"), max_requests=10)) == 10
    code = wl.load_trace(wl.builtin_trace("code"))
    clipped = wl.load_trace(wl.builtin_trace("code"), max_len=512)
    assert all(r.prompt_len + r.output_len <= 512 and r.prompt_len >= 1 and r.output_len >= 1 for r in clipped)
    assert clipped.clipped == sum(r.prompt_len + r.output_len > 512 for r in code) > 0
    assert wl.summary(clipped)["clipped"] == clipped.clipped
    # the prompt is cut first, then the output to what is left
    c = wl.clip([wl.SimRequest(0.0, 900, 50), wl.SimRequest(1.0, 100, 900), wl.SimRequest(2.0, 10, 10)], 512)
    assert [(r.prompt_len, r.output_len) for r in c] == [(511, 1), (100, 412), (10, 10)] and c.clipped == 2


def test_bad_trace_files_name_the_line(tmp_path):
    head = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    ok = "2023-11-16 18:17:03.9799600,10,5\n"
    cases = {"neg.csv": (head + ok + "2023-11-16 18:17:04.0,-3,5\n", "neg.csv line 3: prompt length -3"),
             "head.csv": ("time,a,b\n" + ok, "head.csv line 1: the header must be TIMESTAMP,ContextTokens"),
             "stamp.csv": (head + ok + ok + "yesterday,1,2\n", "stamp.csv line 4: timestamp 'yesterday'"),
             "clock.csv": (head + "2023-11-16 25:17:04.0,1,2\n", "clock.csv line 2: timestamp"),
             "words.csv": (head + "2023-11-16 18:17:04.0,ten,5\n", "words.csv line 2: prompt length 'ten'"),
             "frac.csv": (head + ok + "2023-11-16 18:17:04.0,10,2.5\n", "frac.csv line 3: output length '2.5'"),
             "short.csv": (head + "2023-11-16 18:17:04.0,10\n", "short.csv line 2: expected 3 values"),
             "bad.jsonl": ('{"arrival": 0.5, "prompt_len": 7, "output_len": 3}\nnot json\n', "bad.jsonl line 2"),
             "neg.jsonl": ('\n{"arrival": 0, "prompt_len": 0, "output_len": 3}\n', "neg.jsonl line 2: prompt_len 0")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            wl.load_trace(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no such file"):
        wl.load_trace(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="no shipped trace 'chat'"):
        wl.builtin_trace("chat")
    (tmp_path / "zero.csv").write_text(head + "2023-11-16 18:17:04.0,10,0\n")
    assert wl.load_trace(tmp_path / "zero.csv")[0].output_len == 1  # GeneratedTokens 0 counts as 1


def test_a_trace_across_midnight_keeps_counting(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 23:59:59.5000000,3,4\n"
                 "2023-11-17 00:00:00.2500000,5,6\n")
    assert [r.arrival for r in wl.load_trace(f)] == pytest.approx([0.0, 0.75])


def test_bench_detail_jsonl_round_trip(tmp_path):
    rows = [{"arrival": 0.0, "prompt_len": 12, "output_len": 5, "ok": True, "ttft": 0.01, "e2el": 0.05, "itl": []},
            {"arrival": 0.4, "prompt_len": None, "output_len": 0, "ok": False, "error": "HTTP 429"},
            {"arrival": 1.25, "prompt_len": 30, "output_len": 2, "ok": True, "ttft": 0.02, "e2el": 0.03, "itl": [0.01]}]
    f = tmp_path / "sent.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = wl.load_trace(f)
    assert [(r.arrival, r.prompt_len, r.output_len) for r in w] == [(0.0, 12, 5), (1.25, 30, 2)] and w.skipped == 1
    fast = wl.load_trace(f, time_scale=2.5, max_len=20)
    assert [(r.arrival, r.prompt_len, r.output_len) for r in fast] == [(0.0, 12, 5), (0.5, 19, 1)]
    assert fast.clipped == 1


def test_dataset_lengths(tmp_path):
    from conftest import char_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "one two three", "output_len": 3}\n\n{"prompt": "four"}\n')
    reqs = wl.load_dataset(data, n=4, output_len=9)
    assert [(r.arrival, r.prompt_len, r.output_len) for r in reqs] == [(0, 3, 3), (0, 1, 9), (0, 3, 3), (0, 1, 9)]
    tok = tmp_path / "tokenizer.json"
    char_tokenizer(list("abcdefghijklmnopqrstuvwxyz ")).save(str(tok))
    reqs = wl.load_dataset(data, tmp_path, rate=2.0, seed=5)
    assert [r.prompt_len for r in reqs] == [13, 4]  # one token per character
    assert [r.arrival for r in reqs] == pytest.approx([0.0, arrival_gaps(2, 2.0, 1.0, random.Random(5))[0]])
    data.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="d.jsonl line 1 is not a JSON object"):
        wl.load_dataset(data)
