"""The KD loss against a hand-written loop reference, candidate logits against the full head, masking and gradients."""

import math

import numpy as np
import pytest
import torch

from qatkit.lm.kd_loss import candidate_logits, kd_loss


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _reference(student, teacher, T, hard_top1, hard_full, full_logits=None, top1_ids=None, mask=None):
    """Loop-by-loop reference of kd_loss in float64 python."""
    B, L, C = student.shape
    kls, top1s, fulls, n = 0.0, 0.0, 0.0, 0
    for b in range(B):
        for t in range(L):
            if mask is not None and not mask[b, t]:
                continue
            n += 1
            p = _softmax([teacher[b, t, c] / T for c in range(C)])
            q = _softmax([student[b, t, c] / T for c in range(C)])
            kls += T * T * sum(p[c] * (math.log(p[c]) - math.log(q[c])) for c in range(C))
            top1s += -math.log(_softmax([student[b, t, c] for c in range(C)])[0])
            if full_logits is not None:
                V = full_logits.shape[-1]
                fulls += -math.log(_softmax([full_logits[b, t, v] for v in range(V)])[top1_ids[b, t]])
    kl, top1, full = kls / n, top1s / n, fulls / n
    return kl + hard_top1 * top1 + hard_full * full, kl, top1, full


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    B, L, C, V = 2, 3, 5, 11
    student = torch.randn(B, L, C, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, L, C, generator=g, dtype=torch.float64) * 2
    full = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    ids = torch.randint(V, (B, L), generator=g)
    return student, teacher, full, ids


def test_matches_loop_reference(case):
    student, teacher, full, ids = case
    out = kd_loss(
        student, teacher, temperature=1.7, hard_top1=0.3, hard_full=0.5, student_full_logits=full, teacher_top1_ids=ids
    )
    ref = _reference(student.numpy(), teacher.numpy(), 1.7, 0.3, 0.5, full.numpy(), ids.numpy())
    got = [float(out[k]) for k in ("loss", "kl", "top1", "full")]
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_defaults_and_no_full_term(case):
    student, teacher, _, _ = case
    out = kd_loss(student, teacher)
    ref = _reference(student.numpy(), teacher.numpy(), 2.0, 0.2, 5e-5)
    np.testing.assert_allclose(float(out["loss"]), ref[0], rtol=1e-10)
    assert float(out["full"]) == 0.0
    assert kd_loss(teacher, teacher, hard_top1=0.0)["loss"].abs() < 1e-12


def test_mask(case):
    student, teacher, full, ids = case
    mask = torch.tensor([[True, False, True], [False, False, True]])
    out = kd_loss(
        student,
        teacher,
        temperature=2.0,
        hard_top1=0.2,
        hard_full=0.1,
        student_full_logits=full,
        teacher_top1_ids=ids,
        mask=mask,
    )
    ref = _reference(student.numpy(), teacher.numpy(), 2.0, 0.2, 0.1, full.numpy(), ids.numpy(), mask.numpy())
    np.testing.assert_allclose(float(out["loss"]), ref[0], rtol=1e-10)
    # Masked positions do not matter at all.
    changed = student.clone()
    changed[~mask] += 100.0
    out2 = kd_loss(changed, teacher, hard_full=0.1, student_full_logits=full, teacher_top1_ids=ids, mask=mask)
    assert float(out2["loss"]) == pytest.approx(float(out["loss"]), rel=1e-12)
    empty = kd_loss(student, teacher, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert float(empty["loss"]) == 0.0


def test_float16_teacher_is_upcast():
    student = torch.randn(1, 2, 4)
    teacher = torch.randn(1, 2, 4).half()
    out = kd_loss(student, teacher)
    ref = kd_loss(student, teacher.float())
    assert out["loss"].dtype == torch.float32
    assert float(out["loss"]) == float(ref["loss"])


def test_candidate_logits_match_full_head():
    g = torch.Generator().manual_seed(1)
    B, L, H, V, C = 2, 4, 6, 13, 5
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    ids = torch.randint(V, (B, L, C), generator=g)
    full = hidden @ weight.T + bias
    got = candidate_logits(hidden, weight, ids, bias)
    torch.testing.assert_close(got, full.gather(-1, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(candidate_logits(hidden, weight, ids), (hidden @ weight.T).gather(-1, ids))


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    B, L, H, V, C = 1, 2, 3, 7, 4
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(V, generator=g)[:C] for _ in range(B * L)]).view(B, L, C)
    teacher = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    top1 = ids[..., 0]
    mask = torch.tensor([[True, False]])

    def f(h, w):
        cand = candidate_logits(h, w, ids)
        return kd_loss(
            cand, teacher, hard_top1=0.3, hard_full=0.5, student_full_logits=h @ w.T, teacher_top1_ids=top1, mask=mask
        )["loss"]

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_bad_shapes():
    with pytest.raises(ValueError, match="candidates"):
        kd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="teacher_top1_ids"):
        kd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), student_full_logits=torch.zeros(1, 2, 9))
    with pytest.raises(ValueError, match="lm_head_weight"):
        candidate_logits(torch.zeros(1, 2, 3), torch.zeros(5, 4), torch.zeros(1, 2, 2, dtype=torch.long))


def test_candidate_logits_keep_no_gathered_rows_for_backward():
    """Only hidden, the head weight (a parameter, not a copy) and the ids are kept, not the (B, T, C, H) rows."""
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    weight, ids = torch.randn(50, 16), torch.randint(50, (2, 5, 12))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        candidate_logits(hidden, weight, ids).sum().backward()
    assert (2, 5, 12, 16) not in saved
    torch.testing.assert_close(hidden.grad, weight[ids].sum(2))


def test_candidate_logits_in_chunks_match_plain_autograd(monkeypatch):
    """Positions in chunks of 3 (a gather budget of 3 positions): the same logits and gradients as autograd's
    einsum over the whole gathered (B, T, C, H) tensor."""
    import qatkit.lm.kd_loss as kd

    g = torch.Generator().manual_seed(3)
    B, L, H, V, C = 2, 5, 4, 11, 6
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(V, (B, L, C), generator=g)
    upstream = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    want = torch.einsum("bth,btch->btc", hidden, weight[ids])
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    monkeypatch.setattr(kd, "GATHER_ELEMENTS", 3 * C * H)
    assert len(kd._chunks(ids.reshape(-1, C), H)) == 4  # 10 positions: 3 + 3 + 3 + 1
    got = candidate_logits(hidden, weight, ids)
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
