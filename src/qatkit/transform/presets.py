"""Named quantization presets: each expands to an ordered list of rules (plain dicts validated as Rule)."""

from __future__ import annotations

from typing import Any

W8 = {"bits": 8, "granularity": "channel"}
A8 = {"bits": 8}

ATTENTION_PATTERNS = [
    "*q_proj",
    "*k_proj",
    "*v_proj",
    "*o_proj",
    "*out_proj",
    "*qkv*",
    "*attn*",
    "*attention*",
    "*query",
    "*key",
    "*value",
]
"""Names of attention projections. ``ffn-only`` never quantizes these (seed 000's collapse)."""

FFN_PATTERNS = [
    "fc1",
    "*.fc1",
    "fc2",
    "*.fc2",
    "linear1",
    "*.linear1",
    "linear2",
    "*.linear2",
    "*DenseReluDense.wi",
    "*DenseReluDense.wi_0",
    "*DenseReluDense.wi_1",
    "*DenseReluDense.wo",
    "*intermediate.dense",
    "*.output.dense",
    "*gate_proj",
    "*up_proj",
    "*down_proj",
    "mlp.*",
    "*.mlp.*",
    "*ffn*",
    "*feed_forward*",
]
"""Transformer feed-forward layers across common naming schemes: fairseq/BART, torch.nn.TransformerEncoderLayer,
T5, BERT, Llama/Qwen, timm."""

PRESETS: dict[str, list[dict[str, Any]]] = {
    "int8": [{"types": ["Linear", "Conv1d", "Conv2d"], "weight": W8, "activation": A8}],
    "w4a8": [
        {"types": ["Linear", "Conv1d", "Conv2d"], "weight": {"bits": 4, "granularity": "channel"}, "activation": A8}
    ],
    "w8": [{"types": ["Linear", "Conv1d", "Conv2d"], "weight": W8, "activation": None}],
    "ffn-only": [
        {"match": FFN_PATTERNS, "exclude": ATTENTION_PATTERNS, "types": ["Linear"], "weight": W8, "activation": A8},
    ],
}


def preset_rules(name: str) -> list[dict[str, Any]]:
    """The rules a preset stands for (copies, safe to edit)."""
    import copy

    return copy.deepcopy(PRESETS[name])
