"""The MoE layer: both dispatch paths against the loop oracle, capacity dropping, the router losses."""

import math

import pytest
import torch
from conftest import tiny_cfg

from moekit.model.moe import MLP, MoE, capacity_keep, load_balancing_loss, route
from moekit.model.reference import capacity_keep_loop, moe_loop


def make_moe(mlp="gelu", n_expert=8, top_k=2, capacity_factor=0.0, d_model=32, d_ff=48, seed=0):
    # One MoE layer reads d_model, d_ff, n_expert, top_k, mlp and capacity_factor of the tiny config.
    cfg = tiny_cfg(d_model=d_model, d_ff=d_ff, n_expert=n_expert, top_k=top_k, mlp=mlp,
                   capacity_factor=capacity_factor)
    torch.manual_seed(seed)
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def grads(module, x, y):
    module.zero_grad()
    x.grad = None
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                               for p in module.parameters()]


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("dispatch", ["sorted", "gather"])
@pytest.mark.parametrize("shape", [(2, 7), (1, 1), (1, 3)])
def test_dispatch_equals_loop_oracle(mlp, capacity_factor, dispatch, shape):
    moe = make_moe(mlp=mlp, capacity_factor=capacity_factor)
    x = torch.randn(*shape, 32, dtype=torch.float64, requires_grad=True)
    y_ref = moe_loop(moe, x)
    g_ref = grads(moe, x, y_ref)
    moe.dispatch = dispatch
    y, info = moe(x)
    g = grads(moe, x, y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert int(info.tokens_per_expert_E.sum()) + int(info.dropped) == x.shape[0] * x.shape[1] * moe.top_k


def test_auto_dispatch_gathers_for_few_tokens_and_sorts_for_many():
    moe = make_moe(n_expert=16, top_k=2)
    calls = []  # which of the Experts module's two kernels ran
    moe.experts.register_forward_hook(lambda *a: calls.append("sorted"))
    moe.experts.gather = lambda *a, f=moe.experts.gather: calls.append("gather") or f(*a)
    moe(torch.randn(1, 1, 32, dtype=torch.float64))  # batch-1 decode: 2 assignments <= 16 experts
    moe(torch.randn(4, 16, 32, dtype=torch.float64))
    assert calls == ["gather", "sorted"]


def test_gather_path_reads_only_routed_experts():
    """At batch 1 only the top-2 experts' weights receive gradient: the others were never read."""
    moe = make_moe(n_expert=16, top_k=2)
    moe.dispatch = "gather"
    x = torch.randn(1, 1, 32, dtype=torch.float64)
    y, _ = moe(x)
    y.sum().backward()
    _, _, experts_TK = route(moe.router(x.view(1, 32)), 2)
    touched = (moe.experts.w1.grad.abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
    assert sorted(touched) == sorted(experts_TK.flatten().tolist())


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_one_expert_equals_dense_mlp(mlp):
    moe = make_moe(mlp=mlp, n_expert=1, top_k=1)
    cfg = tiny_cfg(n_expert=1, top_k=1, mlp=mlp)  # a dense MLP of d_model 32 (d_ff given: 48)
    dense = MLP(cfg, 48).double()
    with torch.no_grad():
        dense.w1.weight.copy_(moe.experts.w1[0])  # experts are stored (E, out, in), as nn.Linear
        dense.w2.weight.copy_(moe.experts.w2[0])
        if mlp == "swiglu":
            dense.w3.weight.copy_(moe.experts.w3[0])
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    for dispatch in ("sorted", "gather"):
        moe.dispatch = dispatch
        torch.testing.assert_close(moe(x)[0], dense(x)[0], rtol=1e-12, atol=1e-12)


def test_aux_loss_is_one_at_perfect_balance_and_higher_otherwise():
    E, K, T = 8, 2, 64
    # Uniform router probabilities and assignments spread evenly over the experts.
    probs = torch.full((T, E), 1 / E, dtype=torch.float64)
    experts = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.0, abs=1e-12)
    # Everything on expert 0 (and 1) with probability mass there: the loss grows towards E / K.
    skewed = torch.zeros(T, E, dtype=torch.float64)
    skewed[:, 0], skewed[:, 1] = 0.5, 0.5
    collapsed = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], 1)
    assert load_balancing_loss(skewed, collapsed).item() == pytest.approx(E / K)


def test_aux_loss_from_uniform_router_through_the_layer():
    moe = make_moe(n_expert=4, top_k=2)
    with torch.no_grad():
        moe.router.weight.zero_()  # all logits 0: uniform probabilities, z-loss = log(E)^2
    _, info = moe(torch.randn(4, 8, 32, dtype=torch.float64))
    # topk ties break to the lowest indices, so f is not uniform, but P is: aux = E * sum f_e / E = 1.
    assert info.aux_loss.item() == pytest.approx(1.0)
    assert info.z_loss.item() == pytest.approx(math.log(4) ** 2)
    assert info.entropy.item() == pytest.approx(math.log(4))


def test_router_weights_renormalized_topk():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    _, w, e = route(logits, 2)
    assert e.tolist() == [[0, 1]]
    p = torch.tensor([math.e ** 2, math.e])
    torch.testing.assert_close(w[0], (p / p.sum()).double())


