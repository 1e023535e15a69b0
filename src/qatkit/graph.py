"""Where a quantized layer's output goes, found by tracing the model with torch.fx.

A layer whose output reaches only other quantized layers (directly or through a ReLU, which integer kernels
fuse) gets its output quantized by the next layer's input quantizer. Any other consumer — pooling, a residual
add, a reshape, the model's output — sees a float tensor; ONNX Runtime then cannot fuse the layer into an
integer kernel and runs it in float, dequantizing its weight on every call. Quantizing such outputs (as ONNX
Runtime's own static quantization does) lets every quantized layer run as an integer kernel.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .config_base import RecipeError

FUSED_MODULES = (nn.ReLU, nn.Identity, nn.Dropout)
"""Consumers that are transparent for integer fusion (ReLU fuses into QLinearConv/QGemm; the others vanish)."""
FUSED_FUNCTIONS = {F.relu, torch.relu, F.dropout, operator.getitem}
FUSED_METHODS = {"relu"}


def outputs_feeding_float(
    model: nn.Module, layers: set[str], quantize_input: set[str] | None = None
) -> dict[str, str | None]:
    """The names in ``layers`` whose output reaches something other than a layer of ``quantize_input`` (the
    layers that quantize their input; default: all of ``layers``), each with the ReLU module that directly and
    only follows it (to quantize after, as integer kernels do), or None. A layer called more than once absorbs
    no ReLU."""
    if not layers:
        return {}
    quantize_input = layers if quantize_input is None else quantize_input

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in layers or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable Python
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RecipeError(
            f"outputs: where_needed needs a model torch.fx can trace ({first}); set `output:` on rules instead"
        ) from None
    modules = dict(model.named_modules())

    def only_quantized_consumers(node: fx.Node) -> bool:
        for user in node.users:
            if user.op == "call_module" and user.target in quantize_input:
                continue
            fused = (
                (user.op == "call_module" and isinstance(modules.get(user.target), FUSED_MODULES))
                or (user.op == "call_function" and user.target in FUSED_FUNCTIONS)
                or (user.op == "call_method" and user.target in FUSED_METHODS)
            )
            if not (fused and only_quantized_consumers(user)):
                return False
        return True

    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1

    def sole_relu(node: fx.Node) -> str | None:
        """The nn.ReLU module that is this node's only consumer and is called nowhere else."""
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        name = str(users[0].target)
        if isinstance(modules.get(name), (nn.Identity, nn.Dropout)):  # e.g. a folded BatchNorm in between
            return sole_relu(users[0])
        return name if isinstance(modules.get(name), nn.ReLU) and calls[name] == 1 else None

    out: dict[str, str | None] = {}
    for n in graph.nodes:
        if n.op == "call_module" and n.target in layers and not only_quantized_consumers(n):
            name = str(n.target)
            out[name] = sole_relu(n) if calls[name] == 1 else None
    return out
