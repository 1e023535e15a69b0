"""Weight-only int8 for LiteRT files, float copies of quantized models, and the form each layer takes in a file.

Weight-only layers go through the same static Q/DQ conversion as ``int8`` files: a weight quantize/dequantize
pair with constant scales and a float input becomes an int8 constant, a DEQUANTIZE op and a float kernel.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import torch
from torch import nn

from qatkit.nn.fake_quantizer import FakeQuantizer
from qatkit.nn.modules import QUANT_MODULES, QuantModule
from qatkit.quant.spec import QuantSpec
from qatkit.transform.prepare import unprepare

WEIGHT_ONLY = QuantSpec(bits=8, granularity="channel", narrow_range=True)
"""Weights of layers the rules left float: per output channel, symmetric int8 in [-127, 127], min-max scales."""

LAYER_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D")
"""LiteRT ops that Linear/Conv layers become (a BATCH_MATMUL of two activations is not a layer)."""

_WEIGHT_PATH_OPS = ("DEQUANTIZE", "RESHAPE", "TRANSPOSE", "EXPAND_DIMS", "SQUEEZE")
"""Ops between a stored weight and its kernel (DEQUANTIZE: weight-only; the rest: layout changes)."""


def _storable(fq: FakeQuantizer | None) -> bool:
    """Whether a LiteRT file can hold the weight on this quantizer's own grid (symmetric, tensor or channel)."""
    return fq is not None and fq.spec.symmetric and fq.spec.granularity in ("tensor", "channel")


def with_int8_weights(model: nn.Module, keep_activations: bool) -> nn.Module:
    """A copy of ``model`` whose float Linear/Conv layers quantize their weights only (:data:`WEIGHT_ONLY`).
    Without ``keep_activations`` the quantized layers lose their activation quantizers too (weight-only
    everywhere), keeping their weight grids, or :data:`WEIGHT_ONLY` on their fake-quantized weights."""
    out = copy.deepcopy(model).eval()
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantModule):
            if keep_activations:
                continue
            m.input_quant = m.output_quant = None
            if not _storable(m.weight_quant):
                _snap(m)
                m.weight_quant = FakeQuantizer(WEIGHT_ONLY, tuple(m.weight.shape))
        elif type(m) in QUANT_MODULES and name:
            out.set_submodule(name, QUANT_MODULES[type(m)].from_float(m, WEIGHT_ONLY, None))
    return out


@torch.no_grad()
def _snap(m: QuantModule) -> None:
    """Put the layer's fake-quantized weight (what it computes with) in place of its float weight."""
    if m.weight_quant is not None:
        m.weight.copy_(m.quant_weight())


def float_copy(model: nn.Module) -> nn.Module:
    """A float copy of a quantized model: plain layers holding the fake-quantized weights (the QAT grid)."""
    out = copy.deepcopy(model).eval()
    for m in out.modules():
        if isinstance(m, QuantModule):
            _snap(m)
    return unprepare(out)


def count_layers(model: nn.Module) -> int:
    """Linear/Conv layers of ``model`` (quantized or not): what a file's layer forms should add up to."""
    return sum(1 for m in model.modules() if isinstance(m, tuple(QUANT_MODULES)))


def layer_forms(interpreter) -> Counter:
    """How a LiteRT file runs each layer: ``int8 kernels`` (integer input), ``int8 weights, float compute``
    (DEQUANTIZE of an int8 constant), ``dynamic int8`` (int8 weights, activations quantized at run time),
    ``fp16 weights, float compute`` or ``float``. Kernels whose weight is not a constant are not layers."""
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    producer = {o: op for op in ops for o in op["outputs"]}
    graph_inputs = {d["index"] for d in interpreter.get_input_details()}
    forms: Counter = Counter()
    for op in ops:
        ins = [i for i in op["inputs"] if i >= 0]
        if op["op_name"] not in LAYER_OPS or len(ins) < 2:
            continue
        w, dequantized = ins[1], False
        while w in producer and producer[w]["op_name"] in _WEIGHT_PATH_OPS:
            dequantized |= producer[w]["op_name"] == "DEQUANTIZE"
            w = next(i for i in producer[w]["inputs"] if i >= 0)
        if w in producer or w in graph_inputs:
            continue
        forms[_form(np.dtype(tensors[ins[0]]["dtype"]), np.dtype(tensors[w]["dtype"]), dequantized)] += 1
    return forms


def _form(x: np.dtype, w: np.dtype, dequantized: bool) -> str:
    if x.kind != "f":
        return "int8 kernels"
    if w == np.float16:
        return "fp16 weights, float compute"
    if w.kind in "iu":
        return "int8 weights, float compute" if dequantized else "dynamic int8"
    return "float"
