"""Fake-quantize kernels that ``torch.compile`` and ``torch.export`` trace without splitting the graph.

PyTorch's fused fake-quantize ops have no fake-tensor kernel for tensor scales (Dynamo splits the graph there)
and the learnable (LSQ) ones read their scale with ``.item()``. Fixed scales use :class:`VectorFakeQuantize`,
plain elementwise ops the compiler fuses (and faster than the fused ATen kernel in eager mode too); learned
scales use the ``qatkit::lsq_fake_quantize`` custom op, which runs PyTorch's LSQ kernels forward and backward
behind a fake kernel, so compiled training matches eager training bit for bit. ``axis=-1`` means one scale
for the whole tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("qatkit::lsq_fake_quantize", mutates_args=())
def lsq_fake_quantize_op(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int, grad_factor: float
) -> Tensor:
    """Quantize-dequantize ``x`` on a learned scale (and zero point): PyTorch's LSQ kernels."""
    if axis < 0:
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, qmin, qmax, grad_factor)
    return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, qmin, qmax, grad_factor)


@lsq_fake_quantize_op.register_fake
def _lsq_shapes(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int, grad_factor: float):
    return torch.empty_like(x)


def _save_lsq_inputs(ctx, inputs, output) -> None:
    x, scale, zero_point, axis, qmin, qmax, grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (axis, qmin, qmax, grad_factor)


@torch.library.custom_op("qatkit::lsq_fake_quantize_backward", mutates_args=())
def lsq_backward_op(
    grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int, grad_factor: float
) -> list[Tensor]:
    """Gradients of input, scale and zero point: PyTorch's LSQ backward kernels (no fake kernel of their own)."""
    if axis < 0:
        out = torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
            grad, x, scale, zero_point, qmin, qmax, grad_factor
        )
    else:
        out = torch.ops.aten._fake_quantize_learnable_per_channel_affine_backward(
            grad, x, scale, zero_point, axis, qmin, qmax, grad_factor
        )
    return list(out)


@lsq_backward_op.register_fake
def _lsq_backward_shapes(grad, x, scale, zero_point, axis, qmin, qmax, grad_factor):
    return [torch.empty_like(x), torch.empty_like(scale), torch.empty_like(zero_point)]


def _lsq_backward(ctx, grad: Tensor):
    x, scale, zero_point = ctx.saved_tensors
    dx, ds, dz = lsq_backward_op(grad, x, scale, zero_point, *ctx.args)
    return dx, ds, dz, None, None, None, None


lsq_fake_quantize_op.register_autograd(_lsq_backward, setup_context=_save_lsq_inputs)


class VectorFakeQuantize(torch.autograd.Function):
    """ATen's fake-quantize arithmetic in vectorised elementwise ops, for float32 tensors in eager mode.

    PyTorch's fused CPU kernels run one scalar ``nearbyint`` per element (about 5 ns each); these four passes
    compute the same values — ``clamp(round(x * (1 / s)), qmin - zp, qmax - zp) * s`` in float32, rounding half
    to even, which equals ATen's ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` since every term but the
    last is a small integer — several times faster on tensors past a few thousand values. Equal to the ATen ops
    for finite inputs (tested; a zero may carry the opposite sign); an infinite input gives the clamped end,
    where ATen's integer cast is undefined. The backward passes the gradient where the value was not clipped.
    ``scale``, ``low`` and ``high`` (float: ``qmin - zp``, ``qmax - zp``) are shaped to broadcast over ``x``.
    bfloat16 and float16 inputs are quantized in float32 and the result cast back, as PyTorch's kernels do
    (``x * (1 / s)`` in bfloat16 would round before the grid does and move values by a step).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        steps = torch.mul(xf, scale.reciprocal()).round_()
        clamped = torch.clamp(steps, low, high)
        ctx.save_for_backward(clamped == steps)
        return clamped.mul_(scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None
