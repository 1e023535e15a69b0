"""Quantized Linear / Conv1d / Conv2d: the float module's own parameters plus weight and input quantizers.

A wrapper is made from a float module and shares its Parameter objects (no copy), keeps its name and
state_dict keys (``fc1.weight`` stays ``fc1.weight``), and converts back with :meth:`QuantModule.to_float`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qatkit.nn.fake_quantizer import FakeQuantizer
from qatkit.quant.spec import QuantSpec


def _clone_module_dict(src: nn.Module) -> dict:
    """Shallow copy of a module's ``__dict__`` with its own containers (same Parameter objects)."""
    return {k: (v.copy() if isinstance(v, dict) else v) for k, v in src.__dict__.items()}


class QuantModule:
    """Mixin for wrappers: optional ``weight_quant``, ``input_quant`` and ``output_quant`` around the float op.

    An output quantizer is for a layer whose output feeds no other quantized layer (a conv before pooling):
    it gives the exported graph the Q node that ONNX Runtime needs to run that layer as an int8 kernel.
    ``fused_bounds`` is an activation absorbed into the layer, as ``(min, max)`` bounds: ``(0, inf)`` a ReLU,
    ``(0, 6)`` a ReLU6, else a Hardtanh; it is applied before the output quantizer, so the output is quantized
    after the activation, as integer kernels compute it (None: nothing absorbed). ``fused_relu`` names the
    absorbed module (replaced by Identity; :func:`qatkit.transform.prepare.unprepare` puts it back), or is None
    when the activation was a function call (``F.relu``), left in the model: applying it twice changes nothing.
    """

    float_type: type[nn.Module]
    weight_quant: FakeQuantizer | None
    input_quant: FakeQuantizer | None
    output_quant: FakeQuantizer | None
    fused_relu: str | None = None
    fused_bounds: tuple[float, float] | None = None

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        activation: QuantSpec | None,
        output: QuantSpec | None = None,
    ) -> QuantModule:
        """Wrap ``module`` (sharing its parameters); ``None`` leaves that tensor in float."""
        q = cls.__new__(cls)
        q.__dict__ = _clone_module_dict(module)
        wq = FakeQuantizer(weight, tuple(module.weight.shape)) if weight is not None else None
        nn.Module.__setattr__(q, "weight_quant", wq)
        nn.Module.__setattr__(q, "input_quant", FakeQuantizer(activation) if activation is not None else None)
        nn.Module.__setattr__(q, "output_quant", FakeQuantizer(output) if output is not None else None)
        return q

    def to_float(self) -> nn.Module:
        """The plain float module with the same (possibly trained) parameters."""
        f = self.float_type.__new__(self.float_type)
        f.__dict__ = _clone_module_dict(self)
        for key in QUANTIZER_ATTRS:
            f._modules.pop(key, None)
        for key in ("fused_relu", "fused_bounds"):
            f.__dict__.pop(key, None)
        return f

    def quantizers(self) -> list[FakeQuantizer]:
        return [q for q in (self.weight_quant, self.input_quant, self.output_quant) if q is not None]

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quant(x) if self.input_quant is not None else x

    def fused_activation(self) -> tuple[float, float] | None:
        """The ``(min, max)`` bounds of the absorbed activation, or None (a wrapper from before ``fused_bounds``
        existed that names a ``fused_relu`` absorbed a ReLU)."""
        if self.fused_bounds is not None:
            return self.fused_bounds
        return RELU_BOUNDS if self.fused_relu is not None else None

    def quant_output(self, y: torch.Tensor) -> torch.Tensor:
        bounds = self.fused_activation()
        if bounds is not None:
            y = F.relu(y) if bounds == RELU_BOUNDS else torch.clamp(y, bounds[0], bounds[1])
        return self.output_quant(y) if self.output_quant is not None else y

    def quant_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight) if self.weight_quant is not None else self.weight


class QuantLinear(QuantModule, nn.Linear):
    float_type = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_output(F.linear(self.quant_input(x), self.quant_weight(), self.bias))


class QuantConv1d(QuantModule, nn.Conv1d):
    float_type = nn.Conv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_output(self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias))


class QuantConv2d(QuantModule, nn.Conv2d):
    float_type = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_output(self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias))


RELU_BOUNDS: tuple[float, float] = (0.0, math.inf)
"""``fused_bounds`` of an absorbed ReLU."""


def activation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The ``(min, max)`` clamp an nn.ReLU / nn.ReLU6 / nn.Hardtanh computes (exact types), else None."""
    if type(module) is nn.ReLU:
        return RELU_BOUNDS
    if type(module) in (nn.ReLU6, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    return None


def activation_module(bounds: tuple[float, float]) -> nn.Module:
    """The module that computes the clamp ``bounds``: nn.ReLU, nn.ReLU6 or nn.Hardtanh (the inverse of
    :func:`activation_bounds`, except that a Hardtanh(0, 6) comes back as the identical nn.ReLU6)."""
    if bounds == RELU_BOUNDS:
        return nn.ReLU()
    if bounds == (0.0, 6.0):
        return nn.ReLU6()
    return nn.Hardtanh(bounds[0], bounds[1])


QUANTIZER_ATTRS = ("weight_quant", "input_quant", "output_quant")
"""Attribute names under which wrappers hold their quantizers (and so their state_dict key segments)."""

QUANT_MODULES: dict[type[nn.Module], type[QuantModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
}
"""Float type -> wrapper. Exact type match: subclasses (e.g. attention's out_proj) are not swapped silently."""

REPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Types every layer report lists, quantized or not."""


def register_quant_module(float_type: type[nn.Module], quant_type: type[QuantModule]) -> None:
    """Teach :func:`qatkit.transform.prepare` to wrap another float layer type."""
    QUANT_MODULES[float_type] = quant_type


def iter_quantizers(model: nn.Module):
    """Yield (qualified name, FakeQuantizer) for every quantizer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            yield name, m
