"""FP16 snapping and the packed LUT checkpoint: indices packed to their bit width, FP16 tables and scales.

A packed folder holds ``model.safetensors`` (per LUT layer: ``codes`` uint8, ``lut`` and the scale factors in
FP16, bias as stored) and ``config.json`` (base model, tokenizer fingerprint, layer settings, bits per
weight). Loading rebuilds the Hugging Face model with frozen LUT layers that compute exactly what the snapped
model computed. Embeddings, norms and lm_head come from the base model (they are not quantized).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qatkit.io.checkpoint import CheckpointError, atomic_write_bytes, load_weights, save_weights
from qatkit.lm.rules import bits_per_weight, freeze_q_all, lut_layers, rebuild_lm
from qatkit.quant.packing import pack_bits, unpack_bits

FORMAT = "qatkit-packed-lut"


def snap_model(model: nn.Module) -> int:
    """Freeze indices and round every table and scale to FP16 values (seed 004's snap for the Neural Engine)."""
    n = freeze_q_all(model)
    for m in lut_layers(model).values():
        m.snap_fp16()
    return n


def _code_bits(bits: int) -> int:
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
    weights = sum(m.weight.numel() for m in lut_layers(model).values())
    size = path.stat().st_size
    report = {"file_bytes": size, "weights": weights, "file_bits_per_weight": 8 * size / max(weights, 1),
              "fp16_bytes": 2 * weights, "size_vs_fp16": size / max(2 * weights, 1), **bits_per_weight(model)}  # fmt: skip
    config = {"format": FORMAT, "version": 1, "base": base, "tokenizer": tokenizer_fingerprint(tokenizer),
              "layers": layers, "report": report}  # fmt: skip
    atomic_write_bytes(folder / "config.json", json.dumps(config, indent=1).encode())
    return report


def read_packed_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: no readable packed config.json ({e})") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: not a packed LUT model (format {config.get('format')!r})")
    return config


@torch.no_grad()
def apply_packed(model: nn.Module, folder: str | Path, tokenizer_fp: str | None = None) -> dict:
    """Put the packed LUT layers into the float base ``model`` (frozen, FP16 values in float32); returns config."""
    folder = Path(folder)
    config = read_packed_config(folder)
    if tokenizer_fp is not None and config["tokenizer"] != tokenizer_fp:
        raise CheckpointError(f"{folder}: packed for another tokenizer ({config['tokenizer']} vs {tokenizer_fp})")
    tensors = load_weights(folder / "model.safetensors", expect={"kind": FORMAT})
    rebuild_lm(model, {n: v["spec"] for n, v in config["layers"].items()})
    layers = lut_layers(model)
    for name, info in config["layers"].items():
        m = layers[name]
        try:
            m.index.copy_(unpack_bits(tensors[f"{name}.codes"], info["code_bits"], tuple(m.index.shape)))
            m.lut.copy_(tensors[f"{name}.lut"].float())
            for s, p in m.scale_params().items():
                p.copy_(tensors[f"{name}.{s}"].float())
            if m.bias is not None:
                m.bias.copy_(tensors[f"{name}.bias"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{folder}: layer {name} does not fit the packed data ({e})") from None
        m.frozen.fill_(True)
        m.weight.requires_grad_(False)
        m.weight.copy_(m.dequantized_weight())
    return config


def load_packed(folder: str | Path, base: str | None = None):
    """``(model, tokenizer)``: the base model with the packed LUT layers, ready for inference."""
    from qatkit.lm.hf import load_causal_lm, tokenizer_fingerprint

    config = read_packed_config(folder)
    model, tok = load_causal_lm(base or config["base"])
    apply_packed(model, folder, tokenizer_fingerprint(tok))
    return model, tok
