"""LUT quantizer math and the LUTLinear wrapper, against brute-force and explicit references."""

import numpy as np
import pytest
import torch
from torch import nn

from qatkit.nn.lut_linear import LUTLinear, LUTSpec
from qatkit.quant.lowrank import expand_rank, init_scales, lowrank_linear, v1_to_v2, v2_factors
from qatkit.quant.lut import kmeans_lut, lut_fake_quantize, nearest_index, reduce_lut, ste_fp16


def test_nearest_index_matches_brute_force_argmin_even_for_unsorted_tables():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 500, generator=g)
    lut = torch.randn(3, 7, generator=g)  # unsorted on purpose
    brute = (values[:, :, None] - lut[:, None, :]).abs().argmin(-1)
    got = nearest_index(values, lut)
    same_distance = (values - lut.gather(1, got)).abs() == (values - lut.gather(1, brute)).abs()
    assert bool(same_distance.all())


def test_lut_fake_quantize_gradients_are_straight_through_and_scatter_to_the_table():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 50, generator=g, requires_grad=True)
    lut = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [-0.5, 0.5, 1.5, 3.0]], requires_grad=True)
    upstream = torch.randn(2, 50, generator=g)
    out = lut_fake_quantize(values, lut)
    idx = nearest_index(values.detach(), lut.detach())
    assert torch.equal(out.detach(), lut.detach().gather(1, idx))
    (out * upstream).sum().backward()
    assert torch.equal(values.grad, upstream)  # straight-through
    expected = torch.zeros(2, 4).scatter_add_(1, idx, upstream)
    assert torch.allclose(lut.grad, expected)


def test_kmeans_lut_is_a_weighted_lloyd_fixed_point_no_worse_than_sklearn():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 3000, generator=g) * torch.rand(1, 3000, generator=g)
    w = v.abs()
    lut = kmeans_lut(v, 4, iters=200, weights=w)
    idx = nearest_index(v, lut)
    for e in range(4):  # every entry is the weighted mean of the values nearest to it
        sel = idx[0] == e
        assert torch.allclose(lut[0, e], (v[0, sel] * w[0, sel]).sum() / w[0, sel].sum(), atol=1e-5)
    ours = float((w * (v - lut.gather(1, idx)) ** 2).sum())
    km = KMeans(4, n_init=10, random_state=0).fit(v.T.numpy(), sample_weight=w[0].numpy())
    assert ours <= km.inertia_ * 1.01


def test_weighted_kmeans_keeps_large_weights_larger_than_plain_kmeans():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(1, 5000, generator=g)
    plain, weighted = kmeans_lut(v, 4), kmeans_lut(v, 4, weights=v.abs())
    assert float(weighted.abs().max()) > float(plain.abs().max())


def test_ste_fp16_rounds_forward_and_passes_gradient():
    x = torch.tensor([1.0 + 2**-12, 3.14159265, 1e-8], requires_grad=True)
    y = ste_fp16(x)
    assert torch.equal(y.detach(), x.detach().half().float())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_lowrank_forward_modes_equal_the_explicit_materialised_reference():
    g = torch.Generator().manual_seed(4)
    out_f, in_f, r = 12, 20, 3
    q = torch.randn(out_f, in_f, generator=g)
    a, b = torch.randn(out_f, r, generator=g), torch.randn(r, in_f, generator=g)
    x, bias = torch.randn(2, 5, in_f, generator=g), torch.randn(out_f, generator=g)
    w = torch.empty(out_f, in_f)
    for o in range(out_f):
        for i in range(in_f):
            w[o, i] = q[o, i] * sum(a[o, k] * b[k, i] for k in range(r))
    ref = x @ w.T + bias
    for mode in ("materialize", "batched", "factored"):
        assert torch.allclose(lowrank_linear(x, q, a, b, bias, mode), ref, atol=1e-4), mode
    with pytest.raises(ValueError, match="forward mode"):
        lowrank_linear(x, q, a, b, bias, "other")


