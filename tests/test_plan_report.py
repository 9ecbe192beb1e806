"""Issue 3 acceptance: the GPT-4 report, the `moekit plan` command line and the charts.

Assumptions: the report's claims are recomputed from the presets and the cost models (their own
assumptions are in test_plan_train.py, test_plan_serve.py and test_plan_wall.py); every claim must
land where the article does, within the tolerance written beside it in `moekit/plan/report.py`.
The CLI runs in-process through `moekit.cli.main`; charts are checked as real, non-trivial PNGs.
"""

import json

import pytest

from moekit.cli import main
from moekit.plan import format_report, gpt4_report, write_charts


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_every_claim_of_the_report_agrees():
    r = gpt4_report()
    failing = [c.claim for c in r.claims if not c.agrees]
    assert not failing
    assert {c.section for c in r.claims} == {"1", "2", "3", "4"} and len(r.claims) >= 20
    for c in r.claims:  # each claim says what the article says, what moekit says, and why
        assert c.article and c.moekit and c.assumptions


def test_report_states_the_errata():
    text = format_report(gpt4_report())
    for needle in ("'560 TFLOPs' per token is ~560 GFLOP",  # 1
                   "'$0.0049 cents' and '$0.0021 cents' per 1k tokens are dollars",  # 2
                   "130B x 2 B / 8 = 32.5 GB",  # 3
                   "$54M-$60M",  # 4
                   "15-way pipeline parallelism", "inference uses 16-way",  # 5
                   "'1.76T / 8 x 220B', token dropping, dropout"):  # 6
        assert needle in text
    assert "DISAGREES" not in text


def test_moekit_plan_prints_the_report(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("moekit plan: the GPT-4 article") and "[1] 8x H100 cannot serve" in out
    assert main(["plan", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["claims"]) == len(gpt4_report().claims) and len(data["errata"]) == 6


def test_plan_train_serve_wall_text_and_json(capsys):
    assert main(["plan", "train", "--tokens", "13T", "--mfu", "0.34"]) == 0
    assert "94.9 days" in capsys.readouterr().out
    assert main(["plan", "train", "--gpu", "H100", "--gpus", "8192", "--days", "55", "--price-per-hour", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cost"] == pytest.approx(21.6e6, rel=0.01)
    assert main(["plan", "serve", "--gpu", "H100", "--weight-dtype", "fp8", "--kv-dtype=fp8",
                 "--context", "6k", "--prompt-len", "4k", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["context"] == 6000 and d["n_gpus"] == 128 and d["memory"]["total"] <= d["memory"]["usable"]
    assert main(["plan", "wall", "--hbm-gb-s", "3000", "--tps", "20"]) == 0
    assert "300B parameters read per token" in capsys.readouterr().out


def test_model_overrides_reach_the_plan(capsys):
    # `--n_layer=60` halves the layers: each of 16 stages holds about half the weights.
    assert main(["plan", "serve", "--model", "gpt4", "--batch", "1", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(["plan", "serve", "--model", "gpt4", "--n_layer=60", "--batch", "1", "--json"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["memory"]["weights"] / full["memory"]["weights"] == pytest.approx(0.5, rel=0.05)


def test_hardware_file_on_the_command_line(tmp_path, capsys):
    f = tmp_path / "mine.toml"
    f.write_text('name = "L40S"\nmemory_gb = 48\nhbm_gb_s = 864\nnvlink_gb_s = 32\nprice_per_hour = 1.0\n'
                 'tflops = {bf16 = 362, fp8 = 733}\n')
    assert main(["plan", "serve", "--model", "mixtral-8x7b", "--hardware", str(f), "--gpu", "L40S",
                 "--tp", "4", "--pp", "1", "--batch", "8"]) == 0
    assert "serving mixtral-8x7b on 4 x L40S" in capsys.readouterr().out
    assert main(["plan", "serve", "--model", "mixtral-8x7b", "--gpu", str(f), "--tp", "4", "--pp", "1"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["plan", "serve", "--gpu", "V100"], "unknown GPU 'V100'; known: A100-40GB, A100-80GB, H100, H200, B200"),
    (["plan", "serve", "--tp", "5"], "tensor-parallel degree 5 does not divide the 168 attention heads"),
    (["plan", "serve", "--gpu", "A100-40GB", "--batch", "64"], "(over by 29.2 GB); the largest batch"),
    (["plan", "train", "--tp", "5"], "tensor-parallel degree 5 does not divide"),
    (["plan", "train", "--mfu", "0.3", "--days", "90"], "not allowed with argument"),
    (["plan", "serve", "--batch", "lots"], "not a number: 'lots'"),
    (["plan", "wall", "--n_layer=3"], "model overrides (--n_layer) apply only to"),
    (["plan", "serve", "--hardware", "/nonexistent.json", "--gpu", "x"], "hardware file /nonexistent.json"),
    (["plan", "serve", "--n_layer=0"], "n_layer must be a positive integer"),
    # `moekit plan --simulate` (moekit/sim/claims.py); nothing here gets as far as simulating
    (["plan", "--simulate", "--sim-points", "0"], "--sim-points must be a whole number >= 1, got 0"),
    (["plan", "--simulate", "--sim-slo", "ttft=10"], "--sim-slo 'ttft=10': give METRIC:MS"),
    (["plan", "--simulate", "--sim-window", "soon"], "not a number: 'soon'"),
    (["plan", "--sim-points", "4"], "--sim-points applies only with --simulate"),
    (["plan", "--simulate", "serve"], "--simulate belongs to the report"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_charts_are_real_pngs(tmp_path, capsys):
    paths = write_charts(tmp_path / "charts")
    assert sorted(p.name for p in paths) == ["brick_wall.png", "cost_vs_batch.png", "expert_coverage.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a drawn chart, not an empty canvas
    assert not list((tmp_path / "charts").glob("*.tmp"))
    (tmp_path / "file").write_text("x")
    assert main(["plan", "chart", "--out", str(tmp_path / "file")]) == 2  # a file is not a directory
