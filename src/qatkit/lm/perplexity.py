"""Perplexity of a causal LM on token windows: exp of the mean next-token NLL over every predicted token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of tokens 1.. given logits at positions ..-1 (``logits`` already cut to L-1), and the count."""
    target = ids[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum")
    return float(nll), target.numel()


def from_nll(mean_nll: float) -> float:
    """Perplexity of a mean NLL (capped so a destroyed model reports a huge number, not an overflow)."""
    return math.exp(min(mean_nll, 50.0))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """``{"perplexity", "nll", "tokens"}`` over (N, L) windows, each scored independently (no carried context)."""
    was = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        total, count = next_token_nll(model(input_ids=ids).logits[:, :-1], ids)
        nll, tokens = nll + total, tokens + count
    model.train(was)
    mean = nll / max(tokens, 1)
    return {"perplexity": from_nll(mean), "nll": mean, "tokens": tokens}