def test_init_scales_are_positive_rank_one_and_expand_rank_keeps_the_product():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(30, 40, generator=g)
    a, b = init_scales(w, 4)
    s = a @ b
    assert bool((s > 0).all())
    assert torch.linalg.matrix_rank(s) == 1
    a2, b2 = expand_rank(a, b, 9, g)
    assert a2.shape == (30, 9) and b2.shape == (9, 40)
    assert torch.allclose(a2 @ b2, s)


def test_v1_to_v2_keeps_the_scales_and_has_unit_directions():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(10, 4, generator=g), torch.randn(4, 16, generator=g)
    a[:, 3] = 0  # a dead rank keeps g = 0
    a_dir, b_dir, mag = v1_to_v2(a, b)
    assert torch.allclose(a_dir.norm(dim=0), torch.ones(4)) and torch.allclose(b_dir.norm(dim=1), torch.ones(4))
    assert float(mag[3]) == 0.0
    a_eff, b_eff = v2_factors(a_dir, b_dir, mag)
    assert torch.allclose(a_eff @ b_eff, a @ b, atol=1e-5)


@pytest.mark.parametrize("form", ["v1", "v2"])
def test_lut_linear_modes_agree_and_match_dequantized_weight(form):
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    m = LUTLinear.from_linear(lin, LUTSpec(bits=2, rank=4, form=form, group_rows=8))
    assert m.lut.shape == (3, 4)
    x = torch.randn(7, 32)
    ref = x @ m.dequantized_weight().T + m.bias
    for mode in ("materialize", "batched", "factored"):
        m.set_forward_mode(mode)
        assert torch.allclose(m(x), ref, atol=1e-5), mode
    levels = m.codes().detach().reshape(3, -1)
    for grp in range(3):  # every code is an entry of its group's table
        assert set(levels[grp].unique().tolist()) <= set(m.lut[grp].tolist())


def test_freeze_q_keeps_function_and_only_scales_and_table_train():
    torch.manual_seed(1)
    m = LUTLinear.from_linear(nn.Linear(16, 8, bias=False), LUTSpec(bits=2, rank=2))
    x = torch.randn(4, 16)
    y0 = m(x)
    m.freeze_q()
    y1 = m(x)
    assert torch.equal(y0, y1)
    y1.sum().backward()
    assert m.weight.grad is None and m.scale_a.grad is not None and m.lut.grad is not None
    assert not m.has_latent and m.num_weights == 128  # the latent weight is released: the indices stand for it
    state = m.state_dict()
    assert bool(state["frozen"]) and state["index"].dtype == torch.uint8 and state["weight"].shape == (0,)
    fresh = LUTLinear(16, 8, False, m.spec)  # built with a latent weight: takes the state without one
    fresh.load_state_dict(state)
    assert not fresh.has_latent and not fresh.weight.requires_grad and torch.equal(fresh(x), y1)
    lean = LUTLinear(16, 8, False, m.spec, latent=False)
    lean.load_state_dict(state)
    assert torch.equal(lean(x), y1)


def test_frozen_state_with_a_latent_weight_loads_and_releases_it_and_an_unfrozen_one_gets_it_back():
    torch.manual_seed(2)
    m = LUTLinear.from_linear(nn.Linear(16, 8), LUTSpec(bits=2, rank=2))
    x = torch.randn(4, 16)
    unfrozen = {k: v.clone() for k, v in m.state_dict().items()}
    y_unfrozen = m(x)
    m.freeze_q()
    old_style = {**m.state_dict(), "weight": unfrozen["weight"]}  # frozen indices saved with their latent weight
    fresh = LUTLinear(16, 8, True, m.spec)
    fresh.load_state_dict(old_style)
    assert not fresh.has_latent and torch.equal(fresh(x), m(x))
    fresh.load_state_dict(unfrozen)  # e.g. a snapshot taken before freeze_q: latent weight back, training again
    assert fresh.has_latent and fresh.weight.requires_grad and torch.equal(fresh(x), y_unfrozen)
    with pytest.raises(ValueError, match="freeze_q first"):
        fresh.release_weight()
    with pytest.raises(RuntimeError, match="size mismatch for weight"):  # unfrozen indices need their weight
        fresh.load_state_dict({**unfrozen, "weight": torch.zeros(0)})


