"""Conversions between LUT model forms: V1 -> V2 scales, and progressive Q4 -> Q2 (seed 004, workflows A and C).

Both keep the layers' function as far as the target allows: V1 -> V2 exactly (up to rounding), Q4 -> Q2
through a use-weighted k-means of the old table (rank expansion itself changes nothing).
"""

from __future__ import annotations

import torch
from torch import nn

from qatkit.lm.rules import LMQuantConfig, freeze_q_all, lut_layers, set_trainable
from qatkit.transform.prepare import name_matches


def v1_to_v2(model: nn.Module) -> int:
    """Every LUT layer to V2 with its indices frozen (``freeze_Q``); returns the number of layers converted."""
    layers = lut_layers(model)
    for m in layers.values():
        m.to_v2()
    freeze_q_all(model)
    set_trainable(model)
    return len(layers)


def to_target(model: nn.Module, target: LMQuantConfig, seed: int = 0) -> dict[str, str]:
    """Move each LUT layer to the bits and rank its rule in ``target`` gives (e.g. Q4_A4 -> Q2_A4).

    Fewer bits: the table is reduced by k-means (16 -> 4 entries); higher rank: new ranks start at zero.
    Returns what changed per layer. A layer no target rule matches is left as it is.
    """
    g = torch.Generator().manual_seed(seed)
    rules = target.resolved_rules()
    changed = {}
    for name, m in lut_layers(model).items():
        rule = next((r for r in rules if name_matches(name, r.match) and not name_matches(name, r.exclude)), None)
        if rule is None:
            continue
        before = f"{m.spec.bits}-bit r{m.spec.rank}"
        if rule.bits < m.spec.bits:
            m.reduce_bits(rule.bits)
        elif rule.bits > m.spec.bits:
            raise ValueError(f"{name}: cannot raise LUT bits from {m.spec.bits} to {rule.bits} (train at {rule.bits} "
                             "bits from the float model instead)")  # fmt: skip
        if rule.rank > m.spec.rank:
            m.expand_rank(rule.rank, g)
        after = f"{m.spec.bits}-bit r{m.spec.rank}"
        if after != before:
            changed[name] = f"{before} -> {after}"
    set_trainable(model)
    return changed
