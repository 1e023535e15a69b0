"""The cross-validation report: each fold's run report summarised in one aggregate table (mean ± std and the
worst fold of each metric, per model and per exported file, parity and criteria verdicts) and a per-fold table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.runner.artifacts import parity_failures
from qatkit.runner.criteria import judge, missed
from qatkit.runner.report import Report, Row


def row_key(r: Row) -> str:
    """A model or file across folds: ``fp32``, ``w8a8 qat``, ``w8a8 qat tflite int8``."""
    return r.label if r.runtime == "pytorch" else f"{r.label} {r.format} {r.precision}"


def spread(values: list[float], lower_better: bool, folds: list[str]) -> dict:
    """Mean, sample standard deviation and the worst fold of one metric."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    worst = max(range(n), key=lambda i: values[i] if lower_better else -values[i])
    return {"mean": mean, "std": std, "worst": values[worst], "worst_fold": folds[worst], "n": n}


@dataclass
class FoldsReport:
    """The folds' reports (by fold name, in fold order) and what each fold held out."""

    recipe: dict
    held_out: dict[str, str]
    reports: dict[str, Report]
    seconds: float = 0.0
    aggregate: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.aggregate = self._aggregate()

    @property
    def task(self):
        return next(iter(self.reports.values())).task

    def _aggregate(self) -> dict[str, dict]:
        """Per model/file: spread of every metric, agreement and size over the folds, and parity verdicts."""
        task, names, out = self.task, list(self.reports), {}
        keys = list(dict.fromkeys(row_key(r) for rep in self.reports.values() for r in rep.rows))
        for key in keys:
            rows = {f: next((r for r in rep.rows if row_key(r) == key), None) for f, rep in self.reports.items()}
            have = [f for f in names if rows[f] is not None]
            entry: dict = {"folds": len(have), "metrics": {}}
            metric_names = [m for m in (rows[have[0]].metrics or {}) if all(rows[f].metrics for f in have)]
            for m in metric_names:
                vals = [rows[f].metrics[m] for f in have]
                if all(isinstance(v, (int, float)) for v in vals):
                    entry["metrics"][m] = spread([float(v) for v in vals], m in task.lower_better, have)
            agree = [f for f in have if rows[f].agreement is not None]
            if agree:
                entry["agreement"] = spread([rows[f].agreement for f in agree], not task.classes, agree)
            sizes = [rows[f].size_bytes for f in have if rows[f].size_bytes]
            if sizes:
                entry["size_bytes"] = sum(sizes) / len(sizes)
            parity = [rows[f].parity for f in have if rows[f].parity is not None]
            if parity:
                entry["parity_ok"] = sum(p == "ok" or p.startswith("structure ok") for p in parity)
                entry["parity_of"] = len(parity)
            out[key] = entry
        return out

    def verdicts(self) -> list[dict]:
        """Every fold's criteria verdicts, with the fold named."""
        return [dict(v, fold=f) for f, rep in self.reports.items() for v in judge(rep)]

    def failures(self) -> tuple[list[str], list[str]]:
        """(parity failures, missed criteria), each naming the fold."""
        parity = [f"fold {f}: {p}" for f, rep in self.reports.items() for p in parity_failures(rep)]
        crit = [f"fold {f}: {m}" for f, rep in self.reports.items() for m in missed(judge(rep))]
        return parity, crit

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "seconds": self.seconds, "held_out": self.held_out,
                "folds": {f: f"folds/{f}/report.json" for f in self.reports}, "aggregate": self.aggregate,
                "per_fold": self.per_fold(), "criteria": self.verdicts()}  # fmt: skip

    def per_fold(self) -> dict[str, dict[str, float]]:
        """The primary metric of every model and file in every fold."""
        key = self.task.primary
        return {f: {row_key(r): r.metrics[key] for r in rep.rows if r.metrics and key in r.metrics}
                for f, rep in self.reports.items()}  # fmt: skip

    def write(self, out: Path) -> None:
        from qatkit.runner.fold_html import write_folds_html

        atomic_write_bytes(out / "report.json", json.dumps(self.to_dict(), indent=2).encode())
        atomic_write_bytes(out / "report.md", self.to_markdown().encode())
        write_folds_html(self, out)

    def to_markdown(self) -> str:
        from qatkit.runner.fold_markdown import folds_markdown

        return folds_markdown(self)
