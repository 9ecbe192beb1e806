"""Tensor + sequence parallelism (moekit/parallel/tensor.py) against one process, 2 gloo ranks on a CPU.

One launch for the whole file (DESIGN.md "Distributed code and its tests"): a module fixture spawns the two ranks of
tp_worker.py once, each trains every layout and the one-process references, and the tests below assert on what
they measured. The checks: TP, TP+SP and TP+SP+loss_parallel on an MQA SwiGLU MoE model and a GQA GELU dense model
(LayerNorm, biases, tied embeddings, an odd vocabulary), 5 AdamW steps with clipping; every step's loss, the final
gathered weights and the routing statistics; each rank's shards; the gradients' layouts; the calls refused.
Why fp64 as well as fp32 is said in tp_worker.py's docstring.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/parallel/test_tensor_parallel.py -q
"""

from __future__ import annotations

import pytest
import torch

from moekit.config import ModelConfig
from moekit.parallel.mesh import check_tp
from moekit.parallel.tensor import loss_context, tensor_parallel_available

pytestmark = pytest.mark.skipif(not tensor_parallel_available() or not torch.distributed.is_gloo_available(),
                                reason="tensor parallelism needs torch >= 2.5 with gloo")

import tp_worker  # noqa: E402  (beside this file; pytest puts tests/parallel on sys.path)
from spawn import spawn_ranks  # noqa: E402

WORLD, LAUNCH_TIMEOUT_S = 2, 300
CONFIGS = tp_worker.configs()
MODES = list(tp_worker.MODES)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(tp_worker.run, WORLD, tmp_path_factory.mktemp("tp"), LAUNCH_TIMEOUT_S)


def _runs(ranks, key: str):
    return [(r, res["runs"][key]) for r, res in enumerate(ranks)]


