"""Memory of a KD-QAT run: what the weights, gradients, AdamW state and the training loop's in-memory copies
(last-good and best snapshots of model and optimizer) will take, printed before training; the peak resident
set size measured after it."""

from __future__ import annotations

import resource
import sys

from torch import nn


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def training_estimate(model: nn.Module, copies: bool = False) -> dict[str, int]:
    """Bytes by part, activations not counted: the model (parameters and buffers), gradients and AdamW's two
    moments of the trainable parameters, and (``copies``) the loop's in-memory snapshot of model and optimizer."""
    model_b = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    trainable = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    est = {"model": model_b, "gradients": trainable, "adamw_state": 2 * trainable,
           "snapshot": model_b + 2 * trainable if copies else 0}  # fmt: skip
    est["total"] = sum(est.values())
    return est


def describe(est: dict[str, int]) -> str:
    gib = 2**30
    parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in est.items() if k != "total")
    return f"memory estimate before activations: {est['total'] / gib:.2f} GiB ({parts} GiB)"


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
