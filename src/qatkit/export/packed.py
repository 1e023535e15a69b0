"""Packed low-bit checkpoint for affine-quantized models: weight codes bit-packed, everything else as trained.

The file is safetensors. Each quantized layer's weight is stored as its integer codes (shifted to start at 0)
packed into bytes at the grid's own width (3-bit weights: 3 bits each on disk); its scale and zero point are the
quantizer's own buffers, kept in the state dict. Loading unpacks the codes to ``(q - zp) * scale`` — the very
values the fake-quant model computes with — and fixes the weight ranges, so outputs match the source model.
The weight quantizers' observed ranges (``min_val``/``max_val``, one float per scale) are not stored: they
only feed the next range update, which a loaded model no longer does, and per-group they would cost more than
the codes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qatkit.base.batch import call, output_tensor, rows
from qatkit.export.formats import Exporter
from qatkit.io.checkpoint import CheckpointError, check_state_fits, load_weights, read_metadata, save_weights
from qatkit.nn.modules import QuantModule
from qatkit.quant.affine import dequantize_int, quantize_to_int
from qatkit.quant.packing import pack_bits, unpack_bits

KIND = "qatkit-packed-affine"


def code_bits(bits: int) -> int:
    """Storage width for a grid of ``bits`` bits: the grid's own width."""
    return bits


def legacy_code_bits(bits: int) -> int:
    """The width earlier versions stored codes at (1, 2, 4 or 8: whole codes per byte); such files still load."""
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
        if fq.observing:  # the range the next forward would use
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
    layers = meta.get("packed_layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{path}: packed_layers must be a non-empty mapping of layer names")
    for name, info in layers.items():
        _check_layer_info(path, name, info)
        codes = state.pop(f"{name}.weight_codes", None)
        scale, zp = state.get(f"{name}.weight_quant.scale"), state.get(f"{name}.weight_quant.zero_point")
        if codes is None or scale is None or zp is None:
            raise CheckpointError(f"{path}: layer {name!r} is listed but its codes or scales are missing")
        try:
            q = unpack_bits(codes, info["code_bits"], tuple(info["shape"])).to(torch.int32) + info["qmin"]
            state[f"{name}.weight"] = dequantize_int(q, scale, zp, info["ch_axis"], info["group"])
        except (ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(
                f"{path}: layer {name!r}: codes do not fit their metadata ({_first_line(e)})"
            ) from None
    return state, meta


LAYER_INFO = {"shape": list, "bits": int, "code_bits": int, "qmin": int, "ch_axis": (int, type(None)), "group": int}
"""Keys of a packed layer's metadata and their types (ch_axis None: one scale for the tensor)."""


def _check_layer_info(path: str | Path, name: str, info) -> None:
    """Refuse a layer entry with missing keys, wrong types or values outside what save_packed writes."""
    where = f"{path}: packed_layers[{name!r}]"
    if not isinstance(info, dict) or set(info) != set(LAYER_INFO):
        raise CheckpointError(f"{where}: expected the keys {', '.join(LAYER_INFO)}")
    for k, typ in LAYER_INFO.items():
        if type(info[k]) not in (typ if isinstance(typ, tuple) else (typ,)):
            raise CheckpointError(f"{where}.{k}: expected {getattr(typ, '__name__', 'int or null')}, got {info[k]!r}")
    if not 1 <= len(info["shape"]) <= 8 or not all(type(d) is int and 0 < d <= 1 << 24 for d in info["shape"]):
        raise CheckpointError(f"{where}.shape: expected 1 to 8 positive sizes, got {info['shape']!r}")
    if not 2 <= info["bits"] <= 8 or info["code_bits"] not in (code_bits(info["bits"]), legacy_code_bits(info["bits"])):
        raise CheckpointError(f"{where}: bits {info['bits']} in code_bits {info['code_bits']} is not a packed grid")
    axis_ok = info["ch_axis"] is None or 0 <= info["ch_axis"] < len(info["shape"])
    if not -128 <= info["qmin"] <= 0 or not axis_ok or info["group"] < 0:
        raise CheckpointError(f"{where}: qmin, ch_axis or group out of range ({info})")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


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


class PackedExporter(Exporter):
    """Packed low-bit checkpoints, run in PyTorch: loaded back on their own when the run says how to build the
    model, else into a copy of the source."""

    format, runtime, suffix = "packed", "pytorch (packed)", ".packed.safetensors"

    def precisions(self, src, cfg):
        """One file, labelled by the weight grids it packs: "packed-int2", or "packed-int2..8" when mixed."""
        if not src.quantized:
            return []
        bits = sorted({m.weight_quant.spec.bits for m in _quantized(src.model).values()})
        if not bits:
            return []
        return [f"packed-int{bits[0]}" if len(bits) == 1 else f"packed-int{bits[0]}..{bits[-1]}"]

    def write(self, src, precision, path, example, spec, cfg):
        save_packed(src.model, path, {"source": src.stem, **(src.build or {})})

    def runner(self, art, cfg):
        src = art.source
        model = src.reload(art.path) if src.reload and src.build else apply_packed(copy.deepcopy(src.model), art.path)

        def run(x: dict[str, np.ndarray]) -> np.ndarray:
            named = {k: torch.from_numpy(v) for k, v in x.items()}
            n = len(next(iter(named.values())))
            with torch.no_grad():
                outs = [
                    output_tensor(call(model, art.spec.structured(rows(named, i, i + 512)))) for i in range(0, n, 512)
                ]
            return torch.cat(outs).numpy()

        return run