# ---- parity with one process -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp64_layouts_compute_the_one_process_function(ranks, name, mode):
    """Losses and every element of every final weight: measured ~1e-13; 1e-9 leaves room for other BLAS."""
    for r, run in _runs(ranks, f"{name}/fp64/{mode}"):
        assert max(run["loss_rel"]) < 1e-9, (r, run["loss_rel"])
        worst = max(run["weight_max"], key=run["weight_max"].get)
        assert run["weight_max"][worst] < 1e-9, (r, worst, run["weight_max"][worst])
        assert run["routing_equal"], (r, run["routing"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_layouts_match_one_process(ranks, name, mode):
    """Every step's loss within 1e-5 (measured ~2e-7), routing equal, and each final weight no further from the
    one-process run than fp32 rounding moves that run from its fp64 twin (the control), to a factor of 10."""
    control = ranks[0]["runs"][f"{name}/fp32/control"]["weight_fro"]
    for r, run in _runs(ranks, f"{name}/fp32/{mode}"):
        assert max(run["loss_rel"]) < 1e-5, (r, run["loss_rel"])
        assert run["routing_equal"], (r, run["routing"])
        over = {n: (e, control[n]) for n, e in run["weight_fro"].items() if e > 10 * control[n] + 1e-6}
        assert not over, (r, over)


def test_expert_gather_kernel_and_capacity_dropping(ranks):
    for r, run in _runs(ranks, "mqa_moe/fp64/tp_sp_lp_gather_capacity"):
        assert max(run["loss_rel"]) < 1e-9 and max(run["weight_max"].values()) < 1e-9, r
        assert run["routing_equal"], (r, run["routing"])
        assert any(layer[-1] > 0 for step in run["routing"] for layer in step), "capacity dropped nothing"


def test_routing_statistics_are_counted_on_the_full_batch(ranks):
    # tokens per expert over all B x T x K assignments, as one process counts them, on every rank (SP included)
    cfg = CONFIGS["mqa_moe"]
    for _, run in _runs(ranks, "mqa_moe/fp32/tp_sp"):
        for step in run["routing"]:
            assert len(step) == cfg.n_moe_layers
            assert all(sum(layer[:-1]) == tp_worker.BATCH * tp_worker.SEQ * cfg.top_k for layer in step), step


# ---- what each rank holds -----------------------------------------------------------------------------------------
def _shard_dim(name: str, cfg: ModelConfig) -> int | None:
    """The dimension the plan splits each weight on (None: replicated)."""
    if name in ("tok_emb.weight", "lm_head.weight") or name.endswith(("attn.wq.weight", "attn.wq.bias")):
        return 0
    if ".attn.wk." in name or ".attn.wv." in name:
        return 0 if cfg.n_kv_head > 1 else None  # MQA's one KV head is replicated
    if name.endswith(("mlp.w1.weight", "mlp.w1.bias", "mlp.w3.weight", "mlp.w3.bias")):
        return 0
    if name.endswith(("attn.wo.weight", "mlp.w2.weight", "experts.w1", "experts.w3")):
        return 1
    if name.endswith("experts.w2"):
        return 2
    return None  # norms, the router, row-parallel biases


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_rank_holds_its_half_of_the_sharded_weights(ranks, name):
    cfg = CONFIGS[name]
    for r, res in enumerate(ranks):
        params = res["shards"][name]["params"]
        assert params, r
        for n, p in params.items():
            dim = _shard_dim(n, cfg)
            assert p["dim"] == dim, (r, n, p)
            want = list(p["full"])
            if dim is not None:  # torch.chunk sizes: the odd vocabulary gives 33 + 32 rows
                want[dim] = torch.arange(p["full"][dim]).chunk(WORLD)[r].numel()
            assert p["local"] == want, (r, n, p)
            assert p["own_slice"], (r, n, "the local tensor is not this rank's slice of the seed weights")
        local_heads = [cfg.n_head // WORLD, cfg.n_kv_head // WORLD if cfg.n_kv_head > 1 else 1]
        assert all(h == local_heads for h in res["shards"][name]["heads"].values()), res["shards"][name]["heads"]


def test_gradients_come_back_in_their_parameters_layout(ranks):
    for r, res in enumerate(ranks):
        for key, run in res["runs"].items():
            assert run["bad_grad_layouts"] == [], (r, key, run["bad_grad_layouts"])
            assert run["loss_type"] == "Tensor", (r, key, "out.loss should be a plain tensor in every layout")


def test_refused_calls_name_the_problem(ranks):
    for res in ranks:
        for errors in res["errors"].values():
            assert "multiple of --tp (2)" in errors["odd_seq"]
            assert "KV cache" in errors["kv_cache"]


# ---- in this process: no ranks needed ----------------------------------------------------------------------------
def test_check_tp_names_the_flag_and_the_valid_choices():
    mqa = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=1, d_ff=48, n_expert=4, top_k=2)
    for tp in (1, 2, 4):
        check_tp(tp, mqa)  # MQA: the KV head is replicated, any divisor of n_head works
    with pytest.raises(ValueError, match=r"--tp 3 must divide the 4 query heads: choose one of 1, 2, 4"):
        check_tp(3, mqa)
    gqa = ModelConfig(vocab_size=64, n_layer=2, d_model=64, n_head=8, n_kv_head=2, d_ff=64)
    with pytest.raises(ValueError, match=r"--tp 4 must divide the 2 KV heads .*MQA.*: choose one of 1, 2"):
        check_tp(4, gqa)
    with pytest.raises(ValueError, match=r"--tp 8 must divide the MLP hidden size d_ff=44"):
        check_tp(8, mqa.replace(n_head=8, head_dim=4, d_ff=44))


def test_loss_context_is_a_no_op_without_loss_parallel():
    with loss_context(False):
        assert torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1])).item() == pytest.approx(
            torch.log(torch.tensor(3.0)).item())


def test_gpt4_8way_shards_without_memory():
    """GPT-4's 8-way tensor parallelism (SPEC section 3), every shard shape of one rank, on the meta device over
    torch's fake process group (DESIGN.md: GPT-4-sized layouts checked without GPUs)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moekit.model.transformer import Transformer
    from moekit.parallel.tensor import apply_tensor_parallel
    from moekit.presets import PRESETS

    cfg, tp, rank = PRESETS["gpt4"], 8, 3
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp)
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
        apply_tensor_parallel(model, init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",)), True, True)
        held = full = 0
        for n, p in model.named_parameters():
            dim = _shard_dim(n, cfg)
            want = list(p.shape)
            if dim is not None:
                want[dim] = torch.arange(p.shape[dim]).chunk(tp)[rank].numel()
            assert list(p.to_local().shape) == want, (n, tuple(p.to_local().shape), want)
            held, full = held + p.to_local().numel(), full + p.numel()
        assert model.blocks["0"].attn.n_head == cfg.n_head // tp == 21 and model.blocks["0"].attn.n_kv_head == 1
        assert 1 / tp < held / full < 1.01 / tp  # all but the norms, the routers and MQA's K/V is split 8 ways
    finally:
        dist.destroy_process_group()
