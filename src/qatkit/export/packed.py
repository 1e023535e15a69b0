"""Packed low-bit checkpoint for affine-quantized models: weight codes bit-packed, everything else as trained.

The file is safetensors. Each quantized layer's weight is stored as its integer codes (shifted to start at 0)
packed into bytes at the smallest width of 1/2/4/8 bits that holds the grid; its scale and zero point are the
quantizer's own buffers, kept in the state dict. Loading unpacks the codes to ``(q - zp) * scale`` — the very
values the fake-quant model computes with — and fixes the weight ranges, so outputs match the source model.
The weight quantizers' observed ranges (``min_val``/``max_val``, one float per scale) are not stored: they
only feed the next range update, which a loaded model no longer does, and per-group they would cost more than
the codes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, check_state_fits, load_weights, read_metadata, save_weights
from ..nn.modules import QuantModule
from ..quant.affine import dequantize_int, quantize_to_int
from ..quant.packing import pack_bits, unpack_bits

KIND = "qatkit-packed-affine"


def code_bits(bits: int) -> int:
    """Storage width for a grid of ``bits`` bits: 1, 2, 4 or 8 (packing needs a width that divides a byte)."""
    return next(w for w in (1, 2, 4, 8) if bits <= w)


def _quantized(model: nn.Module) -> dict[str, QuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModule) and m.weight_quant is not None}


@torch.no_grad()
def save_packed(model: nn.Module, path: str | Path, metadata: dict | None = None) -> dict:
    """Write ``model`` (prepared, calibrated or trained) packed; returns sizes measured on the written file."""
    state = {k: v for k, v in model.state_dict().items()}
    layers, weights = {}, 0
    for name, m in _quantized(model).items():
        fq = m.weight_quant
        if bool(fq.observer_on):  # the range the next forward would use
            fq.update_range(m.weight)
        q = quantize_to_int(m.weight, fq.scale, fq.zero_point, fq.spec.qmin, fq.spec.qmax, fq.ch_axis, fq.group_size)
        cb = code_bits(fq.spec.bits)
        del state[f"{name}.weight"], state[f"{name}.weight_quant.min_val"], state[f"{name}.weight_quant.max_val"]
        state[f"{name}.weight_codes"] = pack_bits((q - fq.spec.qmin).to(torch.uint8), cb)
        state[f"{name}.weight_quant.scale"] = fq.scale.detach()
        state[f"{name}.weight_quant.zero_point"] = fq.zero_point.detach()
        layers[name] = {"shape": list(m.weight.shape), "bits": fq.spec.bits, "code_bits": cb, "qmin": fq.spec.qmin,
                       "ch_axis": fq.ch_axis, "group": fq.group_size}  # fmt: skip
        weights += m.weight.numel()
    if not layers:
        raise ValueError("packed export needs a model with quantized weights")
    meta = dict(metadata or {}, kind=KIND, packed_layers=layers)
    path = save_weights(path, state, meta)
    return {"file_bytes": path.stat().st_size, "quantized_weights": weights, "layers": len(layers)}


def load_packed_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full state dict of a packed file, weights unpacked to their dequantized values, and its metadata."""
    meta = read_metadata(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a packed qatkit model (kind {meta.get('kind')!r}, expected {KIND!r})")
    state = load_weights(path)
    for name, info in meta["packed_layers"].items():
        codes = state.pop(f"{name}.weight_codes", None)
        scale, zp = state.get(f"{name}.weight_quant.scale"), state.get(f"{name}.weight_quant.zero_point")
        if codes is None or scale is None or zp is None:
            raise CheckpointError(f"{path}: layer {name!r} is listed but its codes or scales are missing")
        shape = tuple(info["shape"])
        q = unpack_bits(codes, info["code_bits"], shape).to(torch.int32) + info["qmin"]
        state[f"{name}.weight"] = dequantize_int(q, scale, zp, info["ch_axis"], info["group"])
    return state, meta


def apply_packed(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a packed file into ``model`` (built and prepared like the source) and fix its weight ranges."""
    state, _ = load_packed_state(path)
    own = model.state_dict()
    for name in _quantized(model):  # not stored (see the module docstring): keep the model's own
        for k in (f"{name}.weight_quant.min_val", f"{name}.weight_quant.max_val"):
            state.setdefault(k, own[k])
    check_state_fits(path, own, state)
    model.load_state_dict(state)
    for m in _quantized(model).values():
        m.weight_quant.set_observer(False)  # the stored scales are final: do not re-derive them from the weights
    return model.eval()


BUILD_KEYS = ("model", "model_args", "input_shape", "num_classes", "folded", "quant")


def build_info(model_name: str, model_args: dict, input_shape, num_classes: int, folded: bool, quant) -> dict:
    """What :func:`load_packed_model` needs to rebuild a bundled-architecture model (stored in the file)."""
    quant = quant.model_dump(mode="json") if hasattr(quant, "model_dump") else quant
    return dict(
        zip(BUILD_KEYS, (model_name, dict(model_args), list(input_shape), num_classes, folded, quant), strict=True)
    )


def load_packed_model(path: str | Path) -> nn.Module:
    """A ready-to-run model from a packed file alone: built, BatchNorm folded and prepared as the source was."""
    from ..fold import fold_batchnorm
    from ..models import build_model
    from ..prepare import prepare

    meta = read_metadata(path)
    missing = [k for k in BUILD_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: packed file has no model description ({', '.join(missing)}); "
                              "build the model yourself and use apply_packed")  # fmt: skip
    model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"], **meta["model_args"])
    if meta["folded"]:
        fold_batchnorm(model)
    prepare(model, meta["quant"])
    return apply_packed(model, path)
