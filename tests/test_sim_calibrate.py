"""`moekit sim calibrate` and its step-time profile: the NNLS fit recovers known coefficients (exactly, within a band
under noise, and past outliers); batch features of a hand-made record; the profile file round trip and bad files;
a sweep of a tiny model predicts freshly measured steps (a ratio of two measurements, never a wall-clock limit);
a step log, written by the sweep or made by hand with known gaps, fits to the same steps and to those gaps."""

import argparse
import json
import random
import time

import numpy as np
import pytest
from conftest import char_tokenizer, save_run, tiny_model

from moekit.sim import calibrate
from moekit.sim.profile import GAP_TERMS, STEP_TERMS, StepProfile, batch_features, experts_touched, fit, nnls, step_row


def args_for(*argv: str, overrides: dict | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    calibrate.add_arguments(p)
    ns = p.parse_args(list(argv))
    if overrides is not None:
        ns.overrides = overrides  # as moekit.cli.main sets them from --key=value
    return ns


# ---- the fit --------------------------------------------------------------------------------------------
def test_nnls_recovers_known_coefficients_exactly_and_within_a_band_under_noise():
    rng = np.random.default_rng(1)
    A = rng.uniform(0, 1, (300, 5))
    x = np.array([3.0, 0.0, 0.5, 0.0, 1.25])
    assert nnls(A, A @ x) == pytest.approx(x, abs=1e-10)
    z = nnls(A, A @ np.array([1.0, -2.0, 0.5, 0.3, 0.0]))  # the unconstrained optimum is infeasible
    assert (z >= 0).all() and z[1] == 0
    # Steps spanning three decades (decode to prefill), 5% multiplicative noise: every coefficient within 10%.
    n = 400
    seqs, ctx = rng.integers(1, 64, n), rng.uniform(0, 500, (2, n))
    tokens = np.where(rng.random(n) < 0.5, seqs, rng.integers(1, 2048, n))  # decode steps and prefill chunks
    rows = list(zip(seqs, tokens, tokens * ctx[0], tokens * ctx[1], rng.integers(0, 64, n), strict=True))
    truth = dict(zip(STEP_TERMS[:6], (2e-3, 1e-4, 3e-5, 2e-8, 0.0, 5e-5), strict=True))
    secs = [truth["intercept"] + sum(c * f for c, f in zip(list(truth.values())[1:], r, strict=True))
            for r in rows]
    coef, stats = fit(rows, secs, STEP_TERMS[:6])
    assert coef == pytest.approx(truth, rel=1e-6, abs=1e-12) and stats["median_rel_err"] < 1e-9
    noisy = [y * rng.lognormal(0, 0.05) for y in secs]
    coef, stats = fit(rows, noisy, STEP_TERMS[:6])
    for k in ("intercept", "seqs", "tokens", "logits"):
        assert coef[k] == pytest.approx(truth[k], rel=0.1), k
    assert 0.01 < stats["median_rel_err"] < 0.06 and stats["r2"] > 0.99


def test_fit_trims_outliers_and_plain_fit_gives_the_mean():
    rng = np.random.default_rng(2)
    rows = [(int(n),) for n in rng.integers(1, 100, 400)]
    secs = [1e-3 + 1e-5 * n for (n,) in rows]
    spiked = [y * (10 if i % 50 == 7 else 1) for i, y in enumerate(secs)]  # 2%: a GC pause, a neighbour's job
    coef, stats = fit(rows, spiked, ("intercept", "tokens"))
    assert coef == pytest.approx({"intercept": 1e-3, "tokens": 1e-5}, rel=1e-6)
    assert stats["samples"] == 400 and stats["p90_rel_err"] < 1e-6  # statistics over every sample, spikes too
    coef, _ = fit(rows, spiked, ("intercept", "tokens"), trim=0)
    assert coef["intercept"] > 1.001e-3  # without trimming, the spikes pull it up
    # relative=False: plain least squares, the conditional mean of symmetric noise.
    coef, _ = fit([(0,)] * 200, [1.0, 3.0] * 100, ("intercept", "x"), relative=False, trim=0)
    assert coef["intercept"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="too few"):
        fit([(1,)], [1.0], ("intercept", "x"))


def test_batch_features_of_a_hand_made_record():
    record = [("a", 5, 0, 0, 1),   # a whole 5-token prompt: 5 queries over 1..5 keys
              ("b", 1, 10, 0, 1),  # a decode at context 10
              ("c", 3, 4, 2, 3),   # a decode with 2 draft tokens: 3 logits rows
              ("d", 8, 0, 0, 0)]   # a prefill chunk that stops short: no logits
    seqs, tokens, kv, attn, logits = batch_features(record)
    assert (seqs, tokens, logits) == (4, 17, 5)
    assert kv == 5 + 11 + 7 + 8
    assert attn == 5 * 3 + 1 * 11 + 3 * 6 + 8 * 4.5
    moe = {"n_expert": 8, "top_k": 2, "layers": 3}
    assert experts_touched(1, moe) == pytest.approx(3 * 2)  # one token reads its top-2 in each MoE layer
    assert experts_touched(10_000, moe) == pytest.approx(3 * 8)  # a large batch reads every expert
    assert experts_touched(17, {}) == 0.0  # dense
    assert step_row((4, 17, 31.0, 80.0, 5), moe)[:5] == (4, 17, 31.0, 80.0, 5)


# ---- the profile file -----------------------------------------------------------------------------------
def test_profile_round_trip_and_bad_files(tmp_path):
    prof = StepProfile(step=dict(zip(STEP_TERMS, (1e-3, 2e-4, 3e-5, 1e-7, 1e-9, 4e-5, 6e-5), strict=True)),
                       gap={"intercept": 2e-4, "outputs": 1e-5, "added": 3e-4}, model="runs/x", threads=2,
                       source="sweep", engine={"num_blocks": 64, "block_size": 16}, moe={"n_expert": 8, "top_k": 2,
                                                                                        "layers": 4})
    prof.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["kind"] == "moekit-step-profile"
    back = StepProfile.load(tmp_path / "p.json")
    assert back == prof
    want = 1e-3 + 2e-4 * 2 + 3e-5 * 9 + 1e-7 * 40 + 1e-9 * 50 + 4e-5 * 2 + 6e-5 * experts_touched(9, prof.moe)
    assert back.step_seconds(2, 9, 40, 50, 2) == pytest.approx(want)
    assert back.gap_seconds(3, 1) == pytest.approx(2e-4 + 3e-5 + 3e-4)

    with pytest.raises(FileNotFoundError, match="moekit sim calibrate --model RUN --out FILE"):
        StepProfile.load(tmp_path / "none.json")
    bad = {"is not JSON": "{", "not a moekit step profile": '{"kind": "x"}',
           "lacks coefficients experts": json.dumps({"kind": "moekit-step-profile", "step": {
               k: 0.0 for k in STEP_TERMS[:-1]}, "gap": dict.fromkeys(GAP_TERMS, 0.0)}),
           "moe must give": json.dumps({"kind": "moekit-step-profile", "step": dict.fromkeys(STEP_TERMS, 0.0),
                                        "gap": dict.fromkeys(GAP_TERMS, 0.0), "moe": {"n_expert": 2, "top_k": 4,
                                                                                     "layers": 1}}),
           "unexpected keyword": json.dumps({"kind": "moekit-step-profile", "step": dict.fromkeys(STEP_TERMS, 0.0),
                                             "gap": dict.fromkeys(GAP_TERMS, 0.0), "colour": "red"}),
           "latency_s must be seconds": json.dumps({"kind": "moekit-step-profile", "step": dict.fromkeys(
               STEP_TERMS, 0.0), "gap": dict.fromkeys(GAP_TERMS, 0.0), "latency_s": -1}),
           "jitter must hold edges": json.dumps({"kind": "moekit-step-profile", "step": dict.fromkeys(
               STEP_TERMS, 0.0), "gap": dict.fromkeys(GAP_TERMS, 0.0), "jitter": {"edges": [0.1],
                                                                                       "quantiles": [[1.0]]}})}
    for i, (message, text) in enumerate(bad.items()):
        (tmp_path / f"bad{i}.json").write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            StepProfile.load(tmp_path / f"bad{i}.json")
        assert "moekit sim calibrate" in str(e.value) and "\n" not in str(e.value)


# ---- the sweep ------------------------------------------------------------------------------------------
ENGINE_FLAGS = ("--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--kv-cache-gb", "0.01")


def test_sweep_profile_predicts_freshly_measured_steps(tmp_path, capsys):
    save_run(tmp_path / "run", tiny_model(), char_tokenizer())
    ns = args_for("--model", str(tmp_path / "run"), "--out", str(tmp_path / "p.json"), "--step-log",
                  str(tmp_path / "sweep.jsonl"), "--waves", "2", "--output-len", "6", *ENGINE_FLAGS)
    assert calibrate.run(ns) == 0
    err = capsys.readouterr().err
    assert "step = intercept" in err and "median error" in err
    prof = StepProfile.load(tmp_path / "p.json")
    assert prof.source == "sweep" and prof.moe == {"n_expert": 4, "top_k": 2, "layers": 1}
    assert prof.engine["max_num_seqs"] == 8 and prof.engine["max_num_batched_tokens"] == 64
    assert prof.gap == dict.fromkeys(GAP_TERMS, 0.0) and prof.fit["samples"] > 100

    # Fresh steps of another workload, on an engine built the same way: staggered arrivals of other lengths.
    from moekit.infer import SamplingParams
    from moekit.infer.build import EngineConfig, build_engine

    engine = build_engine(EngineConfig.from_args(ns), progress=lambda *a: None)
    engine.generate([[1, 2, 3]], None)
    rng = random.Random(5)
    ratios, k = [], 0
    while k < 60 or engine.has_unfinished():
        if k < 60 and k % 6 == 0:
            engine.add_request([rng.randrange(1, 97) for _ in range(rng.randint(3, 90))],
                               SamplingParams(temperature=0, max_tokens=rng.randint(4, 20), ignore_eos=True))
        t0 = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - t0
        if engine.last_step is not None:
            ratios.append(prof.step_seconds(*batch_features(engine.last_step.scheduled)) / seconds)
        k += 1
    assert len(ratios) > 50
    assert 0.5 < float(np.median(ratios)) < 2.0, sorted(ratios)[::10]

    # The sweep's own log, read back as a server's: the same steps, so the same step fit (the sweep has no gaps:
    # the gap fit from its log is the sweep's loop overhead, small and non-negative).
    same = calibrate.profile_from_log(tmp_path / "sweep.jsonl", moe=prof.moe)
    assert same.step == prof.step and same.fit["samples"] == prof.fit["samples"] and same.moe == prof.moe
    assert same.fit["gap"]["samples"] > 100 and all(v >= 0 for v in same.gap.values())


def test_a_preset_with_overrides_and_the_time_budget(tmp_path, capsys):
    out = tmp_path / "p.json"
    ns = args_for("--model", "tiny", "--out", str(out), "--waves", "1", "--output-len", "4", "--max-model-len", "64",
                  *ENGINE_FLAGS, overrides={"n_layer": "1", "d_model": "32", "n_head": "2", "head_dim": "16",
                                            "d_ff": "64", "vocab_size": "256"})
    assert calibrate.run(ns) == 0
    prof = StepProfile.load(out)
    assert prof.model == "tiny" and prof.moe == {"n_expert": 8, "top_k": 2, "layers": 1}
    full = prof.fit["samples"]
    # A budget far below the sweep's: the first two cells run (they set the clock), every other would overrun.
    ns.seconds, ns.step_log = 1e-6, str(tmp_path / "short.jsonl")
    assert calibrate.run(ns) == 0
    assert "(10 left out to fit --seconds)" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "short.jsonl").read_text().splitlines()]
    assert sorted({r["added"][0][1] for r in rows if r["added"]}) == [4]  # the cheapest cells: batch 1 and 2 x 4
    assert len({r["added"][0][0] for r in rows if r["added"]}) == 3
    assert StepProfile.load(out).fit["samples"] < full


