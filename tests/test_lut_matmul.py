"""The one-function LUT linear against the autograd composition it replaces, and what it keeps for backward."""

import pytest
import torch
import torch.nn.functional as F

from qatkit.nn.lut_linear import LUTLinear, LUTSpec
from qatkit.quant.lut import lut_fake_quantize
from qatkit.quant.lut_matmul import lut_linear


def reference(x, weight, lut, a, b, bias, index):
    """The plain autograd graph: STE codes of W / (A @ B) (normaliser detached) times A @ B, then F.linear."""
    groups = lut.shape[0]
    if index is None:
        codes = lut_fake_quantize((weight / (a @ b).detach()).reshape(groups, -1), lut)
    else:
        codes = lut.gather(1, index.reshape(groups, -1).long())
    return F.linear(x, codes.reshape(weight.shape) * (a @ b), bias)


def _inputs(groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f, rank = 8, 12, 3
    weight = torch.randn(out_f, in_f, generator=g)
    lut = torch.sort(torch.randn(groups, 4, generator=g), dim=1).values
    a = torch.rand(out_f, rank, generator=g) + 0.5
    b = torch.rand(rank, in_f, generator=g) + 0.5
    bias = torch.randn(out_f, generator=g)
    x = torch.randn(2, 5, in_f, generator=g)
    return [t.requires_grad_() for t in (x, weight, lut, a, b, bias)]


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("frozen", [False, True])
def test_outputs_and_gradients_match_the_autograd_reference(groups, frozen):
    ts = _inputs(groups)
    index = torch.randint(0, 4, (8, 12), dtype=torch.uint8) if frozen else None
    grads = []
    for fn in (lut_linear, reference):
        for t in ts:
            t.grad = None
        y = fn(*ts, index=index)
        (y.sin() * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        grads.append([y.detach()] + [t.grad for t in ts])
    for name, got, want in zip(["y", "x", "weight", "lut", "a", "b", "bias"], *grads, strict=True):
        if want is None:  # frozen indices: the latent weight takes no part
            assert got is None and frozen and name == "weight"
            continue
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), name


def test_gradients_match_finite_differences_of_the_frozen_layer():
    """With fixed indices the layer is smooth in x, table, scales and bias: check against finite differences."""
    x, _, lut, a, b, bias = (t.detach().double().requires_grad_() for t in _inputs(2))
    index = torch.randint(0, 4, (8, 12), dtype=torch.uint8)
    w = torch.zeros(8, 12, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda *t: lut_linear(t[0], w, *t[1:], index=index), (x, lut, a, b, bias))


def test_saves_about_one_byte_per_weight_for_backward():
    """The autograd composition keeps ~24 bytes per weight; this function keeps x and uint8 indices."""
    layer = LUTLinear.from_linear(torch.nn.Linear(256, 512), LUTSpec(bits=2, rank=4, group_rows=1))
    x = torch.randn(2, 3, 256)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    weights = 256 * 512
    assert sum(saved) < 1.2 * weights + x.numel() * 4 + 512 * 4 * 10
