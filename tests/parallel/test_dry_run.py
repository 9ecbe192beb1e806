"""`moekit train ... --dry-run` (moekit/parallel/dry_run.py): layouts measured on torch's fake process group in this
one process, against the planner (moekit/plan/shards.py, comm.py) at the issue's 1%, and GPT-4's article layout
(tp 8 x pp 15 x dp 208, ZeRO-1, 24,960 ranks) against the article's ~30 GB of FP16 weights per GPU.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/parallel/test_dry_run.py -q      # ~45 s on 2 cores
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from moekit.cli import main
from moekit.parallel.dry_run import dry_run
from moekit.parallel.dry_run_report import compare, format_dry_run, relative
from moekit.parallel.mesh import ParallelDims
from moekit.presets import get_preset

TOL = 0.01
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def _check(run):
    for r, states, comm in compare(run):
        for state, (got, plan) in states.items():
            assert relative(got, plan) <= TOL, (r.role, state, got, plan)
        assert comm, r.role
        for key, (got, plan) in comm.items():
            assert relative(got, plan) <= TOL, (r.role, key, got, plan)


@pytest.mark.parametrize("flags", [dict(tp=2, pp=2, dp=4, zero=1), dict(tp=2, pp=4, dp=3, zero=3),
                                   dict(tp=2, pp=2, dp=4, zero=0, ep=2)])
def test_small_layouts_equal_the_planner(flags):
    cfg = get_preset("gpt4-mini")
    dims = ParallelDims.from_flags(flags["tp"] * flags["pp"] * flags["dp"], cfg=cfg, **flags)
    run = dry_run(cfg, dims, seq_len=256, batch_tokens=4 * 256 * flags["dp"])
    stages = {r.pp_rank for r in run.ranks}
    assert stages == ({0, 1, dims.pp - 1} if dims.pp > 2 else {0, dims.pp - 1})
    _check(run)
    if dims.zero == 1:  # the partition's fullest and emptiest data ranks both measured
        assert len(run.ranks) == 2 * len(stages)
    if dims.ep > 1:  # bytes held measured; collectives the planner's (the step needs host split sizes)
        assert not any(r.measured_step for r in run.ranks) and any("--ep" in n for n in run.notes)


def test_gpt4_article_layout_at_full_scale():
    """24,960 fake ranks, 6 distinct ones: every byte held and every collective equals the planner's; the fullest
    rank holds 15.42B parameters of the 1.83T, 30.84 GB in FP16, the article's ~30 GB (SPEC section 3)."""
    cfg = get_preset("gpt4")
    dims = ParallelDims.from_flags(24_960, tp=8, pp=15, dp=208, zero=1, cfg=cfg)
    run = dry_run(cfg, dims)
    _check(run)
    assert [r.pp_rank for r in run.ranks] == [0, 0, 1, 1, 14, 14]
    top = max(run.ranks, key=lambda r: r.weight_numel)
    assert 2 * top.weight_numel == 30_836_563_968  # bf16/fp16 bytes: 15,418,281,984 parameters
    assert 29e9 <= 2 * top.weight_numel <= 32e9
    # whole-parameter ZeRO-1: the fullest data rank owns one (E, F/8, D) expert tensor's AdamW state, the emptiest none
    stack = cfg.n_expert * (cfg.d_ff // 8) * cfg.d_model
    assert max(r.optimizer for r in run.ranks) == 8 * stack + 4 and min(r.optimizer for r in run.ranks) == 0
    text = format_dry_run(run)
    assert "fullest rank's FP16 weights: 30.84 GB" in text and "~30 GB" in text
    # `moekit plan train` for the same flags reports this very rank (its fullest stage and ZeRO-1 rank)
    from moekit import plan

    p = plan.train(cfg, n_gpus=24_960, tp=8, pp=15, zero_stage=1, optimizer_precision="fp32", recompute="none")
    fullest = max((r for r in run.ranks if r.pp_rank == p.memory.stage), key=lambda r: r.optimizer)
    assert (p.ranks.weights, p.ranks.optimizer) == (fullest.weights, fullest.optimizer)


@pytest.mark.parametrize("extra, message", [
    (["--dp", "2", "--nproc", "4"], "drop --nproc"),  # the dry run is one process
    ([], "give --dp"),  # no world without it
    (["--dp", "2", "--pp", "3"], "--pp 3 does not split the 8 layers"),  # check_pp names the splits possible
])
def test_bad_input_is_one_line_and_exit_2(capsys, extra, message):
    assert main(["train", "--preset", "gpt4-mini", "--tp", "2", "--dry-run"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_cli_prints_the_table(capsys):
    args = ["train", "--preset", "gpt4-mini", "--tp", "2", "--pp", "2", "--dp", "2", "--zero", "3", "--seq-len",
            "128", "--batch-tokens", "512", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dry run: gpt4-mini on 8 ranks" in out and "planner" in out and "all-gather" in out
