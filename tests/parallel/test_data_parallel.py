"""Data parallelism (moekit/parallel/data.py) against one process: DDP, ZeRO-1, FSDP2 zero=2 and zero=3 at 2 ranks.

    .venv/bin/python -m pytest tests/parallel/test_data_parallel.py      # one torchrun launch, gloo, ~15 s

One launch (`torchrun --standalone --nproc-per-node 2 dp_worker.py`, OMP_NUM_THREADS=1 per rank) trains every mode
for 5 fp32 AdamW steps from the same seed weights and global batches as the one-process reference computed here
(dp_steps.py): lr 1e-2, moekit's weight-decay groups, global-norm clipping. Every step's loss and grad norm and the
final weights agree within 1e-5 (relative: the order of the gradient reduction differs), the routing counts summed
over the ranks are equal, ZeRO-1 and FSDP2 hold half the optimizer state per rank.

The router's load-balancing loss is a statistic of the tokens it sees (Switch, eq. 4: E * sum_e f_e * P_e, a product
of two means), so each rank's is that of its own slice, and the mean over ranks is not the whole batch's. moekit
keeps it per rank, as GShard computes it per group of tokens and Megatron per micro-batch (its `global_aux_loss`
all-reduce over DP is an option, not the default): it costs no collective and makes data parallelism over D ranks
exactly gradient accumulation over D micro-batches, which the trainer already does in one process. So the parity
runs switch the router losses off (aux_loss_coef = z_loss_coef = 0), and two runs with them on are compared with a
one-process run accumulating over the ranks' slices (equal within 1e-5) and bounded against the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dp_steps
import pytest
import torch
import torch.distributed as dist

from moekit.parallel.data import (
    apply_data_parallel,
    clip_grad_norm,
    gradient_sync,
    has_fsdp2,
    optimizer_state_bytes,
    shard_optimizer,
)
from moekit.parallel.mesh import ParallelDims
from moekit.train.optim import build_optimizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TOL = 1e-5
FSDP_MODES = ("fsdp2", "fsdp3", "fsdp3_accum", "fsdp3_aux")
PARITY_MODES = ("ddp", "zero1", "fsdp2", "fsdp3", "ddp_accum", "fsdp3_accum")  # router losses off (module docstring)
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def fsdp_param(mode: str, *more):
    """A parametrize value for `mode`, skipped below torch 2.6 when it is an FSDP2 mode."""
    skip = pytest.mark.skipif(mode in FSDP_MODES and not has_fsdp2(),
                              reason=f"FSDP2 needs torch >= 2.6, this is {torch.__version__}")
    return pytest.param(mode, *more, marks=skip)


# ---- the runs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """Every mode's results from one 2-rank launch."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path_factory.mktemp("dp") / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "dp_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the 2-rank launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=True)


def one_process(aux: bool, micro: int = 1) -> tuple[list[dict], dict[str, torch.Tensor]]:
    model = dp_steps.seed_model(dp_steps.model_config(aux))
    records = dp_steps.train(model, build_optimizer(model, dp_steps.TC), micro=micro)
    return records, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, the whole global batch; with the router losses on, also accumulated over the 2 ranks' slices."""
    return {"whole": one_process(aux=False), "whole_aux": one_process(aux=True),
            "accumulated_aux": one_process(aux=True, micro=2)}


def rel(a: float | torch.Tensor, b: float | torch.Tensor) -> float:
    if isinstance(a, torch.Tensor):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    return abs(a - b) / max(abs(b), 1e-30)


def assert_same_run(got: dict, want: tuple[list[dict], dict], tol: float = TOL) -> None:
    records, weights = want
    for step, (g, w) in enumerate(zip(got["records"], records, strict=True)):
        for key in ("loss", "ce_loss", "grad_norm"):
            assert rel(g[key], w[key]) <= tol, f"step {step} {key}: {g[key]} vs one process {w[key]}"
    assert got["weights"].keys() == weights.keys()
    worst = max(weights, key=lambda k: rel(got["weights"][k], weights[k]))
    err = rel(got["weights"][worst], weights[worst])
    assert err <= tol, f"final {worst} differs from one process's by {err:.2e} (relative)"


# ---- parity ------------------------------------------------------------------------------------------------------
@needs_gloo
@pytest.mark.parametrize("mode", [fsdp_param(m) for m in PARITY_MODES])
def test_losses_and_weights_equal_one_process(ranks, reference, mode):
    """`_accum` modes: 2 micro-batches per rank with gradient_sync off for the first (no_sync / FSDP2's flag)."""
    got = ranks[mode]
    assert got["type"] == ("FSDPTransformer" if mode in FSDP_MODES else "DistributedDataParallel")
    assert_same_run(got, reference["whole"])
    # The weights moved far beyond the tolerance (the comparison is not of two barely-trained models), and the
    # clipping acted at every step (the norm above dp_steps.TC.grad_clip).
    seed = dp_steps.seed_model(dp_steps.model_config(False)).state_dict()
    assert min(rel(got["weights"][k], seed[k]) for k in seed) > 100 * TOL
    assert all(r["grad_norm"] > dp_steps.TC.grad_clip for r in got["records"])


