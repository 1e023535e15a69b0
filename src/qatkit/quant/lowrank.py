"""Low-rank scales for LUT weights: W ≈ Q ⊙ (A @ B), Q = lut[index] (out × in), A (out × r), B (r × in).

"V1" keeps A and B as they are; "V2" stores unit-norm directions and one magnitude per rank,
A = A_dir · diag(g), B = B_dir, so magnitudes can be trained alone (``g-only``). ``lowrank_linear`` runs the
layer three ways with the same result: materialised weight, batched over ranks, or rank by rank (never forming
the out × in scale matrix, as an inference device does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FORWARD_MODES = ("materialize", "batched", "factored")


def _top_singular(m: torch.Tensor, iters: int = 30) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Leading singular triplet of a non-negative matrix by power iteration (vectors stay non-negative)."""
    v = torch.ones(m.shape[1], dtype=m.dtype, device=m.device) / m.shape[1] ** 0.5
    for _ in range(iters):
        u = F.normalize(m @ v, dim=0)
        v = F.normalize(m.T @ u, dim=0)
    return u, float(u @ m @ v), v


def init_scales(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales that start as the best rank-1 fit of |W| (positive everywhere), with room for ``rank - 1`` more.

    The extra ranks get zero columns in A (the function is exactly rank-1 at the start) and rows of B taken from
    the next singular directions of |W|, so their gradients point somewhere useful from step one.
    """
    if rank < 1:
        raise ValueError(f"scale rank must be >= 1, got {rank}")
    m = weight.detach().float().abs()
    u, s, v = _top_singular(m)
    floor = 1e-8 + 1e-3 * float(m.mean())
    a = torch.zeros(m.shape[0], rank)
    b = torch.zeros(rank, m.shape[1])
    a[:, 0] = (u * s**0.5).clamp_min(floor**0.5)
    b[0] = (v * s**0.5).clamp_min(floor**0.5)
    if rank > 1:
        q = min(rank + 2, min(m.shape))
        _, sv, vv = torch.svd_lowrank(m, q=q, niter=2)
        extra = vv.T[1:rank] * sv[1:rank, None].sqrt()
        b[1 : 1 + extra.shape[0]] = extra
    return a.to(weight.dtype), b.to(weight.dtype)


def v1_to_v2(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B) -> (A_dir, B_dir, g) with unit-norm columns/rows and A @ B == A_dir · diag(g) @ B_dir.

    A rank whose A column or B row is zero gets g = 0 and a fixed unit direction (the function is kept).
    """
    na, nb = a.norm(dim=0), b.norm(dim=1)
    unit_a = torch.full_like(a, a.shape[0] ** -0.5)
    unit_b = torch.full_like(b, b.shape[1] ** -0.5)
    a_dir = torch.where(na > 0, a / na.clamp_min(1e-30), unit_a)
    b_dir = torch.where(nb[:, None] > 0, b / nb[:, None].clamp_min(1e-30), unit_b)
    return a_dir, b_dir, na * nb


def v2_factors(a_dir: torch.Tensor, b_dir: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) pair a V2 layer uses: directions re-normalised (so training keeps them unit) times g."""
    return F.normalize(a_dir, dim=0) * g, F.normalize(b_dir, dim=1)


def expand_rank(a: torch.Tensor, b: torch.Tensor, rank: int, generator: torch.Generator | None = None):
    """Grow (A, B) to ``rank`` keeping A @ B exactly: new A columns are zero, new B rows small and random."""
    old = a.shape[1]
    if rank < old:
        raise ValueError(f"cannot expand rank {old} to a smaller rank {rank}")
    scale = float(b.abs().mean()) or 1.0
    new_b = torch.randn(rank - old, b.shape[1], generator=generator, dtype=b.dtype) * scale
    return torch.cat([a, a.new_zeros(a.shape[0], rank - old)], 1), torch.cat([b, new_b.to(b.device)], 0)


def lowrank_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    mode: str = "materialize",
) -> torch.Tensor:
    """``x @ (q ⊙ (a @ b)).T + bias`` computed by ``mode`` (see module docstring)."""
    if mode == "materialize":
        return F.linear(x, q * (a @ b), bias)
    if mode == "batched":  # all ranks at once: (…, r, in) @ q.T -> (…, r, out), weighted by a.T
        y = ((x.unsqueeze(-2) * b) @ q.T * a.T).sum(-2)
    elif mode == "factored":  # rank by rank, y += a[:, r] ⊙ ((x ⊙ b[r]) @ q.T)
        y = x.new_zeros(*x.shape[:-1], q.shape[0])
        for r in range(a.shape[1]):
            y = y + F.linear(x * b[r], q) * a[:, r]
    else:
        raise ValueError(f"forward mode {mode!r} is not one of {', '.join(FORWARD_MODES)}")
    return y if bias is None else y + bias
