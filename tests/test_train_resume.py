"""Exact resume: a training subprocess killed with SIGKILL mid-run, then `--resume`d, repeats the
uninterrupted run's losses bit for bit (data position, RNG, optimizer, LR schedule and batch ramp)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from moekit.train.metrics import MetricsLog, read_metrics

# A ~50k-parameter MoE on 64-token sequences with a batch ramp and 2 micro-batches per step.
TINY = ["--n_layer=2", "--d_model=32", "--n_head=2", "--head_dim=16", "--d_ff=64", "--n_expert=4", "--top_k=2",
        "--vocab_size=300", "--max_seq_len=64"]
STEPS = 60
FLAGS = ["--steps", str(STEPS), "--batch-tokens", "512", "--batch-tokens-start", "128", "--batch-ramp-tokens",
         "4000", "--grad-accum", "2", "--warmup-steps", "5", "--log-every", "1", "--eval-every", "20",
         "--save-every", "5", "--keep-checkpoints", "2", "--eval-tokens", "1000", "--no-progress"]


def write_corpus(root):
    root.mkdir()
    for i in range(4):
        (root / f"notes{i}.txt").write_text("".join(
            f"Expert {j % 16} takes token {i * j % 97} when the router score is high.\n" for j in range(150)))
        (root / f"mod{i}.py").write_text("".join(
            f"def step_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(120)))


def train_cmd(tmp_path, out, *extra):
    return [sys.executable, "-m", "moekit.cli", "train", *TINY, *FLAGS, "--data", f"mine={tmp_path / 'data'}:2",
            "--out", str(out), *extra]


def env(tmp_path):
    return {**os.environ, "MOEKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def losses(run):
    """{step: (loss, ce_loss, lr, batch_tokens)} from metrics.jsonl; a step logged again after a resume
    keeps its last record."""
    out = {}
    for r in read_metrics(run / "metrics.jsonl"):  # read while the run writes: a torn last line is skipped
        if "loss" in r:
            out[r["step"]] = (r["loss"], r["ce_loss"], r["lr"], r["batch_tokens"])
    return out


def evals(run):
    return {r["step"]: r["eval"] for r in read_metrics(run / "metrics.jsonl") if "eval" in r}


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_uninterrupted_run_bit_for_bit(tmp_path):
    write_corpus(tmp_path / "data")
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(train_cmd(tmp_path, a), env=env(tmp_path), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(train_cmd(tmp_path, b), env=env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (b / "metrics.jsonl").exists():
            steps = [s for s in losses(b)]
            if steps and max(steps) >= 13:  # checkpoints at 5 and 10 exist; past the ramp's start
                proc.send_signal(signal.SIGKILL)
                killed_at = max(steps)
                break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert killed_at < STEPS and not (b / "model.safetensors").exists()

    resumed = subprocess.run([sys.executable, "-m", "moekit.cli", "train", "--resume", str(b), "--no-progress"],
                             env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout

    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert [la[s] for s in la] == [lb[s] for s in la]  # exact float equality, step by step
    assert len({la[s][3] for s in la}) > 2  # the batch ramp really changed the batch size
    assert evals(a) == evals(b)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # identical final weights
    # Only the newest 2 checkpoints are kept.
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_00000055", "step_00000060"]


def test_a_resumed_log_cuts_the_torn_line_a_kill_left_and_loses_no_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')  # killed mid-write
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    log = MetricsLog(path)
    log.write({"step": 2, "loss": 1.5})
    log.write({"step": 3, "loss": 1.0})
    log.close()
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    assert path.read_text().count("\n") == 3
