"""Affine (scale + zero point) fake quantization on tensors: pure functions, no modules, no config.

Per-tensor and per-channel paths call PyTorch's own fused ops (``torch.fake_quantize_*``), so results are
bit-identical to PyTorch's reference; per-group reuses the per-channel op on a reshaped view. Larger float32
tensors, and every tensor under ``torch.compile`` / ``torch.export``, take the same arithmetic in vectorised
elementwise ops (quant/ops.py ``VectorFakeQuantize``: several times faster, and fusable); learned (LSQ) scales
trace through a custom op around PyTorch's kernels.
"""

from __future__ import annotations

import torch

from qatkit.quant.ops import VectorFakeQuantize, lsq_fake_quantize_op

EPS = torch.finfo(torch.float32).eps

VECTOR_MIN_NUMEL = 8192
"""From this many values up, eager fake quantization of float32 tensors uses the vectorised ops
(:class:`qatkit.quant.ops.VectorFakeQuantize`); below, PyTorch's fused kernel costs less than the extra op calls."""


def qparams_from_range(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [min_val, max_val] (widened to include 0).

    Same arithmetic as ``torch.ao.quantization`` observers: symmetric grids use
    ``max|x| / ((qmax - qmin) / 2)``, asymmetric ones ``(max - min) / (qmax - qmin)``.
    """
    if symmetric:  # max(-min(lo, 0), max(hi, 0)) == max(-lo, hi, 0): the same value in fewer ops
        amax = torch.maximum(torch.neg(min_val), max_val).clamp_(min=0.0)
        scale = torch.clamp(amax / (float(qmax - qmin) / 2), min=EPS)
        zp_value = 0 if qmin < 0 else (qmin + qmax + 1) // 2
        zero_point = torch.full_like(scale, zp_value, dtype=torch.int32)
    else:
        min_neg = torch.clamp(min_val, max=0.0)
        max_pos = torch.clamp(max_val, min=0.0)
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=EPS)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int32)
    return scale.float(), zero_point


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View an (out, ...) tensor as (out * n_groups, group_size): groups run along the flattened input dim."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] % group_size:
        raise ValueError(f"input size {flat.shape[1]} is not a multiple of group_size {group_size}")
    return flat.reshape(-1, group_size)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with straight-through gradients (zero outside the clamp range).

    ``ch_axis=None, group_size=0``: one scale; ``ch_axis=k``: one scale per slice along k;
    ``group_size=g``: ``scale`` holds one value per group as laid out by :func:`group_view`.
    """
    zp = zero_point.to(torch.int32)
    if group_size:
        g = group_view(x, group_size)
        return fake_quantize(g, scale.reshape(-1), zp.reshape(-1), qmin, qmax, 0).reshape(x.shape)
    traced = torch.compiler.is_compiling()  # traced: elementwise ops the compiler fuses into one loop
    if traced or (
        scale.dtype == torch.float32
        and ((x.dtype == torch.float32 and x.numel() >= VECTOR_MIN_NUMEL) or x.dtype in (torch.bfloat16, torch.float16))
    ):  # bf16/fp16 (autocast) always: the same path eager and traced
        if ch_axis is None and not traced:  # eager: bounds as numbers (one zero-point read) clamp faster than tensors
            z = int(zp.reshape(()))
            return VectorFakeQuantize.apply(x, scale.reshape(()), qmin - z, qmax - z)
        s, z = broadcast_param(x, scale, ch_axis, 0), broadcast_param(x, zp.float(), ch_axis, 0)
        return VectorFakeQuantize.apply(x, s, qmin - z, qmax - z)
    if ch_axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zp.reshape(1), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, ch_axis % x.dim(), qmin, qmax)


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
    group_size: int = 0,
    grad_factor: float | None = None,
) -> torch.Tensor:
    """Fake quantization with a learnable step size (LSQ, Esser et al. 2020).

    Uses PyTorch's ``_fake_quantize_learnable_*`` ops; the scale gradient is multiplied by
    ``grad_factor`` (default ``1 / sqrt(numel_per_scale * qmax)`` as in the paper).
    """
    zp = zero_point.to(scale.dtype)
    if group_size:
        g = group_view(x, group_size)
        factor = grad_factor if grad_factor is not None else lsq_grad_factor(group_size, qmax)
        return lsq_fake_quantize(g, scale.reshape(-1), zp.reshape(-1), qmin, qmax, 0, 0, factor).reshape(x.shape)
    if ch_axis is None:
        axis, per_scale, scale, zp = -1, x.numel(), scale.reshape(1), zp.reshape(1)
    else:
        axis = ch_axis % x.dim()
        per_scale = x.numel() // x.shape[axis]
    factor = grad_factor if grad_factor is not None else lsq_grad_factor(per_scale, qmax)
    if torch.compiler.is_compiling():
        return lsq_fake_quantize_op(x, scale, zp, axis, qmin, qmax, factor)
    if axis < 0:
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, qmin, qmax, factor)
    return torch._fake_quantize_learnable_per_channel_affine(x, scale, zp, axis, qmin, qmax, factor)


def lsq_grad_factor(numel_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Q_P), keeping scale updates in step with weight updates."""
    return 1.0 / float(max(numel_per_scale, 1) * max(qmax, 1)) ** 0.5


def quantize_to_int(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """Integer codes q (as int32) such that ``(q - zp) * scale == fake_quantize(x)`` exactly."""
    fq = fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis, group_size)
    s, zp = broadcast_param(x, scale, ch_axis, group_size), broadcast_param(x, zero_point.float(), ch_axis, group_size)
    return torch.clamp(torch.round(fq / s) + zp, qmin, qmax).to(torch.int32)


def clipped_fraction(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
    group_size: int = 0,
) -> float:
    """Share of ``x``'s values that fall outside the representable range and are clipped."""
    s = broadcast_param(x, scale, ch_axis, group_size)
    zp = broadcast_param(x, zero_point.float(), ch_axis, group_size)
    q = torch.round(x / s) + zp
    return float(((q < qmin) | (q > qmax)).float().mean())


def dequantize_int(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    ch_axis: int | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """Float values ``(q - zp) * scale`` for integer codes from :func:`quantize_to_int`."""
    s, zp = broadcast_param(q, scale, ch_axis, group_size), broadcast_param(q, zero_point.float(), ch_axis, group_size)
    return (q.float() - zp) * s


def broadcast_param(x: torch.Tensor, p: torch.Tensor, ch_axis: int | None, group_size: int) -> torch.Tensor:
    """Expand per-tensor / per-channel / per-group parameters to ``x``'s shape."""
    if group_size:
        flat = x.reshape(x.shape[0], -1)
        per_group = p.reshape(x.shape[0], -1, 1).expand(-1, -1, group_size)
        return per_group.reshape(flat.shape).reshape(x.shape)
    if ch_axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis % x.dim()] = -1
    return p.reshape(shape)
