"""Knowledge-distillation loss against cached teacher candidates (top-K ids first, then sampled negatives).

Pure torch: the student's logits are computed at the candidate ids only, so the full-vocabulary head is optional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def candidate_logits(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Student logits (B, T, C) at candidate ``ids`` (B, T, C) from hidden states (B, T, H) and head weight (V, H)."""
    if hidden.ndim != 3 or ids.ndim != 3 or ids.shape[:2] != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (B, T, H) and ids (B, T, C), got {tuple(hidden.shape)} and {tuple(ids.shape)}"
        )
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"lm_head_weight must be (V, {hidden.shape[2]}), got {tuple(lm_head_weight.shape)}")
    ids = ids.long()
    out = _CandidateLogits.apply(hidden, lm_head_weight, ids)
    return out if bias is None else out + bias[ids]


GATHER_ELEMENTS = 2**23
"""At most this many gathered head-weight elements (32 MB in FP32) exist at once: positions go in chunks."""


def _chunks(ids: torch.Tensor, hidden_size: int) -> list[slice]:
    """Slices of the flattened positions so that each chunk gathers at most GATHER_ELEMENTS weight elements."""
    n, c = ids.shape[0], ids.shape[1]
    step = max(1, GATHER_ELEMENTS // max(c * hidden_size, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _CandidateLogits(torch.autograd.Function):
    """``einsum(hidden, W[ids])`` that keeps only ``ids`` for the backward pass and gathers ``W[ids]`` again
    there, a chunk of positions at a time: autograd would keep the (B, T, C, H) gathered rows, 286 MB at
    SmolLM2's batch 8 x 128 x 128, and even gathering them all at once is a spike of that size."""

    @staticmethod
    def forward(ctx, hidden, weight, ids):  # noqa: ANN001 - autograd's signature
        ctx.save_for_backward(hidden, weight, ids)
        h, i = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1, ids.shape[-1])
        out = hidden.new_empty(i.shape)
        for s in _chunks(i, h.shape[1]):
            out[s] = torch.einsum("nh,nch->nc", h[s], weight[i[s]])
        return out.reshape(ids.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        hidden, weight, ids = ctx.saved_tensors
        h, i, g = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1, ids.shape[-1]), grad.reshape(-1, ids.shape[-1])
        grad_hidden = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in _chunks(i, h.shape[1]):
            if grad_hidden is not None:
                grad_hidden[s] = torch.einsum("nc,nch->nh", g[s], weight[i[s]])
            if grad_weight is not None:  # a trained head: each candidate's row gets grad * hidden
                rows = (g[s].unsqueeze(-1) * h[s].unsqueeze(1)).reshape(-1, h.shape[-1])
                grad_weight.index_add_(0, i[s].reshape(-1), rows)
        return None if grad_hidden is None else grad_hidden.reshape(hidden.shape), grad_weight, None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def candidate_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position over the candidate ids (both softmaxed over them) at ``temperature``."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kd_loss(
    student_cand: torch.Tensor,
    teacher_cand: torch.Tensor,
    *,
    temperature: float = 2.0,
    hard_top1: float = 0.2,
    hard_full: float = 5e-5,
    student_full_logits: torch.Tensor | None = None,
    teacher_top1_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """KD loss over candidates: T^2 * KL(teacher || student) + hard_top1 * CE(column 0) + hard_full * full-vocab CE.

    Terms are averaged over the unmasked positions. Returns ``loss`` (with grad) and detached ``kl``, ``top1``, ``full``.
    """
    if student_cand.shape != teacher_cand.shape or student_cand.ndim != 3:
        raise ValueError(
            f"student and teacher candidates must both be (B, T, C), got {tuple(student_cand.shape)} "
            f"and {tuple(teacher_cand.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mask is not None and mask.shape != student_cand.shape[:2]:
        raise ValueError(f"mask must be (B, T) = {tuple(student_cand.shape[:2])}, got {tuple(mask.shape)}")
    dtype = torch.promote_types(student_cand.dtype, torch.float32)
    student = student_cand.to(dtype)
    teacher = teacher_cand.to(dtype)
    kl = _masked_mean(candidate_kl(student, teacher, temperature), mask) * temperature**2
    top1 = _masked_mean(-F.log_softmax(student, dim=-1)[..., 0], mask)
    full = torch.zeros((), dtype=dtype, device=student.device)
    if hard_full > 0 and student_full_logits is not None:
        if teacher_top1_ids is None:
            raise ValueError("the full-vocabulary term needs teacher_top1_ids (B, T) along with student_full_logits")
        full_logits = student_full_logits.to(dtype)
        ce = F.cross_entropy(full_logits.flatten(0, 1), teacher_top1_ids.long().flatten(), reduction="none")
        full = _masked_mean(ce.view(student.shape[:2]), mask)
    loss = kl + hard_top1 * top1 + hard_full * full
    return {"loss": loss, "kl": kl.detach(), "top1": top1.detach(), "full": full.detach()}
