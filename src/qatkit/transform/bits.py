"""Progressive bit-lowering: a training stage may quantize weights on a wider grid than the rules' own (8 -> 4
-> the rules' 2 bits), with each layer's scale re-initialised for the new grid by MSE search on its weights."""

from __future__ import annotations

import torch
from torch import nn

from qatkit.nn.modules import QuantModule
from qatkit.quant.affine import qparams_from_range
from qatkit.quant.observers import mse_range


@torch.no_grad()
def set_weight_bits(model: nn.Module, bits: int | None) -> list[str]:
    """Put every quantized layer's weights on a ``bits`` grid (None: the rules' own width); layers whose grid
    changes get an MSE-searched scale for it. Returns the layers that changed."""
    changed = []
    for name, m in model.named_modules():
        fq = getattr(m, "weight_quant", None) if isinstance(m, QuantModule) else None
        if fq is None or not fq.set_bits(bits):
            continue
        lo, hi = mse_range(m.weight.detach().float(), fq.spec)
        scale, zp = qparams_from_range(lo, hi, fq.spec.qmin, fq.spec.qmax, fq.spec.symmetric)
        fq.scale.data.copy_(scale.reshape(fq.scale.shape))
        fq.zero_point.copy_(zp.reshape(fq.zero_point.shape))
        fq.min_val.copy_(lo.reshape(fq.min_val.shape))
        fq.max_val.copy_(hi.reshape(fq.max_val.shape))
        changed.append(name)
    return changed