# ---- from a server's step log ---------------------------------------------------------------------------
STEP = dict(zip(STEP_TERMS, (1e-3, 1e-4, 2e-5, 1e-7, 1e-9, 5e-5, 0.0), strict=True))
GAP = {"intercept": 2e-4, "outputs": 3e-5, "added": 5e-4}


def synthetic_log(path, episodes: int = 40, seed: int = 0) -> int:
    """A server's log with known step times and gaps: episodes of requests separated by long idle waits (an
    arrival's wait, which must not count as overhead), ending by finishing or by aborting what is left. Returns the
    number of busy gaps."""
    rng = random.Random(seed)
    lines = [{"kind": "moekit-step-log", "version": 1, "engine": {"num_blocks": 99, "max_in_flight": 1,
                                                                   "device": "cpu"}, "moe": {}}]
    t, n, busy = 0.0, 0, 0
    for ep in range(episodes):
        t += 1.0 + rng.random()  # idle: waiting for the next request
        live, prev_outputs = [], None
        steps = rng.randint(3, 12)
        for s in range(steps):
            added = []
            for _ in range(rng.randint(1, 3) if s == 0 else int(rng.random() < 0.3)):
                added.append([f"r{n}", rng.randint(1, 200), 16])
                live.append(f"r{n}")
                n += 1
            if prev_outputs is not None:
                t += GAP["intercept"] + GAP["outputs"] * prev_outputs + GAP["added"] * len(added)
                busy += 1
            t_loop = t - 1e-5
            sched = [(rid, rng.choice([1, 1, 1, rng.randint(2, 64)]), rng.randint(0, 300), 0, rng.randint(0, 1))
                     for rid in live]
            secs = STEP["intercept"] + sum(c * f for c, f in zip(list(STEP.values())[1:],
                                                                 step_row(batch_features(sched), {}), strict=True))
            outputs = sum(1 for e in sched if e[4])
            finished = live if s == steps - 1 and ep % 2 == 0 else []
            lines.append({"t_loop": t_loop, "t0": t, "t1": t + secs, "added": added, "aborted": [],
                          "scheduled": sched, "preempted": [], "outputs": outputs, "finished": finished})
            t += secs
            prev_outputs = outputs
        if ep % 2:  # the client left: aborted in an iteration without a step, then the engine idles
            t += 1e-4
            lines.append({"t_loop": t, "added": [], "aborted": live})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return busy


