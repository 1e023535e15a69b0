"""Sensitivity and mixed precision inside a run: measure each quantized layer alone at each width on held-out
data with the task's divergence, choose widths under the budget, and say what was chosen and why."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import Subset

from qatkit.components.splits import DataSplits
from qatkit.io.checkpoint import CheckpointError, atomic_write_bytes
from qatkit.io.jsonfile import read_json_object
from qatkit.recipe import MixedPrecision, Variant
from qatkit.recipe.load import read_yaml
from qatkit.tasks import Task, predict
from qatkit.train import make_loader
from qatkit.transform.mixed_precision import average_bits, choose_bits, mixed_recipe
from qatkit.transform.rules import QuantRecipe, parse_quant
from qatkit.transform.sensitivity import SensitivityReport, measure


def layer_sensitivity(
    fp32: nn.Module, quant: QuantRecipe, data: DataSplits, task: Task, candidates: list[int], rows: int, seed: int
) -> SensitivityReport:
    """Every layer ``quant`` quantizes, alone at each width, against the float model on ``rows`` held-out rows
    (validation, else training): output divergence (the task's distillation loss at T=1) and primary-metric drop."""
    held = data.val if data.val is not None and len(data.val) else data.train
    held = Subset(held, list(range(min(rows, len(held)))))
    loader = make_loader(held, 512, False)
    targets = predict(fp32, loader)[1]
    sign = -1.0 if task.primary in task.lower_better else 1.0

    def run(model: nn.Module) -> torch.Tensor:
        return predict(model, loader)[0]

    def metric(outputs: torch.Tensor) -> float:
        return sign * task.metrics(outputs, targets)[task.primary]

    calib = make_loader(data.train, 64, True, seed)
    return measure(fp32, quant, candidates, calib, run, lambda o, r: float(task.distill_loss(o, r, 1.0)), metric)


def choose_widths(
    fp32: nn.Module, quant: QuantRecipe, cfg: MixedPrecision, data: DataSplits, task: Task, seed: int
) -> tuple[QuantRecipe, dict]:
    """The variant's recipe with widths chosen under ``cfg.budget_bits``, and the record for the report."""
    rep = layer_sensitivity(fp32, quant, data, task, sorted(set(cfg.candidates)), cfg.eval_rows, seed)
    bits = choose_bits(rep, cfg.budget_bits)
    record = {**rep.to_dict(), "budget_bits": cfg.budget_bits, "chosen": bits, "average_bits": average_bits(rep, bits)}
    return mixed_recipe(fp32, quant, bits), record


def variant_quant(run_dir: Path, v: Variant) -> QuantRecipe:
    """The rules a variant was run with: with mixed_precision, the widths the run chose (written beside it)."""
    if v.mixed_precision is None:
        return v.quant
    path = run_dir / f"{v.name}_mixed_precision.yaml"
    saved = read_yaml(path, "a mixed-precision choice")
    if not isinstance(saved, dict) or "quant" not in saved:
        raise CheckpointError(f"{path}: expected a mapping with the key quant")
    return parse_quant(saved["quant"])


def saved_choice(run_dir: Path, v: Variant) -> tuple[QuantRecipe, dict] | None:
    """The widths an interrupted run already chose for ``v`` and their record, or None where it chose none: a
    resumed run keeps them instead of measuring sensitivity again."""
    record_path = run_dir / f"{v.name}_sensitivity.json"
    if not (record_path.is_file() and (run_dir / f"{v.name}_mixed_precision.yaml").is_file()):
        return None
    record = read_json_object(record_path, CheckpointError, "a sensitivity record")
    cfg = v.mixed_precision
    same = record.get("budget_bits") == cfg.budget_bits and record.get("candidates") == sorted(set(cfg.candidates))
    if not isinstance(record.get("chosen"), dict) or not same:
        return None  # measured without a budget (qatkit sensitivity) or under other settings: measure again
    return variant_quant(run_dir, v), record


def write_choice(out: Path, variant: str, quant: QuantRecipe, record: dict) -> Path:
    """``OUT/<variant>_mixed_precision.yaml`` (the quant section to reuse) and ``..._sensitivity.json``."""
    path = out / f"{variant}_mixed_precision.yaml"
    text = yaml.safe_dump({"quant": quant.model_dump(mode="json", exclude_defaults=True)}, sort_keys=False)
    atomic_write_bytes(path, text.encode())
    atomic_write_bytes(out / f"{variant}_sensitivity.json", json.dumps(record, indent=1).encode())
    plot_sensitivity(record, out / f"{variant}_sensitivity.png")
    return path


def plot_sensitivity(record: dict, path: Path) -> Path:
    """Divergence per layer (x, in model order) at each candidate width (one line each, log scale), the chosen
    width of each layer marked: ``<variant>_sensitivity.png``."""
    from matplotlib.figure import Figure

    names = [s["name"] for s in record["layers"]]
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 4.0))
    ax = fig.add_subplot()
    for b in record["candidates"]:
        ax.plot(range(len(names)), [max(s["divergence"][str(b)], 1e-12) for s in record["layers"]], "o-",
                label=f"{b}-bit")  # fmt: skip
    chosen = record.get("chosen", {})
    if chosen:
        ys = [max(s["divergence"][str(chosen[s["name"]])], 1e-12) for s in record["layers"]]
        ax.plot(range(len(names)), ys, "k*", markersize=12, label="chosen")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("divergence from float (layer alone quantized)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def sensitivity_lines(record: dict) -> list[str]:
    """The report's sensitivity table: divergence per layer and width, the chosen width marked."""
    cands, chosen = record["candidates"], record.get("chosen", {})
    head = (
        f"Chosen widths: {record['average_bits']:.2f} bits per weight on average (budget {record['budget_bits']:g}); "
        "* marks them. "
        if chosen
        else ""
    )
    lines = [head + "Divergence from the float model (KL at T=1; MSE for regression) when the layer alone has its "
             f"weights quantized; float {record.get('float_metric', 0):.4f} on the held-out rows.", "",
             "| layer | weights | " + " | ".join(f"{b}-bit" for b in cands) + " |",
             "|---|---|" + "---|" * len(cands)]  # fmt: skip
    for s in record["layers"]:
        cells = [f"{s['divergence'][str(b)]:.4g}{'*' if chosen.get(s['name']) == b else ''}" for b in cands]
        lines.append(f"| {s['name']} | {s['weights']:,} | " + " | ".join(cells) + " |")
    return lines


def sensitivity_of_run(run_dir: str | Path, variant: str | None, candidates: list[int], budget: float | None,
                       rows: int) -> tuple[Path, dict]:  # fmt: skip
    """``qatkit sensitivity``: measure a finished run's float model under a variant's rules; with ``budget``,
    choose widths and write them as a recipe. Returns the markdown file written and the record."""
    from qatkit.base.config import RecipeError
    from qatkit.runner.export_run import load_run

    run_dir = Path(run_dir)
    recipe, data, task, fp32 = load_run(run_dir)
    names = [v.name for v in recipe.variants]
    name = variant or names[0]
    if name not in names:
        raise RecipeError(f"--variant {name!r}: the run's variants are {', '.join(names)}")
    quant = next(v.quant for v in recipe.variants if v.name == name)
    rep = layer_sensitivity(fp32, quant, data, task, sorted(set(candidates)), rows, recipe.seed)
    record = rep.to_dict()
    if budget is not None:
        bits = choose_bits(rep, budget)
        record.update(budget_bits=budget, chosen=bits, average_bits=average_bits(rep, bits))
        write_choice(run_dir, name, mixed_recipe(fp32, quant, bits), record)
    else:
        atomic_write_bytes(run_dir / f"{name}_sensitivity.json", json.dumps(record, indent=1).encode())
        plot_sensitivity(record, run_dir / f"{name}_sensitivity.png")
    md = run_dir / f"{name}_sensitivity.md"
    atomic_write_bytes(md, ("\n".join([f"# Sensitivity: {name}", "", *sensitivity_lines(record)]) + "\n").encode())
    return md, record
