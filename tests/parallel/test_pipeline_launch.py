"""`moekit train --nproc 2 --pp 2` end to end: one process's run bit for bit, an exact resume after a rank is killed,
a pipeline checkpoint resumed on one process, bad pipeline flags refused in one line.

Untied embeddings (--tie_embeddings=false) for the bitwise checks: a tied embedding split over the first and last
stage is summed in another order (tests/parallel/test_pipeline.py says why, and checks it within 1e-6). The learning
rate stays in its warmup (--warmup-steps 1000), where it does not depend on the run's length, so a run killed
mid-way and resumed with --steps N continues exactly the run of N steps.

AdamW's eps is 1e-6, not the default 1e-8, for the compositions that sum gradients in another order: Adam's first
update is g / (|g| + eps), the sign of g wherever |g| >> eps, so an entry whose gradient lies within a few eps of
zero moves by a share of the learning rate that rounding decides. With 1e-8 one such entry (blocks.0.attn.wo[1, 6],
its step-1 gradient below 1e-6 where the median is 4.7e-3) moved 3.4e-6 apart after one step on an AVX2 CPU, all
others 1e-9; with 1e-6 its step is a smooth function of its gradient again.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_launch import assert_refused, make_work, moekit

from moekit.cli import main

MODEL = ["--n_layer=4", "--d_model=32", "--n_head=2", "--head_dim=16", "--d_ff=64", "--n_expert=4", "--top_k=2",
         "--vocab_size=300", "--max_seq_len=32", "--tie_embeddings=false"]
FAST = ["--batch-tokens", "256", "--batch-tokens-start", "0", "--eval-every", "4", "--save-every", "2",
        "--log-every", "1", "--eval-tokens", "500", "--no-progress", "--dtype", "fp32", "--warmup-steps", "1000",
        "--lr", "0.3", "--eps", "1e-6"]
STEPS = 8
PP2 = ["--nproc", "2", "--pp", "2", "--microbatches", "4"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("pp_launch"))


def train_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", *MODEL, *FAST, "--steps", str(steps), "--data", f"mine={data}:3", "--out", str(out), *extra]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run) if "loss" in r}


@pytest.fixture(scope="module")
def one_process(work):
    root, data, env = work
    out = root / "one"
    r = moekit(env, *train_args(data, out, STEPS, "--grad-accum", "4"))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def pp2(work):
    root, data, env = work
    out = root / "pp2"
    r = moekit(env, *train_args(data, out, STEPS, *PP2))
    assert r.returncode == 0, r.stderr
    return out, r


def test_pp2_trains_one_process_run_bitwise(one_process, pp2):
    out, r = pp2
    ref, got = losses(one_process), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step]["ce_loss"] == ref[step]["ce_loss"], step  # the last stage's, computed alike
        assert abs(got[step]["loss"] - ref[step]["loss"]) <= 1e-6 * ref[step]["loss"], step  # summed over stages
        assert got[step]["grad_norm"] == ref[step]["grad_norm"], step
        assert got[step]["routing"]["tokens_per_expert"] == ref[step]["routing"]["tokens_per_expert"], step
    a, b = load_file(one_process / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    evals = [[x["eval"]["all"]["loss"] for x in records(run) if "eval" in x] for run in (one_process, out)]
    assert evals[0] == pytest.approx(evals[1], rel=1e-6) and len(evals[0]) == 2  # step 4 and the end
    assert "| pp2 |" in r.stdout + r.stderr


def test_each_stage_reports_its_idle_share(pp2):
    out, r = pp2
    for rec in losses(out).values():
        idle = rec["pp_idle"]
        assert len(idle) == 2 and all(0 < f < 1 for f in idle), idle
    shown = [int(m) for m in re.findall(r"\| bubble (\d+)%", r.stdout + r.stderr)]  # the worst stage, per log line
    assert len(shown) == STEPS and shown == [round(100 * max(rec["pp_idle"])) for rec in losses(out).values()]


def test_a_pipeline_checkpoint_resumes_on_one_process(work, one_process, pp2):
    """DCP resharding: the pp2 run's step-4 checkpoint (each stage wrote its own blocks) continued by one process
    with no process group follows the one-process run's steps 5..8 bit for bit."""
    root, data, env = work
    out, _ = pp2
    run = root / "as_one"
    shutil.copytree(out, run)
    for later in ("step_00000006", "step_00000008"):
        shutil.rmtree(run / "checkpoints" / later)
    state = json.loads((run / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["format"] == "dcp" and {"__0_0.distcp", "__1_0.distcp"} <= set(state["files"])
    r = moekit(env, "train", "--resume", str(run), "--steps", str(STEPS), "--no-progress")
    assert r.returncode == 0, r.stderr
    ref, got = losses(one_process), losses(run)
    for step in range(5, STEPS + 1):
        assert got[step]["ce_loss"] == ref[step]["ce_loss"], step


def children_running_moekit(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmd = (Path("/proc") / child / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"moekit" in cmd and b"train" in cmd:
                found.append(int(child))
            else:
                found.extend(children_running_moekit(int(child)))
    return sorted(found)


def test_a_pipeline_run_killed_by_sigkill_resumes_exactly(work, pp2):
    root, data, env = work
    ref_run, _ = pp2
    out = root / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "moekit", *train_args(data, out, 100_000, *PP2)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 3:  # past the step-2 checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        workers = children_running_moekit(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    last = int(saved[-1].split("_")[1])
    assert 2 <= last < STEPS, saved
    r = moekit(env, "train", "--resume", str(out), "--steps", str(STEPS), "--no-progress", *PP2[:4])
    assert r.returncode == 0, r.stderr
    ref, got = losses(ref_run), {r["step"]: r for r in records(out)[::-1] if "loss" in r}  # the resumed ones
    for step in range(last + 1, STEPS + 1):
        assert got[step]["loss"] == ref[step]["loss"] and got[step]["grad_norm"] == ref[step]["grad_norm"], step


@pytest.mark.parametrize("flags, message", [
    (["--nproc", "3", "--pp", "3"], "--pp 3 does not split the 4 layers into equal stages: choose --pp from 1, 2, 4"),
    (["--nproc", "2", "--pp", "2", "--microbatches", "1"], "--microbatches 1 with --pp 2: a pipeline needs at least 2"),
    (["--nproc", "2", "--pp", "2", "--microbatches", "4", "--schedule", "pipedream"],
     "--schedule 'pipedream': choose one of gpipe, 1f1b, interleaved-1f1b, zero-bubble"),
    (["--nproc", "2", "--pp", "2", "--microbatches", "4", "--schedule", "interleaved-1f1b"],
     "--schedule interleaved-1f1b runs 2 or more stages per rank: pass --stages-per-rank 2"),
    (["--nproc", "2", "--pp", "2", "--microbatches", "3", "--schedule", "interleaved-1f1b", "--stages-per-rank", "2"],
     "needs --microbatches a multiple of --pp 2 (got 3)"),
])
def test_bad_pipeline_flags_get_one_line_and_exit_2(work, tmp_path, capsys, monkeypatch, flags, message):
    root, data, env = work
    monkeypatch.setenv("MOEKIT_CACHE", env["MOEKIT_CACHE"])
    assert_refused(train_args(data, tmp_path / "never", 2, *flags), message, capsys)


def test_a_too_old_torch_is_refused_in_one_line(work, tmp_path, capsys, monkeypatch):
    import moekit.parallel.stages as stages

    root, data, env = work
    monkeypatch.setenv("MOEKIT_CACHE", env["MOEKIT_CACHE"])
    monkeypatch.setattr(stages, "torch_version", lambda: (2, 9))
    code = main(train_args(data, tmp_path / "never", 2, *PP2))
    err = capsys.readouterr().err
    assert code == 2 and "--pp needs torch >= 2.10" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name, flags, layout", [
    ("pp2_dp2", [], "| pp2 x dp2 DDP |"),
    ("pp2_tp2", ["--tp", "2"], "| pp2 x tp2 |"),  # sequence parallel + loss parallel on each stage
    ("pp2_ep2", ["--ep", "2"], "| pp2 x dp2 (ep2) DDP |"),  # experts averaged once per step (apply_replicate)
    ("pp2_dp2_zero1", ["--zero", "1"], "| pp2 x dp2 ZeRO-1 |"),  # each stage's AdamW state over its data ranks
])
def test_pipeline_compositions_on_4_processes_follow_one_process(work, one_process, name, flags, layout):
    """Pipeline x data, tensor or expert parallel (4 processes): within 1e-5 of one process (their reductions sum
    in another order)."""
    root, data, env = work
    out = root / name
    r = moekit(env, *train_args(data, out, STEPS, "--nproc", "4", "--pp", "2", "--microbatches", "4", *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    assert layout in r.stdout + r.stderr
    ref, got = losses(one_process), losses(out)
    for step in got:
        for key in ("loss", "ce_loss", "grad_norm"):
            assert abs(got[step][key] - ref[step][key]) <= 1e-5 * abs(ref[step][key]), (step, key)
    a, b = load_file(one_process / "model.safetensors"), load_file(out / "model.safetensors")
    worst = max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)
    assert worst <= 1e-5, worst