def test_fit_from_a_step_log_recovers_step_times_and_busy_gaps(tmp_path, capsys):
    busy = synthetic_log(tmp_path / "steps.jsonl")
    prof = calibrate.profile_from_log(tmp_path / "steps.jsonl", model="m")
    assert prof.step == pytest.approx(STEP, rel=1e-6, abs=1e-12)
    assert prof.gap == pytest.approx(GAP, rel=1e-6)
    assert prof.fit["gap"]["samples"] == busy  # no idle wait among them
    assert prof.engine == {"num_blocks": 99} and prof.source.startswith("step-log")
    ns = args_for("--from-step-log", str(tmp_path / "steps.jsonl"), "--out", str(tmp_path / "p.json"))
    assert calibrate.run(ns) == 0
    err = capsys.readouterr().err
    assert "step = intercept 1e+03" in err and "gap = intercept 200, outputs 30, added 500 (us)" in err
    assert StepProfile.load(tmp_path / "p.json").gap == pytest.approx(GAP, rel=1e-6)


def test_bad_step_logs_and_flags_are_one_line_errors(tmp_path):
    out = ["--out", str(tmp_path / "p.json")]
    with pytest.raises(FileNotFoundError, match="moekit serve --step-log"):
        calibrate.run(args_for("--from-step-log", str(tmp_path / "none.jsonl"), *out))
    synthetic_log(tmp_path / "ok.jsonl", episodes=2)
    lines = (tmp_path / "ok.jsonl").read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:2] + ['{"t_loop": 1, "t0": 2}'] + lines[2:]))
    with pytest.raises(ValueError, match="bad.jsonl line 3 is not a record"):
        calibrate.run(args_for("--from-step-log", str(tmp_path / "bad.jsonl"), *out))
    (tmp_path / "pp.jsonl").write_text("\n".join([lines[0].replace('"max_in_flight": 1', '"max_in_flight": 2')]
                                                 + lines[1:]))
    with pytest.raises(ValueError, match="pipelined"):
        calibrate.run(args_for("--from-step-log", str(tmp_path / "pp.jsonl"), *out))
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:3]))
    with pytest.raises(ValueError, match="too few to fit"):
        calibrate.run(args_for("--from-step-log", str(tmp_path / "short.jsonl"), *out))
    with pytest.raises(ValueError, match="give --model"):
        calibrate.run(args_for(*out))
    save_run(tmp_path / "run", tiny_model(), char_tokenizer())
    with pytest.raises(ValueError, match="overrides .* apply to a preset"):
        calibrate.run(args_for("--model", str(tmp_path / "run"), *out, overrides={"n_layer": "1"}))
    with pytest.raises(ValueError, match="drop --tp"):
        calibrate.run(args_for("--model", str(tmp_path / "run"), "--tp", "2", *out))


