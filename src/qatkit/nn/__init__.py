"""Module wrappers: FakeQuantizer and quantized Linear / Conv layers."""

from qatkit.nn.fake_quantizer import FakeQuantizer
from qatkit.nn.modules import (
    QUANT_MODULES,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    QuantModule,
    iter_quantizers,
    register_quant_module,
)

__all__ = [
    "FakeQuantizer",
    "QUANT_MODULES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantModule",
    "iter_quantizers",
    "register_quant_module",
]
