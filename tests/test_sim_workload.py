"""Simulator workloads: arrival processes, length specs, the shipped Azure traces and bad trace files."""

import random
import statistics

import pytest

from moekit.sim import workload as wl


def test_poisson_and_gamma_arrivals_have_the_asked_mean_and_variance():
    t = wl.arrivals(5.0, n=20000, seed=1)
    gaps = [b - a for a, b in zip([0.0] + t[:-1], t, strict=True)]
    assert statistics.mean(gaps) == pytest.approx(1 / 5, rel=0.03)
    assert statistics.pvariance(gaps) / statistics.mean(gaps) ** 2 == pytest.approx(1.0, rel=0.06)  # CV^2 = 1/shape
    g = wl.arrivals(5.0, n=20000, burstiness=4.0, seed=1)
    gaps = [b - a for a, b in zip([0.0] + g[:-1], g, strict=True)]
    assert statistics.pvariance(gaps) / statistics.mean(gaps) ** 2 == pytest.approx(0.25, rel=0.08)
    assert max(wl.arrivals(2.0, duration=100, seed=0)) <= 100
    with pytest.raises(ValueError, match="rate must be > 0"):
        wl.arrivals(0.0, duration=10)


def test_daily_curve_follows_its_rate():
    t = wl.daily_curve(20.0, duration=24 * 600, seed=0)  # a day in 4 hours: bins of 600 s = one "hour" each
    counts = [0] * 24
    for x in t:
        counts[int(x // 600)] += 1
    for h in (2, 8, 14, 20):
        expect = 600 * wl.daily_rate((h + 0.5) * 600, 20.0, 24 * 600)
        assert counts[h] == pytest.approx(expect, rel=0.15)
    assert counts[14] > 3 * counts[2]  # the afternoon peak against the night


def test_length_specs():
    rng = random.Random(0)
    assert wl.parse_lengths("128").sample(3, rng) == [128] * 3
    u = wl.parse_lengths("uniform:16:32").sample(500, rng)
    assert min(u) >= 16 and max(u) <= 32
    ln = wl.parse_lengths("lognormal:500:1.0").sample(20000, rng)
    assert statistics.mean(ln) == pytest.approx(500, rel=0.05) and min(ln) >= 1
    for bad in ("x", "uniform:5", "lognormal:0:1", "uniform:9:3", "-4"):
        with pytest.raises(ValueError, match="give N, uniform|must be >= 1"):
            wl.parse_lengths(bad)


def test_synthetic_shares_a_prefix():
    reqs = wl.synthetic(10, 20, "uniform:1:40", "8", shared_prefix_len=64, num_prefixes=2, seed=3)
    assert all(r.prompt_len >= 65 and r.prefix_len == 64 for r in reqs)
    assert {r.prefix_id for r in reqs} == {0, 1}


def test_shipped_conv_trace():
    reqs = wl.load_trace(wl.builtin_trace("conv"))
    assert len(reqs) == 19366 and reqs[0].arrival == 0.0
    assert 3400 < reqs[-1].arrival < 3601
    win = wl.load_trace(wl.builtin_trace("conv"), start=600, duration=300, time_scale=2.0)
    assert 0 <= win[0].arrival and win[-1].arrival < 150
    clipped = wl.load_trace(wl.builtin_trace("code"), max_len=512)
    assert all(r.prompt_len + r.output_len <= 512 and r.output_len >= 1 for r in clipped)
    assert (wl.builtin_trace("code").parent / "README.md").read_text().count("Splitwise") == 1


def test_bad_trace_files_name_the_line(tmp_path):
    head = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    ok = "2023-11-16 18:17:03.9799600,10,5\n"
    cases = {"neg.csv": head + ok + "2023-11-16 18:17:04.0,-3,5\n", "head.csv": "time,a,b\n" + ok,
             "stamp.csv": head + "yesterday,1,2\n", "words.csv": head + "2023-11-16 18:17:04.0,ten,5\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="neg.csv line 3: prompt length -3"):
        wl.load_trace(tmp_path / "neg.csv")
    with pytest.raises(ValueError, match="head.csv line 1: the header"):
        wl.load_trace(tmp_path / "head.csv")
    with pytest.raises(ValueError, match="stamp.csv line 2: timestamp"):
        wl.load_trace(tmp_path / "stamp.csv")
    with pytest.raises(ValueError, match="words.csv line 2"):
        wl.load_trace(tmp_path / "words.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        wl.load_trace(tmp_path / "missing.csv")
    (tmp_path / "d.jsonl").write_text('{"arrival": 0.5, "prompt_len": 7, "output_len": 3}\n')
    assert wl.load_trace(tmp_path / "d.jsonl")[0].prompt_len == 7