def test_client_latency_is_the_median_of_client_minus_engine_ttft_and_the_simulator_adds_it(tmp_path, capsys):
    synthetic_log(tmp_path / "steps.jsonl", episodes=12)
    _, rows = calibrate.read_step_log(tmp_path / "steps.jsonl")
    # The engine's TTFT, by hand: the iteration that added a request to the end of its first step with logits.
    added, first = {}, {}
    for row in rows:
        for rid, *_ in row.get("added", []):
            added[rid] = row["t_loop"]
        for rid, _n, _c, _s, logits in row.get("scheduled", []):
            if logits:
                first.setdefault(rid, row["t1"])
    engine = [first[r] - added[r] for r in added if r in first]
    assert calibrate.engine_ttfts(rows) == pytest.approx(engine)
    rng = random.Random(0)
    detail = [{"arrival": 0.5 * k, "ok": True, "ttft": e + 0.004 + rng.choice([-1, 1]) * rng.random() * 1e-3}
              for k, e in enumerate(engine)]
    detail.insert(3, {"arrival": 1.6, "ok": False, "ttft": 0.0})  # a failed request: not the engine's
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in detail))
    ns = args_for("--from-step-log", str(tmp_path / "steps.jsonl"), "--client-detail", str(tmp_path / "d.jsonl"),
                  "--out", str(tmp_path / "p.json"))
    assert calibrate.run(ns) == 0
    prof = StepProfile.load(tmp_path / "p.json")
    assert prof.latency_s == pytest.approx(0.004, abs=1e-3) and "outside the engine" in capsys.readouterr().err
    # A client that sent fewer (the log's first requests were someone else's, e.g. a test request): the last ones.
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(x | {"ttft": x["ttft"] - 0.001}) + "\n"
                                                  for x in detail[-9:]))
    assert calibrate.profile_from_log(tmp_path / "steps.jsonl", client_detail=tmp_path / "short.jsonl").latency_s \
        == pytest.approx(0.003, abs=1e-3)
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(x) + "\n" for x in detail + detail))
    with pytest.raises(ValueError, match="completed requests, the step log"):
        calibrate.profile_from_log(tmp_path / "steps.jsonl", client_detail=tmp_path / "long.jsonl")

    # The simulator: a request reaches the engine latency_s after it was sent; TTFT and E2E count from the sending.
    from moekit.sim.simulator import Deployment, simulate
    from moekit.sim.steptime import ProfileModel
    from moekit.sim.workload import SimRequest

    def ttft(latency):
        p = StepProfile(step=dict.fromkeys(STEP_TERMS, 0.0) | {"intercept": 0.002}, latency_s=latency)
        run = simulate([SimRequest(0.0, 20, 4), SimRequest(1.0, 20, 4)], lambda i: ProfileModel(p),
                       Deployment(num_blocks=16))
        return list(run.results.ttft)

    assert [b - a for a, b in zip(ttft(0.0), ttft(0.01), strict=True)] == pytest.approx([0.01, 0.01], abs=1e-12)


