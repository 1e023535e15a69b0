"""Perplexity of a causal LM on token windows: exp of the mean next-token NLL over every predicted token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """``{"perplexity", "nll", "tokens"}`` over (N, L) windows, each scored independently (no carried context)."""
    was = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        tokens += ids[:, 1:].numel()
    model.train(was)
    mean = nll / max(tokens, 1)
    return {"perplexity": math.exp(min(mean, 50.0)), "nll": mean, "tokens": tokens}
