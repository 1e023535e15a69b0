"""A LUT linear layer's forward and backward in one autograd function that saves one byte per weight.

``y = x @ (lut[index] ⊙ (A @ B)).T + bias`` built by autograd keeps the scale product, the codes, the int64
indices and the materialised weight of every layer for the backward pass (~24 bytes per weight: 2.5 GB for
SmolLM2-135M). Here the backward recomputes them from the inputs, A, B, the table and the indices kept as
uint8, one layer at a time. Gradients are the straight-through ones of :func:`qatkit.quant.lut.lut_fake_quantize`
with the normalisation ``W / (A @ B)`` detached: latent weight ``dL/dW_eff``, scales ``dL/dW_eff ⊙ Q`` through
``A @ B``, table entries the sum of ``dL/dW_eff ⊙ (A @ B)`` over the weights that use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qatkit.quant.lut import nearest_index


class _LUTLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lut, a, b, bias, index):  # noqa: ANN001 - autograd's signature
        scale = a @ b
        ctx.latent = index is None
        if index is None:  # latent weight: nearest entry to W / (A @ B)
            index = nearest_index((weight / scale).reshape(lut.shape[0], -1), lut).to(torch.uint8)
        codes = lut.gather(1, index.reshape(lut.shape[0], -1).long()).reshape(scale.shape)
        ctx.save_for_backward(x, lut, a, b, index)
        ctx.has_bias = bias is not None
        return F.linear(x, codes * scale, bias)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001
        x, lut, a, b, index = ctx.saved_tensors
        scale = a @ b
        idx = index.reshape(lut.shape[0], -1).long()
        codes = lut.gather(1, idx).reshape(scale.shape)
        need = ctx.needs_input_grad
        grad_x = grad_y @ (codes * scale) if need[0] else None
        g = grad_y.reshape(-1, grad_y.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # dL/dW_eff (out, in)
        grad_w = g if need[1] and ctx.latent else None  # frozen indices: W is unused
        grad_lut = (
            torch.zeros_like(lut).scatter_add_(1, idx, (g * scale).reshape(lut.shape[0], -1)) if need[2] else None
        )
        g_ab = g * codes if need[3] or need[4] else None
        grad_a = g_ab @ b.T if need[3] else None
        grad_b = a.T @ g_ab if need[4] else None
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and need[5] else None
        return grad_x, grad_w, grad_lut, grad_a, grad_b, grad_bias, None


def lut_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lut: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (lut[idx] ⊙ (a @ b)).T + bias`` with idx = ``index`` (uint8, frozen) or the nearest table entry to
    ``weight / (a @ b)`` per group of rows (``lut`` is (groups, entries)); saves x and uint8 indices only."""
    if lut.shape[1] > 256:
        raise ValueError(f"a table of {lut.shape[1]} entries does not fit uint8 indices")
    return _LUTLinear.apply(x, weight, lut, a, b, bias, index)
