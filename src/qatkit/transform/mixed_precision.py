"""Mixed precision: the weight width of each layer that minimises total sensitivity under a bit budget, and
the quantization recipe that says so (one explicit rule per layer, readable and reusable)."""

from __future__ import annotations

import math

from torch import nn

from qatkit.base.config import RecipeError
from qatkit.transform.prepare import plan
from qatkit.transform.rules import QuantRecipe, parse_quant
from qatkit.transform.sensitivity import SensitivityReport

MAX_FRONTIER = 20_000
"""Pareto states kept per layer; beyond it, costs are merged into buckets (then the answer is near-optimal)."""


def average_bits(report: SensitivityReport, bits: dict[str, int]) -> float:
    """Weight-count-weighted mean width of an assignment."""
    total = sum(s.weights for s in report.layers)
    return sum(s.weights * bits[s.name] for s in report.layers) / total


def choose_bits(report: SensitivityReport, budget_bits: float) -> dict[str, int]:
    """Widths with the least total divergence whose average bits per weight is at most ``budget_bits``.

    A multiple-choice knapsack solved over Pareto frontiers (cost, divergence), exact unless the frontier
    outgrows MAX_FRONTIER."""
    layers, cands = report.layers, report.candidates
    capacity = budget_bits * sum(s.weights for s in layers)
    least = [s.weights * min(cands) for s in layers]
    if sum(least) > capacity + 1e-9:
        raise RecipeError(f"mixed_precision.budget_bits {budget_bits} is below the narrowest width {min(cands)}")
    frontier: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for i, layer in enumerate(layers):
        rest = sum(least[i + 1 :])
        states = [(cost + layer.weights * b, div + layer.divergence[b], choice + (b,))
                  for cost, div, choice in frontier for b in cands
                  if cost + layer.weights * b + rest <= capacity + 1e-9]  # fmt: skip
        frontier = _pareto(states)
    best = min(frontier, key=lambda s: (s[1], s[0]))
    return {s.name: b for s, b in zip(layers, best[2], strict=True)}


def _pareto(states: list[tuple[float, float, tuple[int, ...]]]) -> list[tuple[float, float, tuple[int, ...]]]:
    """States not beaten on both cost and divergence (bucketed by cost when there are too many)."""
    states.sort(key=lambda s: (s[0], s[1]))
    out, best = [], math.inf
    for s in states:
        if s[1] < best:
            out.append(s)
            best = s[1]
    if len(out) > MAX_FRONTIER:
        step = (out[-1][0] - out[0][0]) / MAX_FRONTIER or 1.0
        kept: dict[int, tuple] = {}
        for s in out:
            kept.setdefault(int((s[0] - out[0][0]) / step), s)
        out = list(kept.values())
    return out


def mixed_recipe(model: nn.Module, quant: QuantRecipe | dict | str, bits: dict[str, int]) -> QuantRecipe:
    """``quant`` rewritten as one rule per layer it quantizes, each with its chosen weight width."""
    quant = parse_quant(quant)
    _, decided = plan(model, quant)
    rules = []
    for name, rule in decided.items():
        weight = rule.weight
        if weight is not None and name in bits:
            weight = weight.model_copy(update={"bits": bits[name]})
        rules.append(rule.model_copy(update={"match": [name], "types": [], "exclude": [], "weight": weight}))
    return QuantRecipe(rules=rules, outputs=quant.outputs)