def test_capacity_drops_exactly_the_overflow():
    # 6 tokens, 3 experts, top-2, capacity 2 per expert. 1st choices are served first, in token order.
    experts_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [1, 2]])
    keep = capacity_keep(experts_TK, n_expert=3, capacity=2)
    # 1st choices: expert 0 takes t0, t1 (t2 dropped); expert 1 takes t3, t5; expert 2 takes t4.
    # 2nd choices: expert 1 full (t0, t2, t4 dropped); expert 2 takes t1 (t5 dropped: 2 = t4, t1);
    # expert 0 full (t3 dropped).
    expected = torch.tensor([[True, False], [True, True], [False, False], [True, False], [True, False],
                             [True, False]])
    assert torch.equal(keep, expected)
    assert torch.equal(capacity_keep_loop(experts_TK, 3, 2), expected)


def test_capacity_keep_matches_python_loop_on_random_routings():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        T, E, K = int(torch.randint(1, 40, (1,), generator=gen)), 6, 2
        experts_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        cap = int(torch.randint(1, 10, (1,), generator=gen))
        assert torch.equal(capacity_keep(experts_TK, E, cap), capacity_keep_loop(experts_TK, E, cap))


def test_capacity_layer_reports_dropped_tokens_and_passes_nothing_for_them():
    moe = make_moe(n_expert=4, top_k=1, capacity_factor=0.25)  # capacity = ceil(0.25 * 16 / 4) = 1
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    y, info = moe(x)
    assert info.tokens_per_expert_E.max().item() <= 1
    assert int(info.dropped) == 16 - int(info.tokens_per_expert_E.sum())
    n_zero_rows = int((y[0].abs().sum(-1) == 0).sum())
    assert n_zero_rows == int(info.dropped)  # a dropped token gets no MLP output (residual only)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_cuda_grouped_mm_path_equals_loop_oracle(mlp, capacity_factor):
    """On CUDA in bf16 the sorted path runs torch's grouped GEMM; the loop oracle runs on the same
    device and dtype (so routing decisions are identical) and is the reference for outputs and grads."""
    moe = make_moe(mlp=mlp, capacity_factor=capacity_factor, n_expert=8, d_model=64, d_ff=128)
    moe = moe.to("cuda", torch.bfloat16)
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y_ref = moe_loop(moe, x)
    g_ref = grads(moe, x, y_ref)
    moe.dispatch = "sorted"
    y, _ = moe(x)
    g = grads(moe, x, y)
    # bf16 against bf16: a lone element may differ by a few units in the last place of a large
    # neighbour (seen on an H200: 1 of 65,536 by 0.054), so compare whole tensors, relative to their
    # norm, at a few bf16 epsilons (2^-8 = 0.0039).
    for a, b in zip((y, *g), (y_ref, *g_ref), strict=True):
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 1e-2, f"relative error {err:.2e}"


def test_inference_mode_skips_the_training_only_statistics_and_nothing_else():
    moe = make_moe(n_expert=4, top_k=2)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    y, info = moe(x)
    with torch.inference_mode():
        y_inf, info_inf = moe(x)
    assert torch.equal(y_inf, y) and torch.equal(info_inf.tokens_per_expert_E, info.tokens_per_expert_E)
    assert info.aux_loss is not None and info.z_loss is not None and info.entropy is not None
    assert info_inf.aux_loss is None and info_inf.z_loss is None and info_inf.entropy is None


def test_a_compiled_moe_does_not_recompile_for_new_expert_counts():
    """TrainConfig.compile compiles each block: the expert loop over data-dependent slice sizes runs eagerly
    (`grouped_expert_mlp` is excluded from compilation), so new routings reuse the compiled code. Before that, every
    new `counts` pattern recompiled the block's tail (a compiled tiny-preset step took 17 s instead of 1.4 s)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    moe = make_moe(n_expert=8)
    moe.dispatch = "sorted"
    counter = CompileCounter()
    compiled = torch.compile(moe, backend=counter)
    frames = []
    for seed in range(5):
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        y, _ = compiled(x)
        y.sum().backward()
        torch.testing.assert_close(y, moe(x)[0])
        frames.append(counter.frame_count)
    assert frames[-1] == frames[1], frames  # nothing compiled after the second call (the first may specialize)


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("counts", [[0, 1, 0, 1], [3, 0, 40, 2], [1, 1, 0, 0]])  # the last drops 2 of 4 rows
def test_the_no_grad_expert_loop_equals_the_autograd_one(swiglu, counts):
    """Inference skips GroupedExpertMLP's saved activations: the same products, so bitwise the same values."""
    from moekit.model.grouped import GroupedExpertMLP, grouped_expert_mlp

    g = torch.Generator().manual_seed(len(counts) + sum(counts))
    n = max(sum(counts), 4)
    x = torch.randn(n, 32, generator=g)
    w1, w2 = torch.randn(4, 512, 32, generator=g), torch.randn(4, 32, 512, generator=g)
    w3 = torch.randn(4, 512, 32, generator=g) if swiglu else None
    with torch.enable_grad():
        ref = GroupedExpertMLP.apply(x.clone().requires_grad_(), counts, w1, w2, w3)
    with torch.no_grad():
        got = grouped_expert_mlp(x, counts, w1, w2, w3)
    assert torch.equal(got, ref.detach())
    assert (got[sum(counts):] == 0).all()
