"""Turn fake-quantized wrappers into explicit QuantizeLinear/DequantizeLinear graphs for export.

Weights become integer initializers (int8 storage, any 2-8 bit grid) plus a dequantize; layer inputs get a
quantize/dequantize pair with constant scale and zero point. ONNX Runtime fuses DQ -> MatMul/Conv -> Q into
int8 kernels. Per-group weights are stored one group per row and dequantized per row, then reshaped: they
stay int8 on disk but the matmul runs in float (ONNX has no blocked Q/DQ before opset 21).

``signed=True`` is the LiteRT flavour: every grid is stored as int8 (an unsigned grid shifts its zero point
by -128, which changes no value) and weights stay float behind a quantize/dequantize pair, the form the LiteRT
converter folds into int8 tensors. ``codes=True`` keeps the weights as int8 codes behind a dequantize even then
(the form ExecuTorch's XNNPACK partitioner takes; a float copy would be stored in the file unused).
"""

from __future__ import annotations

import copy

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from qatkit.nn.fake_quantizer import FakeQuantizer
from qatkit.nn.modules import RELU_BOUNDS, QuantConv1d, QuantConv2d, QuantLinear, QuantModule
from qatkit.quant.affine import quantize_to_int

qd = torch.ops.quantized_decomposed


class QDQWeight(nn.Module):
    """Integer weight codes plus what it takes to dequantize them in the graph (``signed``: see module doc)."""

    def __init__(self, weight: torch.Tensor, fq: FakeQuantizer, signed: bool = False, codes: bool = False):
        super().__init__()
        spec = fq.spec
        self.requantize = signed and not codes
        if fq.observing:  # tracked ranges are refreshed on each forward: the last step's may be stale
            fq.update_range(weight)
        self.qmin, self.qmax, self.ch_axis, self.group = spec.qmin, spec.qmax, fq.ch_axis, fq.group_size
        self.dtype = torch.uint8 if spec.qmin >= 0 else torch.int8
        codes = quantize_to_int(
            weight.detach(), fq.scale.detach(), fq.zero_point, spec.qmin, spec.qmax, fq.ch_axis, fq.group_size
        )
        zero_point = fq.zero_point.detach().clone().to(torch.int64)
        if signed:
            if self.group:
                raise ValueError("LiteRT int8 export does not support per-group weight scales")
            if self.dtype == torch.uint8:
                codes, zero_point = codes - 128, zero_point - 128
                self.qmin, self.qmax, self.dtype = self.qmin - 128, self.qmax - 128, torch.int8
        if self.group:  # one row per group, so a per-row DequantizeLinear does per-group scaling
            codes = codes.reshape(-1, self.group)
        self.register_buffer("codes", codes.to(self.dtype))
        self.register_buffer("scale", fq.scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point)
        self.tensor_qparams = (float(self.scale.reshape(-1)[0]), int(self.zero_point.reshape(-1)[0]))
        self.shape = tuple(weight.shape)
        if self.requantize:  # float values on the grid, re-quantized in the graph (exact: they are already on it)
            self.register_buffer("values", self._dequantize(self.codes))

    def forward(self) -> torch.Tensor:
        if not self.requantize:
            return self._dequantize(self.codes)
        if self.ch_axis is None:
            s, zp = self.tensor_qparams
            q = qd.quantize_per_tensor(self.values, s, zp, self.qmin, self.qmax, self.dtype)
        else:
            q = qd.quantize_per_channel(
                self.values, self.scale, self.zero_point, self.ch_axis, self.qmin, self.qmax, self.dtype
            )
        return self._dequantize(q)

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        if self.group:
            rows = qd.dequantize_per_channel(codes, self.scale, self.zero_point, 0, self.qmin, self.qmax, self.dtype)
            return rows.reshape(self.shape)
        if self.ch_axis is None:
            s, zp = self.tensor_qparams
            return qd.dequantize_per_tensor(codes, s, zp, self.qmin, self.qmax, self.dtype)
        return qd.dequantize_per_channel(
            codes, self.scale, self.zero_point, self.ch_axis, self.qmin, self.qmax, self.dtype
        )


