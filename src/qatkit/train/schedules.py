"""Learning-rate schedules as multipliers of the base LR, per optimiser step, behind a name registry.

``plateau`` (reduce on plateau) is epoch-based and driven by the validation metric, so it lives in the loop
(torch's ReduceLROnPlateau); everything here is a pure function of the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleArgs:
    total: int
    warmup: int = 0
    base_lr: float = 1.0
    end_lr: float = 0.0
    power: float = 1.0
    period: int = 1
    gamma: float = 0.1


Schedule = Callable[[int, ScheduleArgs], float]


def _progress(step: int, a: ScheduleArgs) -> float:
    return min(1.0, (step - a.warmup) / max(1, a.total - a.warmup))


def constant(step: int, a: ScheduleArgs) -> float:
    return 1.0


def step_decay(step: int, a: ScheduleArgs) -> float:
    """Multiply by ``gamma`` every ``period`` steps (torch's StepLR)."""
    return a.gamma ** ((step - a.warmup) // max(1, a.period))


def polynomial(step: int, a: ScheduleArgs) -> float:
    """Polynomial decay from base to end LR with ``power`` (seed 003: 1e-3 -> 1e-4, power 2)."""
    return (a.end_lr + (a.base_lr - a.end_lr) * (1.0 - _progress(step, a)) ** a.power) / a.base_lr


def cosine(step: int, a: ScheduleArgs) -> float:
    """Cosine decay to end LR (seed 002, after its linear warmup)."""
    return (a.end_lr + (a.base_lr - a.end_lr) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, a)))) / a.base_lr


SCHEDULES: dict[str, Schedule] = {"constant": constant, "step": step_decay, "polynomial": polynomial, "cosine": cosine}


def lr_multiplier(name: str, total_steps: int, warmup_steps: int = 0, base_lr: float = 1.0, end_lr: float = 0.0,
                  power: float = 1.0, period: int = 1, gamma: float = 0.1) -> Callable[[int], float]:  # fmt: skip
    """A ``LambdaLR``-ready function step -> multiplier: linear warmup over ``warmup_steps``, then ``name``."""
    fn = SCHEDULES[name]
    args = ScheduleArgs(total_steps, warmup_steps, base_lr, end_lr, power, period, gamma)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return fn(step, args)

    return multiplier
