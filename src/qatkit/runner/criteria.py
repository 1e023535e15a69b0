"""The recipe's success criteria judged on a run's report: one verdict per model or file a criterion covers.

Drops are in points of the task's primary metric (x100: accuracy in percent, R² x 100); sizes are ratios to the
float file of the same format. A run that misses a criterion exits 1 after writing its report, like parity.
"""

from __future__ import annotations

from qatkit.recipe.checks import Criteria


class CriteriaError(RuntimeError):
    """A run that missed one of its recipe's success criteria (the report is written first)."""


def judge(report) -> list[dict]:
    """Verdicts for the criteria in ``report.recipe`` (a Report; nothing when the recipe sets none)."""
    crit = Criteria.model_validate(report.recipe.get("criteria") or {})
    if not crit.any():
        return []
    task, out = report.task, []
    fp32 = report.find("fp32", "fp32", "pytorch")
    for r in report.rows:
        if r.runtime == "pytorch" and r.stage == "qat" and crit.max_qat_drop is not None and fp32 is not None:
            drop = 100 * task.primary_drop(fp32.metrics, r.metrics)
            out.append(_verdict("max_qat_drop", f"{r.label} vs fp32", drop, crit.max_qat_drop))
        if r.runtime == "pytorch" or r.variant == "fp32" or (crit.precisions and r.precision not in crit.precisions):
            continue
        where = f"{r.label} {r.format} {r.precision}"
        src = report.find(r.variant, r.stage, "pytorch")
        if crit.max_export_drop is not None and r.metrics is not None and src is not None:
            drop = 100 * task.primary_drop(src.metrics, r.metrics)
            out.append(_verdict("max_export_drop", f"{where} vs PyTorch", drop, crit.max_export_drop))
        ref = report.float_reference(r)
        if crit.max_size_ratio is not None and ref is not None and r.size_bytes and ref.size_bytes:
            ratio = r.size_bytes / ref.size_bytes
            out.append(
                _verdict("max_size_ratio", f"{where} vs {ref.format} {ref.precision}", ratio, crit.max_size_ratio)
            )
    if crit.no_collapse:
        for stage, summary in report.training.items():
            if "_qat" not in stage:  # the float stage's guard is not the quantized model's stability
                continue
            n = sum("collapse" in str(i.get("kind", "")) for i in summary.get("interventions", []))
            out.append(_verdict("no_collapse", stage, n, 0))
    return out


def _verdict(name: str, where: str, value: float, limit: float) -> dict:
    return {"criterion": name, "where": where, "value": float(value), "limit": float(limit), "passed": value <= limit}


def missed(verdicts: list[dict]) -> list[str]:
    """One phrase per failed verdict (for the error line and the report)."""
    return [f"{v['criterion']} {v['where']}: {shown(v)} > {v['limit']:g}" for v in verdicts if not v["passed"]]


def shown(v: dict) -> str:
    return f"{v['value']:.3f}" if v["criterion"] == "max_size_ratio" else f"{v['value']:.2f}"


def markdown(verdicts: list[dict]) -> list[str]:
    """The report's "Criteria" section."""
    if not verdicts:
        return []
    ok = sum(v["passed"] for v in verdicts)
    lines = ["", "## Criteria", "", f"{ok} of {len(verdicts)} met.", "", "| criterion | where | value | limit | verdict |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {v['criterion']} | {v['where']} | {shown(v)} | {v['limit']:g} | {'met' if v['passed'] else 'MISSED'} |"
              for v in verdicts]  # fmt: skip
    return lines