class QDQInput(nn.Module):
    """Quantize-dequantize of a layer input with constants (uint8 for unsigned grids, int8 for signed)."""

    def __init__(self, fq: FakeQuantizer, signed: bool = False):
        super().__init__()
        spec = fq.spec
        self.scale = float(fq.scale.detach().reshape(-1)[0])
        self.zero_point = int(fq.zero_point.reshape(-1)[0])
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.dtype = torch.uint8 if spec.qmin >= 0 else torch.int8
        if signed and self.dtype == torch.uint8:
            self.qmin, self.qmax, self.zero_point, self.dtype = (
                self.qmin - 128,
                self.qmax - 128,
                self.zero_point - 128,
                torch.int8,
            )
        full = (0, 255) if self.dtype == torch.uint8 else (-128, 127)
        narrower = (self.qmin, self.qmax) != full
        self.clamp = (
            ((self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale)
            if narrower
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clamp is not None:  # grids narrower than the 8-bit storage type: ONNX Q saturates at 8 bits
            x = torch.clamp(x, self.clamp[0], self.clamp[1])
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)


class QDQLayer(nn.Module):
    """A Linear or Conv layer in Q/DQ form: quantized input, integer weight, float bias, quantized output if asked."""

    def __init__(self, wrapper: QuantModule, signed: bool = False, codes: bool = False):
        super().__init__()
        self.input_qdq = QDQInput(wrapper.input_quant, signed) if wrapper.input_quant is not None else None
        self.output_qdq = QDQInput(wrapper.output_quant, signed) if wrapper.output_quant is not None else None
        if wrapper.weight_quant is not None:
            self.weight_qdq = QDQWeight(wrapper.weight, wrapper.weight_quant, signed, codes)
        else:
            self.register_buffer("float_weight", wrapper.weight.detach().clone())
        self.bias = None if wrapper.bias is None else nn.Parameter(wrapper.bias.detach().clone(), requires_grad=False)
        self.op = _layer_fn(wrapper)
        self.bounds = wrapper.fused_activation()
        if self.bounds not in (None, RELU_BOUNDS) and not _clamp_matters(self.bounds, self.output_qdq):
            self.bounds = None  # the output Q saturates where the clamp would: a Clip would only block fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        w = self.weight_qdq() if hasattr(self, "weight_qdq") else self.float_weight
        y = self.op(x, w, self.bias)
        if self.bounds == RELU_BOUNDS:  # Relu -> Q: ONNX Runtime and LiteRT fuse it into the integer kernel
            y = F.relu(y)
        elif self.bounds is not None:  # ReLU6 / Hardtanh: Clip (-> Q: dropped when Q's range lies within it)
            y = torch.clamp(y, self.bounds[0], self.bounds[1])
        return self.output_qdq(y) if self.output_qdq is not None else y


def _clamp_matters(bounds: tuple[float, float], q: QDQInput | None) -> bool:
    """Whether clamping to ``bounds`` before the quantize-dequantize ``q`` can change its result. It cannot when
    q's grid reaches less than half a step beyond the bounds (then q saturates exactly where the clamp would),
    as with an output quantizer calibrated on the clamped values. Leaving such a Clip out keeps the graph
    fusable whatever the runtime: ONNX Runtime 1.32 drops it by the same half-step test, older releases only
    when the Q range lies inside the Clip's (a saturating Hardtanh range misses that by up to half a step), and
    LiteRT has no fused activation for arbitrary Hardtanh bounds."""
    if q is None:
        return True
    lower, upper = (q.qmin - q.zero_point) * q.scale, (q.qmax - q.zero_point) * q.scale
    margin = 0.49 * q.scale  # (not 0.5: a value exactly between two steps may round either way)
    return lower < bounds[0] - margin or upper > bounds[1] + margin


def _layer_fn(m: QuantModule):
    """The functional form of a wrapper's float op with its hyper-parameters bound."""
    if isinstance(m, QuantLinear):
        return F.linear
    if isinstance(m, (QuantConv1d, QuantConv2d)):
        if m.padding_mode != "zeros":
            raise ValueError(f"export supports padding_mode='zeros' only, got {m.padding_mode!r}")
        conv = F.conv1d if isinstance(m, QuantConv1d) else F.conv2d
        stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups

        def op(x, w, b):
            return conv(x, w, b, stride, padding, dilation, groups)

        return op
    raise TypeError(f"no Q/DQ export for {type(m).__name__}")


def require_int8_weights(model: nn.Module, what: str) -> None:
    """Refuse quantized weights an int8 runtime cannot hold on their own grid: asymmetric ones (a non-zero
    weight zero point; XNNPACK runs them silently wrong) and per-group scales."""
    for name, m in model.named_modules():
        if isinstance(m, QuantModule) and m.weight_quant is not None:
            if not m.weight_quant.spec.symmetric:
                raise ValueError(f"{what} needs symmetric weight quantization; layer {name!r} is asymmetric")
            if m.weight_quant.group_size:
                raise ValueError(f"{what} does not support per-group weight scales (layer {name!r})")


def to_qdq(model: nn.Module, signed: bool = False, codes: bool = False) -> nn.Module:
    """A copy of ``model`` with every quantized wrapper replaced by its Q/DQ form (eval mode); ``signed``: the
    LiteRT flavour, ``codes``: with int8 weight codes (see the module docstring)."""
    out = copy.deepcopy(model).eval()
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantModule):
            out.set_submodule(name, QDQLayer(m, signed, codes))
    return out
