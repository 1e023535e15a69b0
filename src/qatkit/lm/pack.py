"""FP16 snapping and the packed LUT checkpoint: indices packed to their bit width, FP16 tables and scales.

A packed folder holds ``model.safetensors`` (per LUT layer: ``codes`` uint8, ``lut`` and the scale factors in
FP16, bias as stored) and ``config.json`` (base model, tokenizer fingerprint, layer settings, bits per
weight). Loading rebuilds the Hugging Face model with frozen LUT layers that compute exactly what the snapped
model computed. Embeddings, norms and lm_head come from the base model (they are not quantized). Loading
checks the config against the model and every tensor's name, dtype, shape, finiteness and index range.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qatkit.io.checkpoint import CheckpointError, atomic_write_bytes, check_state_fits, load_weights, save_weights
from qatkit.io.jsonfile import read_json_object
from qatkit.lm.checkpoint import check_indices, check_record, check_weight_finite, lut_templates
from qatkit.lm.rules import bits_per_weight, freeze_q_all, lut_layers, rebuild_lm
from qatkit.nn.lut_linear import LUTLinear
from qatkit.quant.packing import pack_bits, packed_nbytes, unpack_bits

FORMAT = "qatkit-packed-lut"
VERSION = 1
LAYER_KEYS = ("spec", "in_features", "out_features", "code_bits")


def snap_model(model: nn.Module) -> int:
    """Freeze indices and round every table and scale to FP16 values (seed 004's snap for the Neural Engine)."""
    n = freeze_q_all(model)
    for m in lut_layers(model).values():
        m.snap_fp16()
    return n


def _code_bits(bits: int) -> int:
    """Codes are packed at the table's own width (3-bit tables: 3 bits per weight on disk)."""
    return bits


def _legacy_code_bits(bits: int) -> int:
    """The width earlier versions packed codes at (whole codes per byte): still read."""
    return 1 if bits == 1 else 2 if bits == 2 else 4 if bits <= 4 else 8


def save_packed(folder: str | Path, model: nn.Module, *, base: str, tokenizer) -> dict:
    """Snap (if not yet), pack and write; returns sizes and bits per weight measured on the written file."""
    from qatkit.lm.hf import tokenizer_fingerprint

    folder = Path(folder)
    snap_model(model)
    tensors, layers = {}, {}
    for name, m in lut_layers(model).items():
        cb = _code_bits(m.spec.bits)
        tensors[f"{name}.codes"] = pack_bits(m.index, cb)
        tensors[f"{name}.lut"] = m.lut.detach().half()
        for s, p in m.scale_params().items():
            tensors[f"{name}.{s}"] = p.detach().half()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach()
        layers[name] = {"spec": m.spec.to_dict(), "in_features": m.in_features, "out_features": m.out_features,
                        "code_bits": cb}  # fmt: skip
    path = save_weights(folder / "model.safetensors", tensors, {"kind": FORMAT})
    weights = sum(m.num_weights for m in lut_layers(model).values())
    size = path.stat().st_size
    report = {"file_bytes": size, "weights": weights, "file_bits_per_weight": 8 * size / max(weights, 1),
              "fp16_bytes": 2 * weights, "size_vs_fp16": size / max(2 * weights, 1), **bits_per_weight(model)}  # fmt: skip
    config = {"format": FORMAT, "version": VERSION, "base": base, "tokenizer": tokenizer_fingerprint(tokenizer),
              "layers": layers, "report": report}  # fmt: skip
    atomic_write_bytes(folder / "config.json", json.dumps(config, indent=1).encode())
    return report


def read_packed_config(folder: str | Path) -> dict:
    """The checked ``config.json`` of a packed folder: format, version, base, tokenizer and per-layer records."""
    path = Path(folder) / "config.json"
    config = read_json_object(path, CheckpointError, "a packed LUT model's config.json")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: not a packed LUT model (format {config.get('format')!r})")
    if type(config.get("version")) is not int or config["version"] != VERSION:
        raise CheckpointError(f"{path}: packed format version {config.get('version')!r}; this qatkit reads {VERSION}")
    check_record(path, config)
    for name, info in config["layers"].items():
        if not isinstance(info, dict) or not set(LAYER_KEYS) <= set(info):
            raise CheckpointError(f"{path}: layers: {name!r} must be a mapping with keys {', '.join(LAYER_KEYS)}")
    return config


def _check_layer_info(source: Path, name: str, info: dict, m: LUTLinear) -> None:
    """Refuse a layer record whose sizes differ from the model's layer or whose code width is not its bits'."""
    for key in ("in_features", "out_features"):
        if type(info[key]) is not int or info[key] != getattr(m, key):
            raise CheckpointError(f"{source}: layers: {name!r}: {key} is {info[key]!r}, the model's layer has "
                                  f"{getattr(m, key)}")  # fmt: skip
    allowed = {_code_bits(m.spec.bits), _legacy_code_bits(m.spec.bits)}
    if type(info["code_bits"]) is not int or info["code_bits"] not in allowed:
        raise CheckpointError(f"{source}: layers: {name!r}: code_bits is {info['code_bits']!r}; {m.spec.bits}-bit "
                              f"tables are packed as {_code_bits(m.spec.bits)}-bit codes")  # fmt: skip


def _packed_tensors(layers: dict[str, LUTLinear], info: dict) -> dict[str, torch.Tensor]:
    """What a packed file holds for these layers, on the meta device: codes, FP16 table and scales, bias."""
    want = {}
    for name, m in layers.items():
        nbytes = packed_nbytes(m.index.numel(), info[name]["code_bits"])
        want[f"{name}.codes"] = torch.empty(nbytes, dtype=torch.uint8, device="meta")
        want[f"{name}.lut"] = m.lut.to("meta", torch.float16)
        want.update({f"{name}.{s}": p.to("meta", torch.float16) for s, p in m.scale_params().items()})
        if m.bias is not None:
            want[f"{name}.bias"] = m.bias.to("meta")
    return want


@torch.no_grad()
def apply_packed(model: nn.Module, folder: str | Path, tokenizer_fp: str | None = None) -> dict:
    """Put the packed LUT layers into the float base ``model`` (frozen, FP16 values in float32); returns config."""
    folder = Path(folder)
    config, path = read_packed_config(folder), folder / "model.safetensors"
    if tokenizer_fp is not None and config["tokenizer"] != tokenizer_fp:
        raise CheckpointError(f"{folder}: packed for another tokenizer ({config['tokenizer']} vs {tokenizer_fp})")
    tensors = load_weights(path, expect={"kind": FORMAT})
    specs = {n: v["spec"] for n, v in config["layers"].items()}
    templates = lut_templates(folder / "config.json", model, specs, released=specs)
    for name, m in templates.items():
        _check_layer_info(folder / "config.json", name, config["layers"][name], m)
    check_state_fits(path, _packed_tensors(templates, config["layers"]), tensors)
    rebuild_lm(model, specs, released=specs)  # frozen indices: no latent weight
    layers = lut_layers(model)
    for name in templates:
        m = layers[name]
        index = unpack_bits(tensors[f"{name}.codes"], config["layers"][name]["code_bits"], tuple(m.index.shape))
        check_indices(path, f"{name}.codes", index, m.lut.shape[1])
        m.index.copy_(index)
        m.lut.copy_(tensors[f"{name}.lut"].float())
        for s, p in m.scale_params().items():
            p.copy_(tensors[f"{name}.{s}"].float())
        if m.bias is not None:
            m.bias.copy_(tensors[f"{name}.bias"])
        m.frozen.fill_(True)
        if m.has_latent:  # a LUT layer the model already had
            m.release_weight()
        check_weight_finite(path, name, m.dequantized_weight())
    return config


def load_packed(folder: str | Path, base: str | None = None):
    """``(model, tokenizer)``: the base model with the packed LUT layers, ready for inference."""
    from qatkit.lm.hf import load_causal_lm, tokenizer_fingerprint

    config = read_packed_config(folder)
    model, tok = load_causal_lm(base or config["base"])
    apply_packed(model, folder, tokenizer_fingerprint(tok))
    return model, tok
