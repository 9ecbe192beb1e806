"""moekit.model.linear: the split product of a few rows equals the plain one; Linear is nn.Linear to everything else
(int8 quantization swaps it out too: tests/test_infer_quant.py checks that no nn.Linear is left)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.model import linear
from moekit.model.linear import Linear, mm_t, split_ok


@pytest.mark.parametrize("rows", [1, 2, 5, linear.MAX_ROWS])
@pytest.mark.parametrize("out_features", [512, 1026])
def test_the_split_product_equals_the_plain_one(rows, out_features):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(out_features, 96, generator=g)
    assert split_ok(x, w)
    ref = (x.double() @ w.double().t()).float()  # the oracle, summed in fp64
    y = mm_t(x, w)
    assert y.shape == (rows, out_features) and y.is_contiguous()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    out = torch.full((rows, out_features), float("nan"))
    assert mm_t(x, w, out) is out and torch.equal(out, y)


def test_what_keeps_the_plain_product():
    w = torch.randn(512, 64)
    assert not split_ok(torch.randn(linear.MAX_ROWS + 1, 64), w)  # prefill and training rows: a GEMM
    assert not split_ok(torch.randn(1, 64), torch.randn(linear.MIN_OUT - 2, 64))  # narrow (MQA's wk, wv)
    assert not split_ok(torch.randn(1, 64), torch.randn(513, 64))  # odd: no two halves
    assert not split_ok(torch.randn(1, 64).bfloat16(), w.bfloat16())  # oneDNN's bf16 product is fastest plain


def test_linear_is_nn_linear_with_the_same_function():
    torch.manual_seed(0)
    plain = nn.Linear(64, 1024)
    torch.manual_seed(0)
    mine = Linear(64, 1024)
    assert isinstance(mine, nn.Linear) and mine.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), plain.state_dict().values(), strict=True))
    for shape in [(1, 64), (3, 1, 64), (2, 40, 64)]:  # decode rows (split) and a prefill (plain)
        x = torch.randn(shape)
        assert torch.allclose(mine(x), F.linear(x, plain.weight, plain.bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 64, requires_grad=True)  # autograd goes through the split product too
    mine(x).square().sum().backward()
    ref = x.detach().requires_grad_()
    F.linear(ref, plain.weight, plain.bias).square().sum().backward()
    assert torch.allclose(x.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_every_other_product_is_nn_linears_own_call_bitwise():
    """Narrow outputs, many rows, bf16: F.linear with the bias fused, as nn.Linear (so bitwise checks elsewhere and
    tensor-parallel DTensors, whose collectives are counted, see nn.Linear)."""
    torch.manual_seed(0)
    for layer, x in [(Linear(64, 100), torch.randn(2, 64)), (Linear(64, 1024), torch.randn(40, 64)),
                     (Linear(64, 1024).bfloat16(), torch.randn(2, 64).bfloat16())]:
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
