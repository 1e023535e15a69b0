"""Quantizer math against PyTorch's reference quantization ops and the LSQ gradient formula."""

import pytest
import torch
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from qatkit.quant import (
    QuantSpec,
    dequantize_int,
    fake_quantize,
    lsq_fake_quantize,
    lsq_grad_factor,
    qparams_from_range,
    qrange,
    quantize_to_int,
)


def test_qrange():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(2, True) == (-2, 1)
    assert qrange(4, True, narrow_range=True) == (-7, 7)


@pytest.mark.parametrize(
    "symmetric,dtype,qmin,qmax",
    [
        (True, torch.qint8, -128, 127),
        (False, torch.quint8, 0, 255),
        (False, torch.qint8, -128, 127),
    ],
)
def test_per_tensor_qparams_match_torch_observer(symmetric, dtype, qmin, qmax):
    x = torch.randn(1000) * 3 + 0.5
    obs = MinMaxObserver(dtype=dtype, qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine)
    obs(x)
    ref_s, ref_zp = obs.calculate_qparams()
    s, zp = qparams_from_range(x.min(), x.max(), qmin, qmax, symmetric)
    assert torch.equal(s.reshape(1), ref_s.float().reshape(1))
    assert int(zp) == int(ref_zp)


def test_per_channel_qparams_match_torch_observer():
    w = torch.randn(16, 32) * torch.linspace(0.1, 4, 16)[:, None]
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    obs(w)
    ref_s, ref_zp = obs.calculate_qparams()
    s, zp = qparams_from_range(w.amin(1), w.amax(1), -128, 127, True)
    assert torch.equal(s, ref_s.float())
    assert torch.equal(zp.long(), ref_zp.long())


@pytest.mark.parametrize("seed", range(20))
def test_fake_quantize_bit_exact_with_torch_quantize_per_tensor(seed):
    """Equal to torch.quantize_per_tensor except exactly at rounding ties: the fake-quant kernel multiplies by
    1/scale in float, quantize_per_tensor divides, so x/scale = k + 0.5 (to float precision) may round apart."""
    torch.manual_seed(seed)
    x = torch.randn(4096) * 5
    s, zp = qparams_from_range(x.min(), x.max(), 0, 255, False)
    ref = torch.dequantize(torch.quantize_per_tensor(x, float(s), int(zp), torch.quint8))
    out = fake_quantize(x, s, zp, 0, 255)
    differ = out != ref
    t = x[differ] / s
    assert torch.all((t - t.floor() - 0.5).abs() < 1e-4)  # ties only
    assert torch.allclose((out - ref)[differ].abs(), s.expand(int(differ.sum())), rtol=1e-4)  # by one step


