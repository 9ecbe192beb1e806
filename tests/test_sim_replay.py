"""The simulator against the real engine: replaying the engine's step log gives the same batches and preemptions;
a calibrated profile predicts the engine's steps; `moekit sim` on bad input exits 2 with one line."""

import json

import pytest
from conftest import char_tokenizer, save_run, tiny_model

from moekit.cli import main
from moekit.infer import Engine, SamplingParams
from moekit.sim import calibrate, replay
from moekit.sim.profile import StepProfile, fit, nnls
from moekit.sim.replica import prompt_ids


def _engine_log(num_blocks: int, waves: list[tuple[int, list[int], int]]) -> tuple[list, list]:
    """Drive a real Engine: wave (step index, prompt lengths, max tokens) is added before that step. Returns the
    arrivals and logged steps in `moekit sim replay`'s form, with step k taking 1 s and arrivals at step index."""
    eng = Engine(tiny_model(), num_blocks=num_blocks, block_size=4, max_num_batched_tokens=32, max_num_seqs=6)
    log: list = []
    calibrate._record(eng, log)
    arrivals, steps, n, k = [], [], 0, 0
    pending = sorted(waves)
    while pending or eng.has_unfinished():
        while pending and pending[0][0] <= k:
            _, lens, mt = pending.pop(0)
            for p in lens:
                rid = f"q{n}"
                eng.add_request(prompt_ids(n, p, vocab=eng.cfg.vocab_size), SamplingParams(max_tokens=mt,
                                                                                          ignore_eos=True), rid)
                arrivals.append((k - replay.EPS, rid, p, mt))
                n += 1
        if eng.has_unfinished():
            before = len(log)
            eng.step()
            for sched, pre in log[before:]:
                steps.append(replay.LoggedStep(float(k), float(k) + 1.0, [(r, a, c) for r, a, c, *_ in sched], pre))
        k += 1
    eng.check_idle()
    return arrivals, steps


def test_replaying_the_engines_step_log_makes_the_same_decisions():
    waves = [(0, [9, 30, 5], 12), (2, [17, 3, 40, 8], 10), (5, [25] * 4, 9), (30, [6, 6], 20)]
    arrivals, steps = _engine_log(num_blocks=40, waves=waves)
    assert sum(len(s.preempted) for s in steps) > 0, "the pool is meant to force preemptions"
    out = replay.replay(arrivals, steps, num_blocks=40, block_size=4, max_num_seqs=6, max_num_batched_tokens=32,
                        max_model_len=160, vocab=97)
    assert out["same"], out.get("first_difference")
    assert out["steps_simulated"] == out["steps_logged"] == len(steps)
    assert out["preemptions_simulated"] == out["preemptions_logged"] > 0


def test_nnls_recovers_non_negative_coefficients():
    import numpy as np

    rng = np.random.default_rng(0)
    A = rng.uniform(0, 10, (200, 4))
    x = np.array([0.5, 0.0, 2.0, 0.1])
    assert nnls(A, A @ x) == pytest.approx(x, abs=1e-9)
    assert (nnls(A, A @ np.array([1.0, -1.0, 0.5, 0.0])) >= 0).all()
    rows = [(s, s * 3, s * 100.0, s * 150.0, s) for s in range(1, 60)]
    secs = [1e-3 + 2e-5 * r[1] + 1e-7 * r[2] for r in rows]
    coef, stats = fit(rows, secs, ("intercept", "seqs", "tokens", "kv_tokens", "attn", "logits"))
    assert stats["median_rel_err"] < 1e-6


def test_calibrated_profile_predicts_the_engine_and_round_trips(tmp_path):
    save_run(tmp_path / "run", tiny_model(), char_tokenizer())
    ns = calibrate_args(tmp_path, "--waves", "2", "--output-len", "8", "--max-num-seqs", "16",
                        "--max-num-batched-tokens", "128")
    assert calibrate.run(ns) == 0
    prof = StepProfile.load(tmp_path / "p.json")
    assert prof.engine["num_blocks"] > 0 and prof.fit["samples"] > 50
    records = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    # Predicted against measured, on the sweep's own steps: a ratio of two figures from one run, not a time.
    from moekit.sim.profile import batch_features

    ratios = sorted(prof.step_seconds(*batch_features(r["scheduled"])) / (r["t1"] - r["t0"])
                    for r in records if r["scheduled"])
    assert 0.5 < ratios[len(ratios) // 2] < 2.0
    # The sweep's own log replays to the same decisions.
    arrivals, steps = replay.read_log(tmp_path / "steps.jsonl")
    e = prof.engine
    out = replay.replay(arrivals, steps, num_blocks=e["num_blocks"], block_size=e["block_size"],
                        max_num_seqs=e["max_num_seqs"], max_num_batched_tokens=e["max_num_batched_tokens"],
                        max_model_len=e["max_model_len"])
    assert out["same"], out.get("first_difference")
    (tmp_path / "bad.json").write_text('{"kind": "moekit-step-profile", "step": {}}')
    with pytest.raises(ValueError, match="lacks coefficients"):
        StepProfile.load(tmp_path / "bad.json")


def calibrate_args(tmp_path, *extra):
    import argparse

    p = argparse.ArgumentParser()
    calibrate.add_arguments(p)
    return p.parse_args(["--model", str(tmp_path / "run"), "--out", str(tmp_path / "p.json"),
                         "--step-log", str(tmp_path / "steps.jsonl"), *extra])


@pytest.mark.parametrize("argv,message", [
    (["--rate", "0"], "--rate '0': a rate must be > 0"),
    (["--slo", "ttft=20"], "--slo 'ttft=20': give METRIC:MS"),
    (["--slo", "ttft:fast"], "give METRIC:MS"),
    (["--tp", "8", "--pp", "2"], "does not fit on tensor 8 x pipeline 2"),
    (["--trace", "TRACE"], "line 2: prompt length -5"),
    (["--router", "random"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,-5,5\n")
    argv = [str(trace) if a == "TRACE" else a for a in argv]
    try:
        rc = main(["sim", *argv, "--duration", "5"])
    except SystemExit as e:  # argparse's own errors (moekit.cli.Parser: one line, exit 2)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_sim_cli_prints_bench_serve_figures(tmp_path, capsys):
    assert main(["sim", "--gpu", "H100", "--rate", "1", "--duration", "30", "--prompt-len", "256",
                 "--output-len", "32", "--slo", "ttft:5000,tpot:500", "--json", "--out", str(tmp_path / "s.json"),
                 "--chart", str(tmp_path / "s.png")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["completed"] > 10 and s["failed"] == 0
    for key in ("median_ttft_ms", "p90_tpot_ms", "p99_itl_ms", "output_throughput", "request_goodput"):
        assert key in s
    assert 0 < s["sim"]["busy"] <= 1 and s["sim"]["cost_per_1k_output"] > 0
    assert (tmp_path / "s.png").stat().st_size > 1000
