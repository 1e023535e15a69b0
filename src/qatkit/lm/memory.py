"""Memory of a KD-QAT run: what the weights, gradients, AdamW state and the training loop's in-memory copies
(last-good and best snapshots of model and optimizer) will take, printed before training; the peak resident
set size measured after it; and how freed memory goes back to the system (glibc's allocator keeps it otherwise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
LEAN_THRESHOLD = 1 << 20
"""Blocks of at least 1 MiB get their own mapping in lean mode: on SmolLM2 the transient per-layer weights
(0.4-3.5 MB) otherwise land in the heap between saved activations, and a training step's heap grows ~0.6 GiB
beyond what is live (bench/README.md)."""


def _glibc():
    """glibc, or None where the C library is another (macOS, musl): the calls below are then no-ops."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def lean_allocator(threshold: int = LEAN_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more from its own mapping, unmapped when freed, so freed
    blocks never stay resident (glibc otherwise raises this threshold as large blocks are freed, and serves them
    from a heap that fragments). Costs page faults on every such allocation. True if the allocator took it."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1)


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``), e.g. once a model's float weights
    have been replaced by LUT indices. True if any memory was released."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0) == 1)
