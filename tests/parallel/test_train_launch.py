"""`moekit train --nproc N` end to end: the same losses as one process on other layouts, checkpoints that
resume on any layout, a killed rank that stops the job, and bad layout flags refused before any process starts.

Each distributed run is one launch of torchrun's elastic agent (~10-20 s on 2 cores), so the file launches
as few as it can and shares them through module-scoped fixtures.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit.cli import main

TINY = ["--n_layer=2", "--d_model=32", "--n_head=2", "--head_dim=16", "--d_ff=64", "--n_expert=4", "--top_k=2",
        "--vocab_size=300", "--max_seq_len=32"]
FAST = ["--batch-tokens", "256", "--batch-tokens-start", "0", "--eval-every", "0", "--save-every", "2",
        "--log-every", "1", "--eval-tokens", "500", "--no-progress", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("launch"))


def make_work(root: Path) -> tuple[Path, Path, dict]:
    """A run root with a small corpus of code and text, and the environment every launch runs in."""
    data = root / "data"
    data.mkdir()
    for i in range(3):
        (data / f"a{i}.py").write_text("".join(f"def g{j}(x):\n    return x + {j}\n\n" for j in range(60)))
        (data / f"b{i}.md").write_text("".join(f"The expert {j} reads token {i + j}.\n" for j in range(80)))
    env = dict(os.environ, MOEKIT_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    return root, data, env


def train_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", *TINY, *FAST, "--steps", str(steps), "--data", f"mine={data}:3", "--out", str(out), *extra]


def moekit(env: dict, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.fixture(scope="module")
def one_process(work):
    """The reference: one process, 6 steps (checkpoints at 2, 4, 6)."""
    root, data, env = work
    out = root / "one"
    r = moekit(env, *train_args(data, out, 6))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def dp2_zero1(work):
    """ZeRO-1 on 2 processes, 4 steps (checkpoints at 2 and 4)."""
    root, data, env = work
    out = root / "dp2"
    r = moekit(env, *train_args(data, out, 4, "--nproc", "2", "--zero", "1"))
    assert r.returncode == 0, r.stderr
    return out, r


def test_dp2_zero1_and_tp2_log_the_losses_and_routing_of_one_process(work, one_process, dp2_zero1):
    root, data, env = work
    ref = losses(one_process)
    dp, r = dp2_zero1
    assert re.search(r"\| dp2 ZeRO-1 \| comm \d+%", r.stdout + r.stderr)  # the log line: layout, communication
    assert all(rec["comm_s"] is None for rec in ref.values())  # one process: no collectives
    tp = root / "tp2"
    r = moekit(env, *train_args(data, tp, 4, "--nproc", "2", "--tp", "2"))
    assert r.returncode == 0, r.stderr
    fsdp_tp = root / "fsdp_x_tp"  # the 2 x 2 mesh, from the seed
    r = moekit(env, *train_args(data, fsdp_tp, 4, "--nproc", "4", "--tp", "2", "--zero", "3"))
    assert r.returncode == 0, r.stderr[-3000:]
    for run in (dp, tp, fsdp_tp):
        got = losses(run)
        assert sorted(got) == [1, 2, 3, 4]
        for step, rec in got.items():
            assert close(rec["loss"], ref[step]["loss"]), (run.name, step, rec["loss"], ref[step]["loss"])
            assert close(rec["grad_norm"], ref[step]["grad_norm"]), (run.name, step, rec["grad_norm"])
            assert rec["routing"]["tokens_per_expert"] == ref[step]["routing"]["tokens_per_expert"]
            # --log-every 1: every step ran inside the collective counter (same losses as above), and logged the
            # time it spent in collectives.
            assert rec["comm_s"] > 0 and 0 < rec["comm_share"] < 1, (run.name, step, rec["comm_s"])
        start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert start["event"] == "start" and start["layout"]["world_size"] == (4 if run == fsdp_tp else 2)
    # The exported weights after 4 steps: data parallelism matches one process per tensor within 1e-5 (relative
    # norm). Tensor parallelism is held to loss parity only: in fp32, AdamW's updates of near-zero-gradient
    # elements amplify summation-order noise beyond 1e-5 for any reordering (tests/parallel/test_tensor_parallel.py
    # measures it and checks the weights in fp64 instead).
    from safetensors.torch import load_file

    ref4 = root / "one4"
    assert moekit(env, *train_args(data, ref4, 4)).returncode == 0
    want, got = load_file(ref4 / "model.safetensors"), load_file(dp / "model.safetensors")
    assert set(want) == set(got)
    for name, w in want.items():
        assert float((got[name] - w).norm() / w.norm().clamp_min(1e-12)) < 1e-5, name
    # Only the main rank writes: one start record, one line per step.
    assert len([line for line in (tp / "metrics.jsonl").read_text().splitlines() if '"event": "start"' in line]) == 1


def test_a_zero1_checkpoint_resumes_on_tensor_parallel_and_on_one_process(work, one_process, dp2_zero1):
    """Saved by dp2 x ZeRO-1 at step 4 (a DCP set); continued to step 6 by tp2, by one process (no process
    group), and by dp2 x tp2 on 4 processes with FSDP2, DDP and ZeRO-1 (whole saved AdamW state read into each
    tensor rank's local shards): each follows the one-process run's steps 5, 6."""
    import shutil

    root, data, env = work
    ref = losses(one_process)
    dp, _ = dp2_zero1
    for name, layout in (("as_tp2", ["--nproc", "2", "--tp", "2"]), ("as_one", []),
                         ("as_fsdp_x_tp", ["--nproc", "4", "--tp", "2", "--zero", "3"]),
                         ("as_ddp_x_tp", ["--nproc", "4", "--tp", "2", "--zero", "0"]),
                         ("as_zero1_x_tp", ["--nproc", "4", "--tp", "2", "--zero", "1"])):
        run = root / name
        shutil.copytree(dp, run)
        r = moekit(env, "train", "--resume", str(run), "--steps", "6", "--no-progress", *layout)
        assert r.returncode == 0, r.stderr
        got = losses(run)
        for step in (5, 6):
            assert close(got[step]["loss"], ref[step]["loss"]), (name, step)


@pytest.fixture(scope="module")
def zero1_x_tp(work):
    """GPT-4's layout in small: ZeRO-1 x TP on a 2 x 2 mesh (moekit/parallel/data.py ShardedZero1), 4 steps
    (checkpoints at 2 and 4)."""
    root, data, env = work
    out = root / "zero1_x_tp"
    r = moekit(env, *train_args(data, out, 4, "--nproc", "4", "--tp", "2", "--zero", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_zero1_x_tp2_logs_the_losses_and_routing_of_one_process(one_process, zero1_x_tp):
    ref = losses(one_process)
    out, r = zero1_x_tp
    assert re.search(r"\| dp2 x tp2 ZeRO-1 \| comm \d+%", r.stdout + r.stderr)
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step, rec in got.items():
        assert close(rec["loss"], ref[step]["loss"]), (step, rec["loss"], ref[step]["loss"])
        assert close(rec["grad_norm"], ref[step]["grad_norm"]), (step, rec["grad_norm"], ref[step]["grad_norm"])
        assert rec["routing"]["tokens_per_expert"] == ref[step]["routing"]["tokens_per_expert"], step


def test_a_zero1_x_tp2_checkpoint_resumes_bitwise_and_reshards(work, one_process, zero1_x_tp):
    """Its DCP set holds the whole one-process tensors (every tensor-parallel shard of the AdamW state, written by
    its owner data rank, as a DTensor chunk): the weights read on one process equal the run's exported ones bitwise;
    resumed in the same layout it repeats steps 3, 4 bitwise; resumed by one process, by tp2 (DDP) and by FSDP2 it
    follows the one-process run's steps 5, 6; and a one-process (safetensors) checkpoint resumes in this layout."""
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    root, data, env = work
    ref = losses(one_process)
    out, _ = zero1_x_tp
    ckpt = out / "checkpoints" / "step_00000004"
    exported = load_file(out / "model.safetensors")  # the weights after step 4, gathered whole
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    weights = {k: torch.empty(tuple(meta[f"model.{k}"].size)) for k in exported}
    dcp.load({f"model.{k}": t for k, t in weights.items()}, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    assert all(torch.equal(weights[k], w) for k, w in exported.items()), "weights differ"
    # Every parameter's AdamW moments, whole: the chunks its owners wrote cover each tensor.
    moments = {k: v for k, v in meta.items() if k.startswith("optim.") and k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert {k.removeprefix("optim.").rsplit(".", 1)[0] for k in moments} == set(exported)
    for k, v in moments.items():
        assert sum(math.prod(c.sizes) for c in v.chunks) == math.prod(v.size), k

    run = root / "zero1_x_tp_bitwise"
    shutil.copytree(out, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if killed after the step-2 checkpoint
    r = moekit(env, "train", "--resume", str(run), "--steps", "4", "--no-progress", "--nproc", "4", "--tp", "2",
               "--zero", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    for s in (3, 4):
        assert (losses(run)[s]["loss"], losses(run)[s]["grad_norm"]) == (losses(out)[s]["loss"],
                                                                          losses(out)[s]["grad_norm"]), s
    for name, src, layout in (("z1tp_as_one", out, []), ("z1tp_as_tp2", out, ["--nproc", "2", "--tp", "2"]),
                              ("z1tp_as_fsdp2", out, ["--nproc", "2", "--zero", "3"]),
                              ("one_as_z1tp", one_process, ["--nproc", "4", "--tp", "2", "--zero", "1"])):
        run = root / name
        shutil.copytree(src, run)
        for later in run.glob("checkpoints/step_0000000[56]"):
            shutil.rmtree(later)
        r = moekit(env, "train", "--resume", str(run), "--steps", "6", "--no-progress", *layout)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        got = losses(run)  # the resumed steps' records come last
        for step in (5, 6):
            assert close(got[step]["loss"], ref[step]["loss"]), (name, step, got[step]["loss"], ref[step]["loss"])
            assert close(got[step]["grad_norm"], ref[step]["grad_norm"]), (name, step)


def test_a_distributed_checkpoint_is_a_dcp_set_every_rank_wrote(dp2_zero1):
    dp, _ = dp2_zero1
    ckpt = dp / "checkpoints" / "step_00000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["format"] == "dcp" and {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(state["files"])
    # ZeRO-1: each rank wrote its own partition of the AdamW state, so both shard files carry real data.
    sizes = [(ckpt / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert min(sizes) > 0.2 * max(sizes), sizes
    assert not list((dp / "checkpoints").glob(".tmp-*"))


def test_resuming_in_the_same_layout_repeats_the_run_bitwise(work, dp2_zero1):
    import shutil

    root, data, env = work
    dp, _ = dp2_zero1
    run = root / "bitwise"
    shutil.copytree(dp, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if killed after the step-2 checkpoint
    r = moekit(env, "train", "--resume", str(run), "--steps", "4", "--no-progress", "--nproc", "2", "--zero", "1")
    assert r.returncode == 0, r.stderr
    assert [losses(run)[s]["loss"] for s in (3, 4)] == [losses(dp)[s]["loss"] for s in (3, 4)]


def test_a_corrupted_shard_is_named_and_the_previous_checkpoint_used(work, dp2_zero1, capsys, monkeypatch):
    import shutil

    root, data, env = work
    monkeypatch.setenv("MOEKIT_CACHE", env["MOEKIT_CACHE"])
    dp, _ = dp2_zero1
    run = root / "corrupt"
    shutil.copytree(dp, run)
    shard = run / "checkpoints" / "step_00000004" / "__1_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code = main(["train", "--resume", str(run), "--steps", "5", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "__1_0.distcp is corrupted" in out + err and "using step_00000002" in out + err


def start_training(env: dict, data: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, list[int]]:
    """A long 2-process run, returned once it has logged two steps, with its two workers' pids."""
    proc = subprocess.Popen([sys.executable, "-m", "moekit", *train_args(data, out, 100_000, "--nproc", "2", *extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 2:  # training is under way
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the job did not start training: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    workers = children_running_moekit(proc.pid)
    assert len(workers) == 2, workers
    return proc, workers


def test_a_rank_killed_mid_run_stops_the_job_and_names_it(work):
    root, data, env = work
    proc, workers = start_training(env, data, root / "killed")
    try:
        os.kill(workers[-1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 30
        assert proc.returncode != 0
        assert "rank" in err and "killed by signal 9" in err and "moekit train --resume" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_rank_that_hangs_fails_the_job_at_the_collective_timeout(work):
    """A rank stopped (SIGSTOP: alive, silent) leaves its peer waiting in a collective: --collective-timeout ends
    the wait, that rank fails, and the agent stops the job, instead of both waiting forever."""
    root, data, env = work
    proc, workers = start_training(env, data, root / "hung", "--collective-timeout", "5")
    try:
        os.kill(workers[-1], signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=90)
        assert time.monotonic() - t0 < 90 and proc.returncode != 0
        assert "rank 0 of 2" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def children_running_moekit(pid: int) -> list[int]:
    """The pids of `pid`'s descendants whose command line runs moekit (the workers), oldest first."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p:
                frontier.append(child)
                try:
                    cmd = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"moekit" in cmd and b"train" in cmd:
                    found.append(child)
    return sorted(found)


@pytest.mark.parametrize("flags, message", [
    (["--nproc", "2", "--tp", "3"], "--tp 3 must divide the 2 query heads: choose one of 1, 2"),
    (["--nproc", "4", "--dp", "3"], "--dp 3 x --tp 1 = 3 processes, but there are 4"),
    (["--nproc", "2", "--zero", "5"], "--zero 5: choose one of 0 (DDP), 1"),
    (["--nproc", "0"], "--nproc 0: the number of processes must be >= 1"),
    (["--nproc", "2", "--ep", "3"], "--ep 3 must divide the 4 experts: choose one of 1, 2, 4"),
    (["--nproc", "2", "--ep", "2", "--zero", "1"], "--ep with --zero 1 is not supported"),
])
def test_bad_layout_flags_get_one_line_and_exit_2_before_anything_starts(work, tmp_path, capsys, monkeypatch, flags,
                                                                         message):
    root, data, env = work
    monkeypatch.setenv("MOEKIT_CACHE", env["MOEKIT_CACHE"])
    assert_refused(train_args(data, tmp_path / "never", 2, *flags), message, capsys)


def assert_refused(argv: list[str], message: str, capsys) -> None:
    """`moekit <argv>` exits 2 with one line containing `message`, before anything starts: no run folder."""
    out = Path(argv[argv.index("--out") + 1])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_resuming_with_another_model_shape_is_refused(work, dp2_zero1, capsys, monkeypatch):
    root, data, env = work
    monkeypatch.setenv("MOEKIT_CACHE", env["MOEKIT_CACHE"])
    dp, _ = dp2_zero1
    before = sorted(p.name for p in (dp / "checkpoints").iterdir())
    code = main(["train", "--resume", str(dp), "--steps", "8", "--n_layer=3", "--nproc", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume continues a run with its saved settings" in err and "--n_layer" in err
    assert sorted(p.name for p in (dp / "checkpoints").iterdir()) == before
