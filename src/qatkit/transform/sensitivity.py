"""Per-layer sensitivity: how much the model's outputs move when one layer alone has its weights quantized at
a given width, the rest of the model float. What mixed precision spends its bit budget on.

The caller says how to run the model on held-out data and how to compare outputs (the task's divergence and
primary metric), so this module stays free of tasks and data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qatkit.transform.calibrate import calibrate
from qatkit.transform.prepare import plan, prepare
from qatkit.transform.rules import QuantRecipe, Rule


@dataclass
class LayerSensitivity:
    """One layer: its weight count and, per candidate width, the output divergence and metric drop."""

    name: str
    weights: int
    divergence: dict[int, float] = field(default_factory=dict)
    metric_drop: dict[int, float] = field(default_factory=dict)


@dataclass
class SensitivityReport:
    """Every layer the recipe quantizes, measured at every candidate width (float metric for reference)."""

    candidates: list[int]
    float_metric: float
    layers: list[LayerSensitivity]

    def ranking(self, bits: int) -> list[str]:
        """Layer names, most sensitive first, at ``bits``."""
        return [s.name for s in sorted(self.layers, key=lambda s: -s.divergence[bits])]

    def to_dict(self) -> dict:
        """JSON-ready (widths as string keys, as JSON keeps them)."""
        layers = [{**asdict(s), "divergence": {str(b): v for b, v in s.divergence.items()},
                   "metric_drop": {str(b): v for b, v in s.metric_drop.items()}} for s in self.layers]  # fmt: skip
        return {"candidates": self.candidates, "float_metric": self.float_metric, "layers": layers}


def quantized_rules(model: nn.Module, quant: QuantRecipe | dict | str) -> dict[str, Rule]:
    """The rule each layer the recipe quantizes gets (the layers mixed precision chooses widths for)."""
    _, decided = plan(model, quant)
    return {name: rule for name, rule in decided.items() if rule.weight is not None}


def only_layer(name: str, rule: Rule, bits: int) -> QuantRecipe:
    """A recipe quantizing one layer's weights at ``bits`` (its rule's other weight settings), nothing else."""
    weight = rule.weight.model_copy(update={"bits": bits})
    return QuantRecipe(rules=[Rule(match=[name], weight=weight, output=False)], outputs="rules")


@torch.no_grad()
def measure(
    model: nn.Module,
    quant: QuantRecipe | dict | str,
    candidates: list[int],
    calib: Iterable,
    run: Callable[[nn.Module], torch.Tensor],
    divergence: Callable[[torch.Tensor, torch.Tensor], float],
    metric: Callable[[torch.Tensor], float],
) -> SensitivityReport:
    """Quantize each layer alone at each width, calibrate on ``calib`` (one batch: weight ranges), run it on the
    held-out data (``run``) and compare with the float model's outputs (``divergence``; ``metric``: higher is
    better, its drop is reported)."""
    model = model.eval()
    reference = run(model)
    base = metric(reference)
    batches = list(calib)[:1]
    layers = []
    for name, rule in quantized_rules(model, quant).items():
        entry = LayerSensitivity(name, dict(model.named_modules())[name].weight.numel())
        for bits in candidates:
            trial = copy.deepcopy(model)
            prepare(trial, only_layer(name, rule, bits))
            calibrate(trial, batches, 1)
            out = run(trial.eval())
            entry.divergence[bits] = float(divergence(out, reference))
            entry.metric_drop[bits] = base - float(metric(out))
        layers.append(entry)
    return SensitivityReport(list(candidates), base, layers)
