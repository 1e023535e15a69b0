"""Fold BatchNorm into the convolution before it, so exported int8 convolutions fuse in the runtime.

A BatchNorm left between a quantized Conv and its Q node blocks ONNX Runtime's DQ -> Conv -> Q fusion;
folding first (as deployment toolchains do) and quantizing the folded weights avoids that.
"""

from __future__ import annotations

import torch
from torch import nn

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn``'s running statistics and affine terms into ``layer``'s weight and bias, in place."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv)
    beta = bn.bias if bn.affine else torch.zeros_like(inv)
    factor = gamma * inv
    layer.weight.mul_(factor.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a Conv/Linear inside an ``nn.Sequential``; returns their names.

    The BatchNorm is replaced by ``nn.Identity`` so module names (and state_dict keys) of the rest stay put.
    """
    folded = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (_, a), (b_name, b) in zip(children, children[1:], strict=False):
            if any(type(a) is la and type(b) is lb for la, lb in _PAIRS) and b.track_running_stats:
                fold_into(a, b)
                setattr(seq, b_name, nn.Identity())
                folded.append(f"{seq_name}.{b_name}" if seq_name else b_name)
    return folded