def test_v2_conversion_and_rank_expansion_keep_the_layer_function():
    torch.manual_seed(2)
    m = LUTLinear.from_linear(nn.Linear(24, 16), LUTSpec(bits=4, rank=4))
    x = torch.randn(5, 24)
    y = m(x)
    m.freeze_q()
    m.to_v2()
    assert m.spec.form == "v2"
    assert torch.allclose(m(x), y, atol=1e-5)
    m.expand_rank(8, torch.Generator().manual_seed(0))
    assert m.spec.rank == 8 and m.magnitude.shape == (8,)
    assert torch.allclose(m(x), y, atol=1e-5)


def test_q4_to_q2_reduction_is_as_good_as_a_direct_weighted_kmeans_of_the_codes():
    """Stated tolerance: the 4-entry table's weighted error is within 1% of sklearn's k-means on the same codes."""
    from sklearn.cluster import KMeans

    torch.manual_seed(3)
    m = LUTLinear.from_linear(nn.Linear(64, 32), LUTSpec(bits=4, rank=1))
    m.freeze_q()
    codes16 = m.codes().detach().flatten()
    m.reduce_bits(2)
    assert m.lut.shape == (1, 4) and m.spec.bits == 2 and int(m.index.max()) <= 3
    codes4 = m.codes().detach().flatten()
    err = float(((codes16 - codes4) ** 2).sum())
    km = KMeans(4, n_init=10, random_state=0).fit(codes16[:, None].numpy())
    assert err <= km.inertia_ * 1.01 + 1e-6
    with pytest.raises(ValueError, match="fewer bits"):
        m.reduce_bits(2)


def test_reduce_lut_maps_each_old_entry_to_its_nearest_new_one():
    lut = torch.tensor([[-3.0, -2.9, -1.0, -0.9, 0.0, 0.1, 2.0, 2.2]])
    counts = torch.ones_like(lut)
    new, mapping = reduce_lut(lut, counts, 4)
    assert np.allclose(new[0].numpy(), [-2.95, -0.95, 0.05, 2.1], atol=1e-5)
    assert mapping.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]


def test_lut_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="bits"):
        LUTSpec(bits=9)
    with pytest.raises(ValueError, match="form"):
        LUTSpec(form="v3")
    with pytest.raises(ValueError, match="divide"):
        LUTLinear(8, 10, False, LUTSpec(group_rows=3))


def test_to_linear_gives_the_same_outputs_as_the_lut_layer():
    torch.manual_seed(4)
    m = LUTLinear.from_linear(nn.Linear(20, 12), LUTSpec(bits=2, rank=3, form="v2"))
    x = torch.randn(6, 20)
    lin = m.to_linear()
    assert type(lin) is nn.Linear and torch.allclose(lin(x), m(x), atol=1e-6)


def test_without_normalizer_grad_the_scale_gradient_is_the_rescaling_term_only():
    torch.manual_seed(5)
    m = LUTLinear.from_linear(nn.Linear(10, 6, bias=False), LUTSpec(bits=2, rank=2))  # the default
    x = torch.randn(4, 10)
    upstream = torch.randn(4, 6)
    (m(x) * upstream).sum().backward()
    g_w = upstream.T @ x  # dL/dW_hat for y = x @ W_hat.T
    q = m.codes().detach()
    expected_a = (g_w * q) @ m.scale_b.detach().T  # W_hat = q ⊙ (A @ B) with q held constant
    assert torch.allclose(m.scale_a.grad, expected_a, atol=1e-5)
