"""Range observers against torch.ao's observers and numpy's percentiles."""

import numpy as np
import torch
from torch.ao.quantization.observer import MovingAverageMinMaxObserver

from qatkit.nn import FakeQuantizer
from qatkit.quant import QuantSpec, fake_quantize, observe, qparams_from_range


def test_minmax_per_channel_and_group_layout():
    w = torch.arange(24.0).reshape(4, 6) - 10
    lo, hi = observe(w, QuantSpec(granularity="channel"))
    assert torch.equal(lo, w.amin(1)) and torch.equal(hi, w.amax(1))
    lo, hi = observe(w, QuantSpec(granularity="group", group_size=3))
    assert torch.equal(hi, w.reshape(8, 3).amax(1))


def test_percentile_matches_numpy():
    x = torch.randn(10000)
    lo, hi = observe(x, QuantSpec(observer="percentile", percentile=99.0))
    assert np.isclose(float(hi), np.percentile(x.numpy(), 99.0), rtol=1e-5)
    assert np.isclose(float(lo), np.percentile(x.numpy(), 1.0), rtol=1e-5)


def test_mse_range_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(32, 256) ** 3  # heavy tails: clipping pays off
    spec = QuantSpec(bits=3, granularity="channel", observer="mse")
    errs = []
    for lo, hi in (observe(w, spec), (w.amin(1), w.amax(1))):
        s, zp = qparams_from_range(lo, hi, spec.qmin, spec.qmax, True)
        errs.append(((fake_quantize(w, s, zp, spec.qmin, spec.qmax, ch_axis=0) - w) ** 2).mean(1))
    assert bool((errs[0] <= errs[1] + 1e-12).all())
    assert float(errs[0].mean()) < 0.9 * float(errs[1].mean())


def test_ema_observer_matches_torch_moving_average_observer():
    torch.manual_seed(0)
    spec = QuantSpec(bits=8, signed=False, symmetric=False, observer="ema", ema_momentum=0.01)
    fq = FakeQuantizer(spec)
    ref = MovingAverageMinMaxObserver(averaging_constant=0.01, dtype=torch.quint8)
    for _ in range(5):
        x = torch.randn(256) * 2 + 1
        fq(x)
        ref(x)
    assert torch.allclose(fq.min_val, ref.min_val.reshape(1)) and torch.allclose(fq.max_val, ref.max_val.reshape(1))
    s, zp = ref.calculate_qparams()
    assert torch.allclose(fq.scale, s.float()) and int(fq.zero_point) == int(zp)


def test_activation_minmax_accumulates_but_weight_range_is_replaced():
    act = FakeQuantizer(QuantSpec(signed=False, symmetric=False))
    act(torch.tensor([0.0, 1.0]))
    act(torch.tensor([0.0, 0.5]))
    assert float(act.max_val) == 1.0
    wq = FakeQuantizer(QuantSpec(granularity="channel"), shape=(1, 2))
    wq(torch.tensor([[0.0, 1.0]]))
    wq(torch.tensor([[0.0, 0.5]]))
    assert float(wq.max_val) == 0.5