def test_jitter_gives_the_simulated_steps_the_measured_mean_and_spread():
    """Steps measured with a heavy right tail (1 in 10 is 3x: a shared core): the fit follows the typical step, the
    jitter quantiles hold the ratios, and the profile model's steps then have the measured mean and p90."""
    from moekit.sim.profile import jitter_quantiles
    from moekit.sim.steptime import ProfileModel, Work

    exact = jitter_quantiles([1.0, 2.0, 4.0] * 40, [1.0, 2.0, 4.0] * 40, n=8)  # an exact fit: no jitter
    assert all(q == [1.0] * 8 for q in exact["quantiles"]) and len(exact["quantiles"]) == 3
    rng = random.Random(3)
    tokens = [rng.randint(1, 400) for _ in range(2000)]
    true = [1e-3 + 2e-5 * n for n in tokens]
    measured = [t * (3.0 if rng.random() < 0.1 else rng.uniform(0.95, 1.05)) for t in true]
    coef, _ = fit([(n,) for n in tokens], measured, ("intercept", "tokens"))
    assert coef["tokens"] == pytest.approx(2e-5, rel=0.05)  # the typical step, not the tail
    prof = StepProfile(step=dict.fromkeys(STEP_TERMS, 0.0) | coef, jitter=jitter_quantiles(
        [coef["intercept"] + coef["tokens"] * n for n in tokens], measured))
    w = Work(1, 200, 200.0, 200 * 100.5, 1)
    model = ProfileModel(prof, seed=1)
    draws = np.array([model.step(w).stage_s[0] for _ in range(20000)])
    typical = 1e-3 + 2e-5 * 200
    assert draws.mean() == pytest.approx(typical * (0.9 + 0.3), rel=0.05)  # E[ratio] = 0.9 x 1 + 0.1 x 3
    assert np.percentile(draws, 95) == pytest.approx(3 * typical, rel=0.1)
    # A pause is not proportional: short steps (1-100 tokens) that stall 1 in 10, long ones (900-1000) that do not;
    # the long steps' draws come from their own bin.
    short = [rng.randint(1, 100) for _ in range(1000)]
    long = [rng.randint(900, 1000) for _ in range(1000)]
    ms = [(1e-3 + 2e-5 * n) * (3.0 if rng.random() < 0.1 else 1.0) for n in short] + \
         [(1e-3 + 2e-5 * n) * rng.uniform(0.98, 1.02) for n in long]
    prof2 = StepProfile(step=dict.fromkeys(STEP_TERMS, 0.0) | {"intercept": 1e-3, "tokens": 2e-5},
                        jitter=jitter_quantiles([1e-3 + 2e-5 * n for n in short + long], ms))
    m2 = ProfileModel(prof2, seed=4)
    long_draws = np.array([m2.step(Work(1, 950, 950.0, 950 * 475.5, 1)).stage_s[0] for _ in range(3000)])
    short_draws = np.array([m2.step(Work(1, 50, 50.0, 50 * 25.5, 1)).stage_s[0] for _ in range(3000)])
    assert long_draws.max() < 1.03 * (1e-3 + 2e-5 * 950)
    assert short_draws.max() == pytest.approx(3 * (1e-3 + 2e-5 * 50), rel=0.05)
    assert ProfileModel(prof, jitter=False).step(w).stage_s[0] == pytest.approx(prof.step_seconds(1, 200, 200.0,
                                                                                                   20100.0, 1))
