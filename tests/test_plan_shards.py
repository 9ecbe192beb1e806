"""The planner's per-rank and per-step byte model (moekit/plan/shards.py, moekit/plan/comm.py) on its own: no
process group. tests/parallel/test_plan_bytes.py compares it with real sharded models and counted collectives.

The facts checked: the parameter list is the model's; shards of every rank add up to the whole (uneven splits
too); ZeRO-1 gives every parameter to one rank; GPT-4's article layout, partitioned as torch's ZeroRedundancyOptimizer
does, leaves its fullest rank a whole stacked-expert tensor; the precision modes scale the article's formula; a
world of one has no collectives; `moekit plan train` prints and serializes the new figures.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_cfg

from moekit.cli import main
from moekit.counts import count_params
from moekit.model.transformer import Transformer
from moekit.plan import train
from moekit.plan.comm import WIRE_FACTOR, step_collectives
from moekit.plan.shards import local_shape, params, rank_bytes, stage_params, zero1_partition
from moekit.presets import PRESETS, get_preset

CONFIGS = {**{name: get_preset(name) for name in PRESETS},
           "dense_layernorm_bias": tiny_cfg(n_expert=1, top_k=1, norm="layernorm", bias=True, mlp="gelu",
                                             tie_embeddings=True),
           "moe_every_2_gqa": tiny_cfg()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_parameter_list_is_the_models(name):
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    assert [(p.name, p.shape) for p in params(cfg)] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert sum(p.numel for p in params(cfg)) == count_params(cfg).total


@pytest.mark.parametrize("tp, dp", [(2, 1), (1, 4), (4, 2), (8, 3)])
def test_every_ranks_shards_add_up_to_the_whole(tp, dp):
    cfg = tiny_cfg(vocab_size=97, d_ff=48)  # 97 rows split 2, 4 or 8 ways: uneven, as torch.chunk splits them
    if cfg.n_head % tp or cfg.d_ff % tp:
        cfg = cfg.replace(n_head=8, d_model=64, d_ff=64, n_kv_head=1)
    for p in params(cfg):
        copies = 1 if p.tp_dim is not None else tp  # replicated on every tensor rank
        total = sum(math.prod(local_shape(p, tp=tp, tp_rank=t, fsdp=dp, dp_rank=d)) for t in range(tp)
                    for d in range(dp))
        assert total == copies * p.numel, p.name


def test_zero1_gives_every_parameter_to_one_rank():
    ps = params(get_preset("gpt4-mini"))
    parts = zero1_partition(ps, 8)
    assert sorted(p.name for part in parts for p in part) == sorted(p.name for p in ps)
    sizes = [sum(p.numel for p in part) for part in parts]
    assert max(sizes) - min(sizes) <= max(p.numel for p in ps)  # greedy: within one tensor of each other


def test_gpt4s_zero1_fullest_rank_holds_a_whole_expert_stack():
    """The article's layout (tp 8 x pp 15 x dp 208, ZeRO-1): 8 layers per stage hold ~100 tensors for 208 ranks, so
    whole-parameter ZeRO-1 leaves most ranks nothing and the fullest one a whole (E, F/8, D) expert tensor's Adam
    state: 12.5x an even split. DeepSpeed's flat-buffer ZeRO-1 (train.py's formula) is the even split."""
    cfg = get_preset("gpt4")
    p = train(cfg, "A100-80GB", 25_000, 13e12, mfu=0.34)
    spread = p.ranks.optimizer_per_dp_rank
    stack = cfg.n_expert * (cfg.d_ff // 8) * cfg.d_model  # one layer's w1, tensor-parallel shard
    assert len(spread) == 208 and min(spread) == 0
    assert max(spread) == pytest.approx(12 * stack, rel=0.01)
    assert p.memory.optimizer == pytest.approx(sum(spread) / 208, rel=0.01)  # even split, the article's formula


def test_precision_modes_scale_the_memory_model():
    kw = dict(gpu="H100", n_gpus=4, tokens=1e9, tp=1, pp=1, zero_stage=0, batch_tokens=4096, seq_len=256,
              micro_batch=4)
    mixed = train("tiny", optimizer_precision="mixed", **kw)
    fp32 = train("tiny", optimizer_precision="fp32", **kw)
    assert (fp32.memory.weights, fp32.memory.gradients) == pytest.approx((2 * mixed.memory.weights,
                                                                          2 * mixed.memory.gradients))
    assert fp32.memory.optimizer == pytest.approx(mixed.memory.optimizer * 8 / 12)
    n_tensors = len(params(get_preset("tiny")))
    assert fp32.ranks.optimizer == 8 * count_params(get_preset("tiny")).total + 4 * n_tensors  # + AdamW's steps
    with pytest.raises(ValueError, match="--optimizer-precision"):
        train("tiny", optimizer_precision="fp16", **kw)


def test_a_world_of_one_communicates_nothing():
    cfg = get_preset("tiny")
    assert step_collectives(cfg, tokens_per_micro=256).collectives == []
    assert rank_bytes(cfg).weights == 4 * count_params(cfg).total


def test_ring_factors_and_pipeline_stages():
    assert WIRE_FACTOR["all_reduce"](8) == pytest.approx(2 * 7 / 8) and WIRE_FACTOR["all_gather"](2) == 0.5
    cfg = get_preset("gpt4")
    stages = [stage_params(cfg, 15, s) for s in range(15)]
    tied_copy = 1 if cfg.tie_embeddings else 0
    assert sum(len(s) for s in stages) == len(params(cfg)) + tied_copy
    assert stages[0][0].name == "tok_emb.weight" and stages[-1][-1].name == "lm_head.weight"


def test_moekit_plan_train_prints_and_serializes_ranks_and_collectives(capsys):
    args = ["plan", "train", "--model", "tiny", "--gpus", "2", "--tp", "1", "--pp", "1", "--zero", "3",
            "--optimizer-precision", "fp32", "--batch-tokens", "256", "--seq-len", "64", "--micro-batch", "2",
            "--recompute", "none", "--tokens", "1M"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "per rank (moekit)    weights 10.1 MB, grads 10.1 MB, optimizer 20.2 MB (fp32)" in out
    assert "collectives / step   all-gather 38.3 MB (9 calls), reduce-scatter 20.2 MB (5 calls)" in out
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ranks"]["weights"] == 4 * count_params(get_preset("tiny")).total / 2
    assert d["collectives"]["payload_by_kind"]["reduce_scatter"] == 2 * d["ranks"]["weights"]


@pytest.mark.parametrize("schedule, v, owned, boundaries, tied", [
    ("1f1b", 1, {0: [0], 1: [1]}, {0: 1, 1: 1}, True),
    ("interleaved-1f1b", 2, {0: [0, 2], 1: [1, 3]}, {0: 3, 1: 3}, True),  # boundaries 0|1, 1|2, 2|3 touch both
    ("zero-bubble", 2, {0: [0, 3], 1: [1, 2]}, {0: 2, 1: 2}, False),  # ZB-V: rank 0 holds both ends, no copy
])
def test_pipeline_ranks_hold_their_stages_and_send_across_each_boundary(schedule, v, owned, boundaries, tied):
    """plan/layout.py `rank_stages` is the placement moekit/parallel/pipeline.py runs; the planner's send/recv and
    tied-embedding traffic follow from it (bench/parallel_train.py measures both equal on 2 gloo ranks)."""
    from moekit.plan.layout import rank_stages

    cfg = tiny_cfg(n_layer=4, tie_embeddings=True)  # 4 stages of one layer
    m, t = 4, 16
    x = t * cfg.d_model * 4
    for r in (0, 1):
        assert rank_stages(2, r, v, schedule) == owned[r]
        comm = step_collectives(cfg, pp=2, stage=r, stages_per_rank=v, schedule=schedule, micro_batches=m,
                                tokens_per_micro=t, grad_clip=False)
        assert comm.payload_by_kind()["p2p"] == 2 * m * boundaries[r] * x
        assert any(c.group == "embedding" for c in comm.collectives) == tied
    # The rank holding both ends keeps one embedding: its weights are the whole model's minus the other rank's.
    both = rank_bytes(cfg, pp=2, stage=0, stages_per_rank=2, schedule="zero-bubble")
    other = rank_bytes(cfg, pp=2, stage=1, stages_per_rank=2, schedule="zero-bubble")
    assert both.weights + other.weights == rank_bytes(cfg).weights
