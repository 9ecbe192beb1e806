"""`moekit train` and `moekit sample` end to end on a tiny corpus, context extension, and bad input:
one clear line, exit code 2, no traceback, nothing overwritten."""

import hashlib
import json

import pytest
from safetensors.torch import load_file

from moekit.cli import main
from moekit.train.checkpoint import list_checkpoints

TINY = ["--n_layer=2", "--d_model=32", "--n_head=2", "--head_dim=16", "--d_ff=64", "--n_expert=4", "--top_k=2",
        "--vocab_size=300", "--max_seq_len=32"]
FAST = ["--steps", "6", "--batch-tokens", "128", "--batch-tokens-start", "0", "--eval-every", "3", "--save-every", "3",
        "--log-every", "2", "--eval-tokens", "500", "--no-progress", "--sample-prompt", "def"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the default --out is runs/PRESET under the working folder


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"a{i}.py").write_text("".join(f"def g{j}(x):\n    return x + {j}\n\n" for j in range(60)))
        (root / f"b{i}.md").write_text("".join(f"The expert {j} reads token {i + j}.\n" for j in range(80)))
    return root


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def run(tmp_path, data, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", *TINY, *FAST, "--data", f"mine={data}:3", "--out", str(out))
    assert code == 0, err
    return out, stdout, err


def test_train_writes_a_complete_run_and_reports(run):
    out, stdout, err = run
    assert {"config.json", "train_config.json", "tokenizer.json", "metrics.jsonl", "model.safetensors",
            "checkpoints"} <= {p.name for p in out.iterdir()}
    assert "bits per byte" in stdout and "sample:\ndef" in stdout and f"moekit sample {out}" in stdout
    assert "step 2 | loss" in stdout and "moe imbalance" in stdout and "mfu" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["peak_flops"] > 0
    logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6]
    r = logs[-1]
    assert len(r["routing"]["imbalance"]) == 2 and r["routing"]["imbalance"][0] >= 1.0  # one entry per MoE layer
    assert r["tokens_per_source"] == {"mine": 6 * 128} and r["epochs_per_source"]["mine"] > 0
    assert [r["step"] for r in records if "eval" in r] == [3, 6]
    assert records[-1]["event"] == "end" and records[-1]["tokens_per_source"] == {"mine": 768}
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]


def test_sample_command_continues_a_prompt(run, capsys):
    out, _, _ = run
    code, stdout, _ = cli(capsys, "sample", str(out), "def g", "--max-new-tokens", "20", "--json", "--seed", "3")
    assert code == 0
    result = json.loads(stdout)
    assert result["step"] == 6 and result["samples"][0] and result["prompt"] == "def g"
    again = json.loads(cli(capsys, "sample", str(out), "def g", "--max-new-tokens", "20", "--json", "--seed", "3")[1])
    assert again["samples"] == result["samples"]  # seeded


def test_resume_of_a_finished_run_changes_nothing_and_steps_extend_it(run, capsys):
    out, _, _ = run
    before = snapshot(out)
    code, out_, _ = cli(capsys, "train", "--resume", str(out), "--no-progress")
    assert code == 0 and "complete at step 6" in out_ and snapshot(out) == before
    code, out_, _ = cli(capsys, "train", "--resume", str(out), "--steps", "8", "--no-progress")
    assert code == 0 and "resumed" in out_
    assert list_checkpoints(out)[-1].name == "step_00000008"


def test_init_from_with_longer_seq_len_extends_the_context(run, tmp_path, capsys):
    base, _, _ = run
    out = tmp_path / "long"
    code, stdout, err = cli(capsys, "train", "--init-from", str(base), "--seq-len", "64", "--steps", "2",
                            "--batch-tokens", "128", "--no-progress", "--eval-tokens", "500", "--data",
                            f"mine={tmp_path / 'data'}", "--out", str(out))
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_seq_len"] == 64 and cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert "RoPE interpolation x2" in stdout
    tc = json.loads((out / "train_config.json").read_text())
    assert tc["lr"] == pytest.approx(3e-4) and tc["batch_tokens_start"] == 0  # fine-tuning defaults
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert load_file(out / "model.safetensors").keys() == load_file(base / "model.safetensors").keys()


def test_an_existing_tokenizer_is_used_as_is(run, tmp_path, data, capsys):
    base, _, _ = run
    out = tmp_path / "reuse"
    code, _, err = cli(capsys, "train", *TINY, *FAST, "--data", f"mine={data}", "--tokenizer",
                       str(base / "tokenizer.json"), "--out", str(out))
    assert code == 0, err
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    code, _, err = cli(capsys, "train", *TINY, *FAST, "--data", f"mine={data}", "--tokenizer",
                       str(tmp_path / "bad.json"), "--out", str(tmp_path / "x"))
    assert code == 2 and "not a Hugging Face tokenizer.json" in err and not (tmp_path / "x").exists()


# ---- bad input --------------------------------------------------------------------------------------
def _bad_cases(tmp_path, data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"content": "no text"}\n')
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "notes.txt").write_text("keep me")
    d = ["--data", f"mine={data}"]
    return [
        (["--data", f"x={tmp_path / 'missing'}:2"], "does not exist"),
        (["--data", f"x={tmp_path / 'empty'}"], "empty"),
        (["--data", f"x={tmp_path / 'rows.jsonl'}"], "rows.jsonl:2: no string 'text' field"),
        ([*d, "--out", str(tmp_path / "a_file" / "run")], "is a file, not a folder"),
        ([*d, "--out", str(tmp_path / "not_a_run")], "is not empty"),
        (["--resume", str(tmp_path / "not_a_run")], "is not a moekit run"),
        (["--resume", str(tmp_path / "nowhere")], "is not a moekit run"),
        ([*d, "--batch_tokens=64"], "write it with dashes, --batch-tokens"),
        ([*d, "--lr", "2"], "lr must be in (0, 1)"),
        ([*d, "--preset", "nope"], "unknown preset"),
        (["--data", "no-equals-sign"], "expected NAME=PATH"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_is_written(tmp_path, data, capsys):
    for argv, message in _bad_cases(tmp_path, data):
        before = snapshot(tmp_path)
        code, out, err = cli(capsys, "train", *TINY, *FAST[:2], *argv)
        assert code == 2, (argv, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        changed = {k for k in set(before) | set(snapshot(tmp_path)) if before.get(k) != snapshot(tmp_path).get(k)}
        assert not {k for k in changed if not k.startswith("cache")}, (argv, changed)  # only the token cache
    assert not (tmp_path / "runs").exists()


def test_an_existing_run_is_not_overwritten_and_a_corrupt_one_not_resumed(run, tmp_path, data, capsys):
    out, _, _ = run
    before = snapshot(out)
    code, _, err = cli(capsys, "train", *TINY, *FAST, "--data", f"mine={data}", "--out", str(out))
    assert code == 2 and "holds a run" in err and "--resume" in err and snapshot(out) == before
    code, _, err = cli(capsys, "train", "--resume", str(out), "--lr", "0.1")
    assert code == 2 and "only --max-minutes and --steps" in err and snapshot(out) == before
    for ckpt in list_checkpoints(out):  # every checkpoint damaged: resume refuses, names the file
        (ckpt / "model.safetensors").write_bytes(b"\0" * 10)
    before = snapshot(out)
    code, _, err = cli(capsys, "train", "--resume", str(out), "--no-progress", "--steps", "9")
    assert code == 2 and "no usable checkpoint" in err and "model.safetensors" in err
    assert snapshot(out) == before
    code, _, err = cli(capsys, "sample", str(tmp_path / "nowhere"))
    assert code == 2 and "not a moekit run" in err
