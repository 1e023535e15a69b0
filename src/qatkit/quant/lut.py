"""Look-up-table (LUT) quantization: each group of values is replaced by the nearest of 2^bits table entries.

Tables are per group (one row of ``values`` per group); indices come from the nearest entry, with a
straight-through gradient to the values and the gather's gradient to the table. ``ste_fp16`` rounds to
FP16 in the forward pass only, so training sees the numbers an FP16 device (Apple's Neural Engine) will use.
"""

from __future__ import annotations

import numpy as np
import torch


def _check_groups(values: torch.Tensor, lut: torch.Tensor) -> None:
    if values.dim() != 2 or lut.dim() != 2 or values.shape[0] != lut.shape[0]:
        raise ValueError(f"values (groups, n) and lut (groups, entries) disagree: {tuple(values.shape)} vs "
                         f"{tuple(lut.shape)}")  # fmt: skip


def nearest_index(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for every value: (G, n) values, (G, E) table -> (G, n) int64.

    Uses midpoints of the sorted table (memory O(G·n), not O(G·n·E)); works for unsorted tables too.
    """
    _check_groups(values, lut)
    sorted_lut, order = lut.sort(dim=1)
    mids = (sorted_lut[:, 1:] + sorted_lut[:, :-1]) / 2
    pos = torch.searchsorted(mids.contiguous(), values.contiguous())
    return order.gather(1, pos)


def lut_fake_quantize(values: torch.Tensor, lut: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """``lut[nearest(values)]`` (or ``lut[index]`` when given) with a straight-through gradient to ``values``."""
    if index is None:
        index = nearest_index(values.detach(), lut.detach())
    q = lut.gather(1, index)
    return q + (values - values.detach())


def kmeans_lut(
    values: torch.Tensor, entries: int, iters: int = 25, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """A sorted table of ``entries`` values per group by weighted 1-D k-means (Lloyd), initialised at quantiles.

    ``weights`` (same shape as values) make some values count more: with ``|w|`` weighting the largest weights
    keep their magnitude instead of being pulled inwards by the many small ones.
    """
    if entries < 2:
        raise ValueError(f"a LUT needs at least 2 entries, got {entries}")
    v = values.detach().float()
    w = torch.ones_like(v) if weights is None else weights.detach().float().clamp_min(0) + 1e-12
    qs = torch.linspace(0, 1, entries + 2, device=v.device)[1:-1]
    sample = v if v.shape[1] <= 1 << 20 else v[:, torch.randperm(v.shape[1], device=v.device)[: 1 << 20]]
    centers = torch.quantile(sample, qs, dim=1).T.contiguous()  # (G, E)
    for _ in range(iters):
        idx = nearest_index(v, centers)
        sums = torch.zeros_like(centers).scatter_add_(1, idx, v * w)
        mass = torch.zeros_like(centers).scatter_add_(1, idx, w)
        new = torch.where(mass > 0, sums / mass.clamp_min(1e-30), centers)
        if torch.allclose(new, centers):
            break
        centers = new
    return centers.sort(dim=1).values.to(values.dtype)


def _optimal_1d_kmeans(v: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Exact weighted 1-D k-means of a few points (clusters are contiguous in sorted order: dynamic programming)."""
    order = np.argsort(v)
    v, w = v[order].astype(np.float64), w[order].astype(np.float64) + 1e-12
    n = len(v)
    cw, cwv, cwv2 = (np.concatenate([[0.0], np.cumsum(t)]) for t in (w, w * v, w * v * v))

    def cost(i: int, j: int) -> float:  # weighted SSE of points i..j-1 around their mean
        m = cw[j] - cw[i]
        return cwv2[j] - cwv2[i] - (cwv[j] - cwv[i]) ** 2 / m

    best = np.full((k + 1, n + 1), np.inf)
    cut = np.zeros((k + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            options = [best[c - 1, i] + cost(i, j) for i in range(c - 1, j)]
            i = int(np.argmin(options))
            best[c, j], cut[c, j] = options[i], i + c - 1
    centers, j = [], n
    for c in range(k, 0, -1):
        i = cut[c, j]
        centers.append((cwv[j] - cwv[i]) / (cw[j] - cw[i]))
        j = i
    return np.array(centers[::-1])


def reduce_lut(lut: torch.Tensor, counts: torch.Tensor, entries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster a (G, E) table to (G, entries), each old entry weighted by its use count; also the old->new map.

    This is the Q4->Q2 step (16 -> 4 entries): the clustering is the exact weighted optimum, found by dynamic
    programming over the sorted entries. New indices are ``mapping.gather(1, old_index)``.
    """
    if entries >= lut.shape[1]:
        raise ValueError(f"reduce_lut needs fewer entries than {lut.shape[1]}, got {entries}")
    v, w = lut.detach().double().cpu().numpy(), counts.detach().double().cpu().numpy()
    new = torch.tensor(np.stack([_optimal_1d_kmeans(v[g], w[g], entries) for g in range(len(v))]), dtype=lut.dtype)
    new = new.to(lut.device)
    return new, nearest_index(lut.detach(), new)


def ste_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to FP16 in the forward pass, identity gradient (training sees the device's FP16 numbers)."""
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()