def test_fake_quantize_bit_exact_with_torch_quantize_per_channel():
    w = torch.randn(8, 64) * torch.linspace(0.01, 3, 8)[:, None]
    s, zp = qparams_from_range(w.amin(1), w.amax(1), -128, 127, True)
    ref = torch.dequantize(torch.quantize_per_channel(w, s.double(), zp.long(), 0, torch.qint8))
    assert torch.equal(fake_quantize(w, s, zp, -128, 127, ch_axis=0), ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_low_bit_fake_quantize_matches_reference_formula(bits):
    qmin, qmax = qrange(bits, True)
    w = torch.randn(6, 40)
    s, zp = qparams_from_range(w.amin(1), w.amax(1), qmin, qmax, True)
    inv = 1.0 / s[:, None]
    ref = (torch.clamp(torch.round(w * inv) + zp[:, None], qmin, qmax) - zp[:, None]) * s[:, None]
    out = fake_quantize(w, s, zp, qmin, qmax, ch_axis=0)
    assert torch.equal(out, ref)
    assert out.unique(dim=None).numel() <= 6 * 2**bits


def test_per_group_equals_per_channel_on_each_group():
    w = torch.randn(4, 32)
    g = 8
    groups = w.reshape(4, 4, g)
    s, zp = qparams_from_range(groups.amin(-1), groups.amax(-1), -8, 7, True)
    out = fake_quantize(w, s, zp, -8, 7, group_size=g)
    for o in range(4):
        for k in range(4):
            ref = torch.fake_quantize_per_tensor_affine(groups[o, k], float(s[o, k]), int(zp[o, k]), -8, 7)
            assert torch.equal(out[o, k * g : (k + 1) * g], ref)


def test_quantize_to_int_round_trips_to_fake_quant():
    w = torch.randn(5, 24)
    for kw in ({"ch_axis": 0}, {"group_size": 8}, {}):
        if "group_size" in kw:
            rows = w.reshape(-1, 8)
            s, zp = qparams_from_range(rows.amin(1), rows.amax(1), -2, 1, True)
        elif kw:
            s, zp = qparams_from_range(w.amin(1), w.amax(1), -2, 1, True)
        else:
            s, zp = qparams_from_range(w.min(), w.max(), -2, 1, True)
        q = quantize_to_int(w, s, zp, -2, 1, **kw)
        assert int(q.min()) >= -2 and int(q.max()) <= 1
        assert torch.equal(dequantize_int(q, s, zp, **kw), fake_quantize(w, s, zp, -2, 1, **kw))


def test_straight_through_gradient_is_masked_outside_range():
    x = torch.tensor([-10.0, -0.3, 0.0, 0.4, 10.0], requires_grad=True)
    s, zp = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    fake_quantize(x, s, zp, -8, 7).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def _lsq_scale_grad_formula(x, s, qmin, qmax):
    """LSQ paper, eq. 3: d x_hat / d s per element (zero point 0): round(v) - v where the forward does not
    clip (round(v) within [qmin, qmax]), else the clip level."""
    v = x / s
    r = torch.round(v)
    inside = (r >= qmin) & (r <= qmax)
    return torch.where(inside, r - v, torch.where(r < qmin, torch.full_like(v, qmin), torch.full_like(v, qmax)))


def test_lsq_per_tensor_gradient_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(500)
    s = torch.tensor([0.05], requires_grad=True)
    g_out = torch.randn(500)
    out = lsq_fake_quantize(x, s, torch.zeros(1), -8, 7)
    (out * g_out).sum().backward()
    factor = lsq_grad_factor(500, 7)
    expected = (g_out * _lsq_scale_grad_formula(x, s.detach(), -8, 7)).sum() * factor
    assert torch.allclose(s.grad, expected.reshape(1), rtol=1e-4, atol=1e-6)
    assert torch.equal(out.detach(), fake_quantize(x, s.detach(), torch.zeros(1, dtype=torch.int32), -8, 7))


def test_lsq_per_channel_gradient_matches_formula():
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    s = (w.abs().amax(1) / 4).clone().requires_grad_(True)
    g_out = torch.randn(4, 64)
    (lsq_fake_quantize(w, s, torch.zeros(4), -8, 7, ch_axis=0) * g_out).sum().backward()
    factor = lsq_grad_factor(64, 7)
    expected = (g_out * _lsq_scale_grad_formula(w, s.detach()[:, None], -8, 7)).sum(1) * factor
    assert torch.allclose(s.grad, expected, rtol=1e-4, atol=1e-6)


def test_lsq_scale_gradient_agrees_with_finite_differences_of_the_clipped_region():
    # Above the range the output is qmax * s exactly, so d/ds is exactly qmax (no rounding involved).
    x = torch.tensor([100.0, 200.0])
    s = torch.tensor([0.5], requires_grad=True)
    lsq_fake_quantize(x, s, torch.zeros(1), -8, 7, grad_factor=1.0).sum().backward()
    h = 1e-3
    fd = (
        fake_quantize(x, s.detach() + h, torch.zeros(1), -8, 7)
        - fake_quantize(x, s.detach() - h, torch.zeros(1), -8, 7)
    ).sum() / (2 * h)
    assert torch.allclose(s.grad, fd.reshape(1), rtol=1e-3)


def test_spec_validation():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="group")
