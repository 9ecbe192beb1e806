"""Issue 14, build point 6: `moekit plan --simulate`, the article's serving-cost claims under real traffic.

A small version runs for real: gpt4-mini on two made-up GPUs slow enough that a replica saturates at a few
requests/s (so every simulation is ~1,000 requests), the shipped Azure conversation trace, short windows, a
bracket without bisection and a day of 2 points. The GPT-4 default takes minutes and is not run here; the CLI
test replaces the simulation by the small result and checks the wiring (options in, rows and JSON out).

Assumptions the checks rest on:
- Utilization can only add cost: the closed form's decode-only $ per 1k output tokens at busy 100% and at the
  largest batch the KV cache holds (moekit/plan/serve.py) is a floor for the simulated figure, which also charges
  the prefill time of the trace's prompts (5-20 prompt tokens per output token) to the output. The closed form's
  "all-in" figure (its prefill time added) is no floor: it runs prefill and decode one after the other, where the
  scheduler's mixed steps hide memory-bound decode under compute-bound prefill (GPT-4 on A100s: simulated
  $0.0059 at 88% busy against $0.0061 all-in).
- The day's $ per 1k is the fleet's cost for 24 h over the output tokens its points serve; the oracle recomputes
  it by hand from a made-up set of points.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from moekit.cli import main
from moekit.plan.hardware import GPU
from moekit.sim import claims as sc
from moekit.sim import workload as wl

SLOW = GPU("slow-gpu", memory_gb=4, hbm_gb_s=20, nvlink_gb_s=10, tflops={"bf16": 1.0}, price_per_hour=1.0)
FAST = GPU("fast-gpu", memory_gb=4, hbm_gb_s=40, nvlink_gb_s=10, tflops={"bf16": 2.0}, price_per_hour=1.5)


def small_config(**kw) -> sc.SimClaimsConfig:
    base = dict(model="gpt4-mini",
                deployments=(sc.SimDeployment("2 slow", SLOW, tp=1, pp=2, article=0.002),
                             sc.SimDeployment("2 fast", FAST, tp=1, pp=2, article=0.001)),
                trace_duration=600, window=90, slo={"ttft": 2000, "tpot": 200}, iterations=0, points=2,
                peak_rate=20, day_all=True)
    return sc.SimClaimsConfig(**(base | kw))


@pytest.fixture(scope="module")
def small() -> sc.SimClaims:
    return sc.simulated_claims(small_config())


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_small_version_runs_and_prices_every_deployment(small):
    assert [c.deployment for c in small.capacities] == ["2 slow", "2 fast"]
    for cap in small.capacities:
        s = cap.at
        assert s.meets_slo and s.requests > 100 and cap.rate > 0
        assert math.isfinite(s.cost_per_1k_output) and s.cost_per_1k_output > 0
        assert 0 < s.busy <= 1 and 0 <= s.kv_peak <= 1
        # the price is the replica's GPUs' hourly cost over the output tokens it serves, recomputed here
        assert s.cost_per_1k_output == pytest.approx(2 * cap.at.output_tokens_per_s ** -1 * (
            SLOW if cap.deployment == "2 slow" else FAST).price_per_hour / 3600 * 1000)
        assert cap.bound_by and all(k in ("ttft", "tpot") for k in cap.bound_by)
    # twice the bandwidth and compute serve more requests per replica
    assert small.capacities[1].rate > small.capacities[0].rate
    assert len(small.days) == 2 and all(d.cost and math.isfinite(d.cost.day_per_1k) for d in small.days)
    assert len(small.claims) == 2 and all(c.article and c.moekit and c.assumptions for c in small.claims)
    json.dumps(small.to_dict())  # what `moekit plan --simulate --json` prints


def test_the_capacity_meets_the_slo_and_every_heavier_load_tried_fails(small):
    for cap in small.capacities:
        failing = [t["rate"] for t in cap.trials if not t["meets_slo"]]
        passing = [t["rate"] for t in cap.trials if t["meets_slo"]]
        assert failing and passing and cap.rate == max(passing) < min(failing) == cap.failed_rate


def test_simulated_cost_is_no_lower_than_the_closed_form_busy_100_percent(small):
    # Same deployment, same lengths: the closed form decodes at the largest batch the KV cache holds, busy all the
    # time, and charges no prefill to the output; real traffic within an SLO can only cost more.
    for cap in small.capacities:
        assert cap.at.cost_per_1k_output >= cap.closed_per_1k
        assert cap.closed_all_in > cap.closed_per_1k  # the prefill of the trace's prompts costs something


def test_the_day_cost_against_a_hand_made_oracle():
    rates = [9.0, 5.0, 2.0, 5.0]
    tokens = [1000.0, 600.0, 250.0, 600.0]
    points = [sc.CurvePoint(hour, 6.0, r, t) for hour, r, t in zip((14, 20, 2, 8), rates, tokens, strict=True)]
    d = sc.day_cost(points, replicas=3, gpus_per_replica=128, price_per_gpu_hour=2.0)
    fleet_day = 3 * 128 * 2.0 * 24  # $: the fleet is paid for every hour
    day_tokens = 3 * 3600 * 6 * (1000 + 600 + 250 + 600)
    assert d.fleet_cost_per_day == pytest.approx(fleet_day)
    assert d.day_output_tokens == pytest.approx(day_tokens)
    assert d.day_per_1k == pytest.approx(fleet_day / day_tokens * 1000)
    assert d.peak_per_1k == pytest.approx(3 * 128 * 2.0 / (1000 * 3 * 3600) * 1000)
    assert d.ratio == pytest.approx(1000 / ((1000 + 600 + 250 + 600) / 4))  # peak tokens / mean tokens
    with pytest.raises(ValueError, match="no point"):
        sc.day_cost([], 1, 1, 1.0)


def test_the_simulated_day_is_the_oracle_on_its_own_points(small):
    for day, cap in zip(small.days, small.capacities, strict=True):
        gpu = SLOW if day.deployment == "2 slow" else FAST
        assert day.replicas == math.ceil(20 / cap.rate)
        assert [p.hour for p in day.points] == [2.0, 14.0]  # 2 points from the peak hour, 12 h apart
        assert sum(p.hours for p in day.points) == 24
        expect = sc.day_cost(day.points, day.replicas, 2, gpu.price_per_hour)
        assert day.cost == expect
        peak, trough = day.points[1], day.points[0]
        # each point is offered the curve's rate / replicas, the trough 25% of the peak
        assert peak.rate == pytest.approx(20 / day.replicas, rel=0.1)
        assert trough.rate == pytest.approx(0.25 * peak.rate, rel=0.15)
        assert day.cost.day_per_1k > day.cost.peak_per_1k  # an idle trough costs the same fleet


@pytest.mark.parametrize("n", [2, 4, 8])
def test_evenly_spaced_points_integrate_the_daily_curve_exactly(n):
    # The midpoint rule on a cosine of period 24 h: its mean from n >= 2 evenly spaced hours is the day's mean.
    hours = [(14 + 24 * k / n) % 24 for k in range(n)]
    mean = sum(wl.daily_rate(h * 3600, 1.0, trough=0.25) for h in hours) / n
    assert mean == pytest.approx((1 + 0.25) / 2)


@pytest.mark.parametrize("kw, message", [
    ({"points": 0}, "--sim-points must be a whole number >= 1"),
    ({"window": -5}, "--sim-window must be a number > 0"),
    ({"trough": 2}, "trough is a share of the peak"),
    ({"slo": {"latency": 5}}, "the SLOs must be"),
    ({"deployments": ()}, "at least one deployment"),
])
def test_bad_config_values_say_what_is_wrong(kw, message):
    with pytest.raises(ValueError, match=message):
        small_config(**kw)


def test_parse_slo():
    assert sc.parse_slo("ttft:10000,tpot:1000") == {"ttft": 10000.0, "tpot": 1000.0}
    for bad in ("ttft", "ttft:0", "itl:5", "ttft:x"):
        with pytest.raises(ValueError, match="--sim-slo"):
            sc.parse_slo(bad)


def test_moekit_plan_simulate_prints_the_rows_and_the_json(small, capsys, monkeypatch):
    seen = {}

    def fake(config, progress=None):  # the GPT-4 default takes minutes: hand back the small result
        seen["config"] = config
        return small

    monkeypatch.setattr(sc, "simulated_claims", fake)
    assert main(["plan", "--simulate", "--sim-points", "6", "--sim-slo", "ttft:5000", "--sim-peak-rate", "2k"]) == 0
    out = capsys.readouterr().out
    c = seen["config"]
    assert (c.points, c.slo, c.peak_rate, c.model) == (6, {"ttft": 5000.0}, 2000.0, "gpt4")
    assert out.startswith("moekit plan: the GPT-4 article")
    assert "4s. Inference under real traffic (simulated" in out
    n = out.count("\n[") - 2  # the report's rows before the two simulated ones, numbered after them
    assert f"[{n + 1}] $0.0049 / $0.0021 per 1k tokens at the utilization real traffic allows" in out
    assert f"[{n + 2}] Poor utilization would more than double the cost" in out
    assert main(["plan", "--simulate", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["simulated"]["claims"]) == 2 and data["simulated"]["capacities"][0]["deployment"] == "2 slow"
    assert "claims" in data and "errata" in data
    assert main(["plan", "--json"]) == 0
    assert "simulated" not in json.loads(capsys.readouterr().out)


def test_nothing_imports_the_simulator_unless_asked():
    code = ("import sys, moekit.cli, moekit.plan, moekit.plan.cli, moekit.plan.report\n"
            "moekit.cli.build_parser('plan')\n"
            "bad = sorted(m for m in sys.modules if m.startswith('moekit.sim'))\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
