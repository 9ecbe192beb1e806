"""`moekit train --ep` end to end (CLI, gloo, OMP_NUM_THREADS=1 per rank): expert parallelism alone and composed
with DDP, FSDP2 and tensor parallelism logs one process's losses and routing from the same seed, drops the tokens one
process drops under a capacity limit, reports the rows each expert rank exchanged, and its checkpoints resume on one
process. The layer itself is checked against one process in test_expert_parallel.py.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/parallel/test_expert_launch.py -q
"""

from __future__ import annotations

import shutil

import pytest
from test_train_launch import close, losses, make_work, moekit, train_args

CAPACITY = "--capacity_factor=1.0"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("ep_launch"))


@pytest.fixture(scope="module")
def refs(work):
    """One process, 4 steps: dropless, and with a capacity limit."""
    root, data, env = work
    out = {}
    for name, extra in (("dropless", []), ("capacity", [CAPACITY])):
        run = root / f"one_{name}"
        r = moekit(env, *train_args(data, run, 4, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = run
    return out


def assert_same_run(run, ref) -> None:
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step, rec in got.items():
        assert close(rec["loss"], want[step]["loss"]), (run.name, step, rec["loss"], want[step]["loss"])
        # Adam is nearly blind to a gradient's scale, so losses alone would miss mis-scaled expert gradients
        assert close(rec["grad_norm"], want[step]["grad_norm"]), (run.name, step, rec["grad_norm"])
        assert rec["routing"]["tokens_per_expert"] == want[step]["routing"]["tokens_per_expert"], (run.name, step)
        assert rec["routing"]["dropped_frac"] == want[step]["routing"]["dropped_frac"], (run.name, step)


LAYOUTS = {  # name -> (flags, world, ref)
    # full recomputation runs each block's forward (and its exchange) again in the backward: counted once
    "ep2_ddp_recompute": (["--nproc", "2", "--ep", "2", "--recompute", "full"], 2, "dropless"),
    "ep2_fsdp_capacity": (["--nproc", "2", "--ep", "2", "--zero", "3", CAPACITY], 2, "capacity"),
    "ep2_x_tp2": (["--nproc", "4", "--ep", "2", "--tp", "2"], 4, "dropless"),
    "dp4_ep2_fsdp": (["--nproc", "4", "--ep", "2", "--zero", "2"], 4, "dropless"),
}


@pytest.fixture(scope="module")
def layouts(work):
    root, data, env = work
    runs = {}
    for name, (flags, _, _) in LAYOUTS.items():
        run = root / name
        r = moekit(env, *train_args(data, run, 4, *flags))
        assert r.returncode == 0, (name, r.stderr[-3000:])
        runs[name] = (run, r.stdout + r.stderr)
    return runs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_layouts_log_the_losses_and_routing_of_one_process(refs, layouts, name):
    run, _ = layouts[name]
    assert_same_run(run, refs[LAYOUTS[name][2]])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_rows_each_expert_rank_exchanged_are_logged(refs, layouts, name):
    run, output = layouts[name]
    flags, world, ref = LAYOUTS[name]
    assert "(ep2)" in output and " | ep rows " in output
    for step, rec in losses(run).items():
        rows = rec["ep_rows"]
        assert len(rows["sent"]) == len(rows["received"]) == world
        # every kept assignment is sent once and received once; under --tp each tensor rank sends its own copy
        tp = 2 if "--tp" in flags else 1
        kept = sum(map(sum, rec["routing"]["tokens_per_expert"]))
        assert sum(rows["sent"]) == sum(rows["received"]) == kept * tp, (name, step, rows, kept)
    assert all(rec["ep_rows"] is None for rec in losses(refs[ref]).values())


def test_capacity_drops_tokens_here(refs):
    assert any(max(rec["routing"]["dropped_frac"]) > 0 for rec in losses(refs["capacity"]).values())


def test_an_expert_parallel_checkpoint_resumes_on_one_process(work, refs, layouts):
    """The FSDP2 x EP checkpoint of step 2 (DCP shards of (edp, ep) DTensors) continues on one process with the
    uninterrupted run's losses."""
    root, data, env = work
    src, _ = layouts["ep2_fsdp_capacity"]
    run = root / "ep_to_one"
    shutil.copytree(src, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    r = moekit(env, "train", "--resume", str(run), "--steps", "4", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    want = losses(refs["capacity"])
    for step in (3, 4):
        assert close(losses(run)[step]["loss"], want[step]["loss"]), step
