"""Where a quantized layer's output goes, found by tracing the model with torch.fx.

A layer whose output reaches only other quantized layers (directly or through a ReLU / ReLU6 / Hardtanh: the
next layer's input quantizer follows the clamp, and runtimes drop a clamp that cannot change the quantized
values) gets its output quantized by the next layer's input quantizer. Any other consumer — pooling, a residual
add, a reshape, the model's output — sees a float tensor; ONNX Runtime then cannot fuse the layer into an
integer kernel and runs it in float, dequantizing its weight on every call. Quantizing such outputs (as ONNX
Runtime's own static quantization does) lets every quantized layer run as an integer kernel.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qatkit.base.config import RecipeError
from qatkit.nn.modules import RELU_BOUNDS, activation_bounds

FUSED_MODULES = (nn.ReLU, nn.Identity, nn.Dropout)
"""Consumers that are transparent for integer fusion (ReLU fuses into QLinearConv/QGemm; the others vanish).
ReLU6 / Hardtanh modules and ``F.relu6`` / ``F.hardtanh`` calls are too when their bounds hold 0 (see
:func:`clamp_fuses`)."""
FUSED_FUNCTIONS = {F.relu, torch.relu, F.dropout, operator.getitem}
FUSED_METHODS = {"relu"}


def clamp_fuses(bounds: tuple[float, float]) -> bool:
    """Whether a clamp right before a quantizer can vanish in the runtime (a Clip before a Q is dropped when it
    cannot change the quantized values): only if its bounds hold 0, since every activation grid holds 0 (a
    Hardtanh(1, 2) clamps values the grid [0, 2] would keep)."""
    return bounds[0] <= 0.0 <= bounds[1]


class NotTraceable(RecipeError):
    """torch.fx cannot trace the model; ``reason`` is the first line of its error."""

    def __init__(self, reason: str):
        super().__init__(
            f"outputs: where_needed needs a model torch.fx can trace ({reason}); set `output:` on rules instead"
        )
        self.reason = reason


class FusedActivation(NamedTuple):
    """A ReLU / ReLU6 / Hardtanh that alone follows a layer: the layer applies it before its output quantizer."""

    module: str | None
    """The module's qualified name (to replace by Identity), or None for a function call (``F.relu6``), which
    stays in the model: applying the same clamp again changes nothing."""
    bounds: tuple[float, float]
    """(min, max): (0, inf) for a ReLU."""
    label: str
    """What the layer report says: ``ReLU``, ``ReLU6``, ``Hardtanh``, ``relu6()``."""


def _function_bounds(node: fx.Node) -> tuple[float, float] | None:
    """The clamp a call_function / call_method node computes, if it is a ReLU / ReLU6 / Hardtanh with constant
    bounds, else None."""
    if node.op == "call_method":
        return RELU_BOUNDS if node.target == "relu" else None
    if node.op != "call_function":
        return None
    if node.target in (F.relu, torch.relu):
        return RELU_BOUNDS
    if node.target is F.relu6:
        return (0.0, 6.0)
    if node.target is F.hardtanh:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi:
            return float(lo), float(hi)
    return None


def outputs_feeding_float(
    model: nn.Module, layers: set[str], quantize_input: set[str] | None = None
) -> dict[str, FusedActivation | None]:
    """The names in ``layers`` whose output reaches something other than a layer of ``quantize_input`` (the
    layers that quantize their input; default: all of ``layers``), each with the ReLU / ReLU6 / Hardtanh that
    directly and only follows it (to quantize after, as integer kernels do), or None. A layer called more than
    once absorbs nothing. Raises :class:`NotTraceable` if torch.fx cannot trace the model."""
    if not layers:
        return {}
    quantize_input = layers if quantize_input is None else quantize_input

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            # a torch.nn container that holds a quantized layer (nn.TransformerEncoderLayer's linear1) is traced
            # through, not kept whole: otherwise its layers' consumers would never be seen
            holds = any(name.startswith(qualname + ".") for name in layers) if qualname else True
            return qualname in layers or (not holds and super().is_leaf_module(m, qualname))

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable Python
        raise NotTraceable((str(e).strip().splitlines() or [type(e).__name__])[0][:160]) from None
    modules = dict(model.named_modules())

    def only_quantized_consumers(node: fx.Node) -> bool:
        for user in node.users:
            if user.op == "call_module" and user.target in quantize_input:
                continue
            module = modules.get(user.target) if user.op == "call_module" else None
            bounds = (
                (float(module.min_val), float(module.max_val))
                if isinstance(module, nn.Hardtanh)  # (and ReLU6)
                else _function_bounds(user)
            )
            fused = (
                isinstance(module, FUSED_MODULES)
                or (user.op == "call_function" and user.target in FUSED_FUNCTIONS)
                or (user.op == "call_method" and user.target in FUSED_METHODS)
                or (bounds is not None and clamp_fuses(bounds))
            )
            if not (fused and only_quantized_consumers(user)):
                return False
        return True

    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1

    def sole_activation(node: fx.Node, through_dropout: bool = False) -> FusedActivation | None:
        """The ReLU / ReLU6 / Hardtanh that is this node's only consumer (a module called nowhere else, or a
        function call), possibly behind Identity / Dropout modules (e.g. a folded BatchNorm)."""
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_module":
            name = str(user.target)
            module = modules.get(name)
            if isinstance(module, (nn.Identity, nn.Dropout)):
                return sole_activation(user, through_dropout or isinstance(module, nn.Dropout))
            bounds = activation_bounds(module) if calls[name] == 1 else None
            act = None if bounds is None else FusedActivation(name, bounds, type(module).__name__)
        else:
            bounds = _function_bounds(user)
            label = f"{getattr(user.target, '__name__', user.target)}()"
            act = None if bounds is None else FusedActivation(None, bounds, label)
        if act is None or not clamp_fuses(act.bounds):
            return None
        # a ReLU commutes with a (training-mode) Dropout's 1/(1-p) scaling; a clamp moved before it does not
        return None if through_dropout and act.bounds != RELU_BOUNDS else act

    out: dict[str, FusedActivation | None] = {}
    for n in graph.nodes:
        if n.op == "call_module" and n.target in layers and not only_quantized_consumers(n):
            name = str(n.target)
            out[name] = sole_activation(n) if calls[name] == 1 else None
    return out
