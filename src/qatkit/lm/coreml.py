"""Core ML export of a LUT-quantized causal LM: palettized weights with the model's own trained tables.

The Hugging Face model is wrapped to map token ids of a fixed length to logits (no KV cache), snapped to FP16
(tables and scales), and converted through ``torch.export``; each LUTLinear becomes a ``constexpr_lut_to_dense``
weight with its trained per-row tables and indices, the low-rank scales applied as elementwise products.
The file is then read back and its tables compared with the model's (Core ML cannot run on Linux).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from qatkit.export.coreml import export_coreml, inspect_mlpackage, match_weights
from qatkit.lm.pack import snap_model
from qatkit.lm.rules import lut_layers


class LogitsOnly(nn.Module):
    """``input_ids (1, T) -> logits (1, T, vocab)``: one forward over a fixed-length window, no cache.

    An all-ones attention mask is passed so the model does not probe ``position_ids`` for packed sequences.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def export_lm_coreml(model: nn.Module, path: str | Path, seq_len: int = 64) -> dict:
    """Snap a copy of ``model`` to FP16, write it as a palettized ``.mlpackage`` and check the stored tables."""
    if not lut_layers(model):
        raise ValueError("Core ML LUT export needs a model with LUT layers (a LUT checkpoint or packed folder)")
    m = copy.deepcopy(model).eval()
    snap_model(m)
    wrapper = LogitsOnly(m).eval()
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    path = export_coreml(wrapper, ids, path, "lut", method="export")
    info = inspect_mlpackage(path)
    check = match_weights(info, wrapper, "lut")
    return {"path": str(path), "size_bytes": info["size_bytes"], "ops": info["ops"], **check}
