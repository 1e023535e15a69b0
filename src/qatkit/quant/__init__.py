"""Pure quantizer math: functions on tensors, no modules and no recipes."""

from qatkit.quant.affine import (
    dequantize_int,
    fake_quantize,
    lsq_fake_quantize,
    lsq_grad_factor,
    qparams_from_range,
    quantize_to_int,
)
from qatkit.quant.observers import OBSERVERS, observe
from qatkit.quant.spec import QuantSpec, qrange

__all__ = [
    "OBSERVERS",
    "QuantSpec",
    "dequantize_int",
    "fake_quantize",
    "lsq_fake_quantize",
    "lsq_grad_factor",
    "observe",
    "qparams_from_range",
    "qrange",
    "quantize_to_int",
]