@needs_gloo
@pytest.mark.parametrize("mode", [fsdp_param(m) for m in PARITY_MODES])
def test_routing_counts_summed_over_ranks_equal_one_process(ranks, reference, mode):
    got = [r["tokens_per_expert"] for r in ranks[mode]["records"]]
    want = [r["tokens_per_expert"] for r in reference["whole"][0]]
    assert got == want  # per step, per MoE layer, per expert
    assert sum(got[0][0]) == dp_steps.GLOBAL_BATCH * dp_steps.SEQ * dp_steps.CFG.top_k  # dropless: every assignment


@needs_gloo
@pytest.mark.parametrize("mode", [fsdp_param(m) for m in ("ddp_aux", "fsdp3_aux")])
def test_router_losses_are_per_rank_statistics(ranks, reference, mode):
    """With the router losses on, 2 ranks = one process accumulating over the same 2 slices (see the docstring);
    against the whole batch only the load-balancing term differs, by little."""
    got = ranks[mode]
    assert_same_run(got, reference["accumulated_aux"])
    assert [r["tokens_per_expert"] for r in got["records"]] == [
        r["tokens_per_expert"] for r in reference["accumulated_aux"][0]]
    whole = reference["whole_aux"][0]
    g0, w0 = got["records"][0], whole[0]  # step 0: the same weights
    assert rel(g0["ce_loss"], w0["ce_loss"]) <= TOL and rel(g0["z_loss"], w0["z_loss"]) <= TOL  # means over tokens
    assert g0["aux_loss"] != pytest.approx(w0["aux_loss"], rel=1e-6)  # a product of means: not one
    coef = dp_steps.CFG.aux_loss_coef
    assert g0["loss"] - w0["loss"] == pytest.approx(coef * (g0["aux_loss"] - w0["aux_loss"]), abs=1e-6)
    # Over the run: a mean of per-slice balance losses is within a percent of the batch's here (uniform routing
    # gives 1 for either), so the total loss is within coef x 1% of the whole batch's.
    for g, w in zip(got["records"], whole, strict=True):
        assert abs(g["aux_loss"] - w["aux_loss"]) < 0.01 * w["aux_loss"]
        assert rel(g["loss"], w["loss"]) < 1e-3


# ---- memory ------------------------------------------------------------------------------------------------------
@needs_gloo
@pytest.mark.parametrize("mode, share", [fsdp_param(m, s) for m, s in (("ddp", 1.0), ("zero1", 0.5), ("fsdp2", 0.5),
                                                                       ("fsdp3", 0.5))])
def test_optimizer_state_per_rank(ranks, mode, share):
    """ZeRO-1 gives each rank whole parameters to update (sorted-greedy by size), FSDP2 a Shard(0) slice of each:
    both ~half the AdamW state per rank at 2 ranks, and together all of it (FSDP2 keeps a `step` per shard)."""
    model = dp_steps.seed_model(dp_steps.model_config(False))
    opt = build_optimizer(model, dp_steps.TC)
    dp_steps.train(model, opt)
    total = optimizer_state_bytes(opt)
    per_rank = ranks[mode]["opt_bytes"]
    for b in per_rank:
        assert b == pytest.approx(share * total, rel=0.05), f"{mode}: {per_rank} bytes per rank, one process {total}"
    if share < 1:
        assert sum(per_rank) == pytest.approx(total, rel=0.01)


# ---- FSDP2 and the MoE kernel ---------------------------------------------------------------------------------------
@needs_gloo
@pytest.mark.parametrize("mode", [fsdp_param(m) for m in ("fsdp2", "fsdp3")])
def test_grouped_expert_kernel_gets_whole_plain_weights_under_fsdp2(ranks, mode):
    """FSDP2 all-gathers a block's weights before its forward and swaps them in as plain Parameters: the hand-
    written autograd kernel (moekit/model/grouped.py) sees whole (E, out, in) tensors, never DTensor shards."""
    cfg = dp_steps.CFG
    want = [("Parameter", (cfg.n_expert, cfg.d_ff, cfg.d_model)), ("Parameter", (cfg.n_expert, cfg.d_model, cfg.d_ff)),
            ("Parameter", (cfg.n_expert, cfg.d_ff, cfg.d_model))]
    seen = ranks[mode]["kernel_inputs"]
    assert seen and all([tuple(w) for w in call] == want for call in seen)


# ---- a world of one --------------------------------------------------------------------------------------------
def test_a_world_of_one_is_the_same_code_with_nothing_applied():
    """No process group: every data-parallel function leaves the model and optimizer as they are, and the step is
    bit for bit the plain one (torch's own clip_grad_norm_)."""
    assert not (dist.is_available() and dist.is_initialized())
    dims = ParallelDims.from_flags(1, zero=3, cfg=dp_steps.CFG)
    model = dp_steps.seed_model(dp_steps.CFG)
    assert apply_data_parallel(model, dims, None) is model
    opt = build_optimizer(model, dp_steps.TC)
    assert shard_optimizer(opt, ParallelDims(zero=1), None) is opt

    plain = dp_steps.seed_model(dp_steps.CFG)
    x_BT, y_BT = dp_steps.global_batch(0)
    with gradient_sync(model, enabled=False):
        model(x_BT, y_BT).loss.backward()
    plain(x_BT, y_BT).loss.backward()
    norm = clip_grad_norm(model.parameters(), 0.5)
    want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    assert torch.equal(norm, want)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
