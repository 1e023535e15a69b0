"""A Hugging Face ``save_pretrained`` folder for sequence or image classification, loaded offline with no
remote code, wrapped so that it returns a logits tensor (what tasks, exporters and runtimes expect)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qatkit.base.config import RecipeError
from qatkit.base.extras import require
from qatkit.io.jsonfile import read_json_object

HEADS = {"ForSequenceClassification": "AutoModelForSequenceClassification",
         "ForImageClassification": "AutoModelForImageClassification"}  # fmt: skip


class LogitsOnly(nn.Module):
    """``model(**inputs).logits``: keyword inputs in (input_ids, attention_mask, pixel_values ...), a tensor out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs, return_dict=True).logits


def load_hf_classifier(folder: Path) -> nn.Module:
    """The classifier saved in ``folder`` (config.json + safetensors weights), in float32."""
    config = folder / "config.json"
    if not config.is_file():
        raise RecipeError(f"model.hf: {folder} has no config.json (expected a save_pretrained folder)")
    if any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
        raise RecipeError(f"model.hf: {folder} holds pickled *.bin weights only; save it with "
                          "save_pretrained(..., safe_serialization=True) to get model.safetensors")  # fmt: skip
    archs = read_json_object(config, RecipeError, "a Hugging Face config").get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise RecipeError(f"{config}: architectures is not a list of class names")
    head = next((HEADS[k] for a in archs for k in HEADS if a.endswith(k)), None)
    if head is None:
        raise RecipeError(f"model.hf: {folder} is a {', '.join(archs) or 'model without architectures'}; qatkit runs "
                          "*ForSequenceClassification and *ForImageClassification models")  # fmt: skip
    transformers = require("transformers", "lm", "Hugging Face models (model.hf)")
    model = getattr(transformers, head).from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
    )
    return LogitsOnly(model.eval())
