"""Learning-rate schedules as multipliers of the base LR, per optimiser step, behind a name registry."""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[int, int, int, float, float, float], float]
"""(step, total_steps, warmup_steps, base_lr, end_lr, power) -> multiplier of base_lr."""


def _warm(step: int, warmup: int) -> float | None:
    return (step + 1) / warmup if step < warmup else None


def constant(step: int, total: int, warmup: int, base: float, end: float, power: float) -> float:
    w = _warm(step, warmup)
    return 1.0 if w is None else w


def polynomial(step: int, total: int, warmup: int, base: float, end: float, power: float) -> float:
    """Polynomial decay from base to end LR with ``power`` (seed 003: 1e-3 -> 1e-4, power 2)."""
    w = _warm(step, warmup)
    if w is not None:
        return w
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return (end + (base - end) * (1.0 - frac) ** power) / base


def cosine(step: int, total: int, warmup: int, base: float, end: float, power: float) -> float:
    """Linear warmup then cosine decay to end LR (seed 002)."""
    w = _warm(step, warmup)
    if w is not None:
        return w
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return (end + (base - end) * 0.5 * (1.0 + math.cos(math.pi * frac))) / base


SCHEDULES: dict[str, Schedule] = {"constant": constant, "polynomial": polynomial, "cosine": cosine}


def lr_multiplier(name: str, total_steps: int, warmup_steps: int, base_lr: float, end_lr: float, power: float):
    """A ``LambdaLR``-ready function step -> multiplier for schedule ``name``."""
    fn = SCHEDULES[name]
    return lambda step: fn(step, total_steps, warmup_steps, base_lr, end_lr, power)
