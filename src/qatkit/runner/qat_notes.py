"""Why a QAT stage changed nothing: when its best epoch is 0 (the PTQ-initialised model), say which of the
known reasons the numbers point to, with the numbers.

- the validation set is too small to tell epochs apart (the best later epoch is within two standard errors),
- PTQ was already at the float model's level (no gap for QAT to close),
- the learning rate was too small for the gap (weights moved less than half a quantization step).
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import torch
from torch import nn

from qatkit.nn.modules import QuantModule


def stage_history(out: Path, stage: str, monitor: str) -> list[float]:
    """The monitored validation metric per epoch from ``OUT/<stage>_train.csv`` (epoch 0 first)."""
    path = out / f"{stage}_train.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r[f"val_{monitor}"]) for r in rows if r.get(f"val_{monitor}") not in (None, "")]


def weight_moves(start: nn.Module, end: nn.Module) -> float:
    """Median over quantized layers of mean |weight change| in units of the layer's weight quantization step."""
    moves = []
    before = dict(start.named_modules())
    for name, m in end.named_modules():
        if isinstance(m, QuantModule) and m.weight_quant is not None and name in before:
            step = m.weight_quant.scale.detach().float().mean().clamp_min(1e-12)
            moves.append(float((m.weight.detach() - before[name].weight.detach()).abs().mean() / step))
    return float(torch.tensor(moves).median()) if moves else math.nan


def why_no_gain(history: list[float], n_val: int, ptq_gap: float | None, moved: float, share: bool) -> list[str]:
    """Reasons, with numbers, that a stage whose best epoch is 0 did not improve (``share``: metric in [0, 1])."""
    reasons = []
    if share and history and n_val:
        p = min(max(history[0], 1e-6), 1 - 1e-6)
        se = 100 * math.sqrt(p * (1 - p) / n_val)
        gain = 100 * (max(history[1:], default=history[0]) - history[0])
        if gain < 2 * se:
            reasons.append(f"the validation set ({n_val} rows) cannot separate epochs: the best later epoch was "
                           f"{gain:+.2f} points, two standard errors are {2 * se:.2f} points")  # fmt: skip
    if ptq_gap is not None and ptq_gap < 0.5:
        reasons.append(f"PTQ was already within {ptq_gap:.2f} points of FP32 on test: no gap for QAT to close")
    if not math.isnan(moved) and moved < 0.5:
        reasons.append(f"weights moved {moved:.2f} quantization steps on average (median layer): the learning rate is "
                       "too small to change their rounding; raise lr or epochs")  # fmt: skip
    return reasons or ["none of the known reasons (small validation set, no PTQ gap, tiny LR) applies"]


def explain_stages(out: Path, report, names: list[str], cfgs: list, variant: str, task, n_val: int,
                   start: nn.Module, model: nn.Module) -> None:  # fmt: skip
    """Add ``no_gain`` reasons to every QAT stage of ``names`` whose best epoch is 0 (report.training)."""
    from qatkit.io.checkpoint import load_weights

    fp32, ptq = report.find("fp32", "fp32", "pytorch"), report.find(variant, "ptq", "pytorch")
    gap = 100 * task.primary_drop(fp32.metrics, ptq.metrics) if fp32 and ptq else None
    for name, cfg in zip(names, cfgs, strict=True):
        summary = report.training.get(name)
        if summary is None or summary.get("best_epoch") != 0 or not cfg.validation:
            continue
        last = out / "checkpoints" / name / "last.safetensors"
        moved = math.nan
        if last.is_file():
            end = copy.deepcopy(model)
            state = {k[len("model/") :]: v for k, v in load_weights(last).items() if k.startswith("model/")}
            end.load_state_dict(state)
            moved = weight_moves(start, end)
        monitor = cfg.monitor or task.default_monitor
        history = stage_history(out, name, monitor)
        summary["no_gain"] = why_no_gain(history, n_val, gap, moved, monitor in task.shares)
