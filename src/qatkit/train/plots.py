"""Loss curves from a run folder's training CSVs, drawn to a PNG so a run can be judged at a glance.

Reads the per-stage ``<stage>_train.csv`` / ``<stage>_steps.csv`` files written by :mod:`qatkit.train.logger`
and simple ``step,train_loss,eval_loss,...`` logs such as ``training_log.csv``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

CSV_PATTERNS = ("*train.csv", "*training_log.csv", "*_steps.csv")
TRAIN_COLUMNS = ("loss", "train_loss")
EVAL_COLUMNS = ("eval_loss", "val_loss")


def _find_csvs(run_dir: Path) -> list[tuple[str, list[Path]]]:
    """(label, files) per curve from ``run_dir`` and ``run_dir/logs``; ``<stage>_steps.csv`` joins ``<stage>_train.csv``."""
    groups: dict[Path, list[Path]] = {}
    for folder in (run_dir, run_dir / "logs"):
        files = sorted({p for pattern in CSV_PATTERNS for p in folder.glob(pattern) if p.is_file()})
        for p in files:
            if not p.name.endswith("_steps.csv"):
                groups.setdefault(p, []).append(p)
        for p in files:
            if p.name.endswith("_steps.csv"):
                partner = p.with_name(p.name[: -len("_steps.csv")] + "_train.csv")
                groups.setdefault(partner if partner in groups else p, []).insert(0, p)
    return [(key.stem, paths) for key, paths in groups.items()]


def _float(text: str | None) -> float | None:
    """A finite float from a CSV cell, or None for empty / non-numeric / non-finite cells."""
    if text is None or not text.strip():
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _series(rows: list[dict], columns: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """(steps, values) of the first of ``columns`` that has any value; rows with an empty cell are skipped."""
    for col in columns:
        steps, values = [], []
        for i, row in enumerate(rows):
            v = _float(row.get(col))
            if v is None:
                continue
            step = _float(row.get("step"))
            steps.append(step if step is not None else float(i))
            values.append(v)
        if values:
            return steps, values
    return [], []


def _ema(values: list[float]) -> list[float]:
    """Light exponential smoothing; short series (e.g. one row per epoch) are left as they are."""
    n = len(values)
    beta = 0.0 if n < 20 else 0.6 if n < 500 else 0.9
    out, s = [], values[0]
    for v in values:
        s = beta * s + (1.0 - beta) * v
        out.append(s)
    return out


def plot_loss(run_dir: Path, out: Path | None = None) -> Path:
    """Plot train loss (EMA line over faint raw points) and eval loss (markers) per CSV; returns the PNG path."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    csvs = _find_csvs(run_dir)
    if not csvs:
        raise ValueError(f"no training CSV ({', '.join(CSV_PATTERNS)}) in {run_dir} or {run_dir / 'logs'}")
    curves = []
    for label, paths in csvs:
        tables = []
        for path in paths:
            with path.open(newline="") as f:
                tables.append(list(csv.DictReader(f)))
        train = next((s for s in (_series(t, TRAIN_COLUMNS) for t in tables) if s[1]), ([], []))
        val = next((s for s in (_series(t, EVAL_COLUMNS) for t in tables) if s[1]), ([], []))
        if train[1] or val[1]:
            curves.append((label, train, val))
    if not curves:
        looked = ", ".join(TRAIN_COLUMNS + EVAL_COLUMNS)
        raise ValueError(f"no loss values in the training CSVs of {run_dir} (looked for columns {looked})")

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    all_values = []
    for i, (label, (t_steps, t_vals), (v_steps, v_vals)) in enumerate(curves):
        color = f"C{i % 10}"
        if t_vals:
            ax.plot(t_steps, t_vals, color=color, alpha=0.25, linewidth=0.8, marker="." if len(t_vals) < 50 else None)
            ax.plot(
                t_steps,
                _ema(t_vals),
                color=color,
                linewidth=1.6,
                marker="o" if len(t_vals) == 1 else None,
                label=f"{label} train",
            )
        if v_vals:
            ax.plot(v_steps, v_vals, color=color, linestyle="--", marker="o", markersize=4, label=f"{label} eval")
        all_values += t_vals + v_vals
    lo, hi = min(all_values), max(all_values)
    if lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.resolve().name}: loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
