"""report.md of a cross-validation run: the aggregate table, the per-fold table, criteria and parity by fold."""

from __future__ import annotations

from collections import defaultdict


def folds_markdown(rep) -> str:
    """The whole report.md of a FoldsReport."""
    task, key = rep.task, rep.task.primary
    scale = 100.0 if key not in task.lower_better else 1.0
    cv = rep.recipe.get("cv") or {}
    scheme = "leave-one-group-out" if cv.get("by") == "group" else f"stratified {cv.get('k')}-fold"
    lines = [f"# qatkit cross-validation report: {rep.recipe.get('name', 'run')}", "",
             (rep.recipe.get("description") or "").strip(), "",
             f"{scheme}, {len(rep.reports)} folds (each fold's full report: `folds/<fold>/report.md`); "
             f"{rep.seconds:.0f} s.", "", "## Aggregate", "",
             f"Mean ± standard deviation over folds, and the worst fold, of {key}"
             f"{' (%)' if scale == 100 else ''}, agreement with the source model and parity.", "",
             f"| model / file | {key} mean ± std | worst (fold) | agreement mean | agreement worst (fold) | size | parity |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in rep.aggregate.items():
        m = e["metrics"].get(key)
        shown = f"{scale * m['mean']:.2f} ± {scale * m['std']:.2f}" if m else "—"
        worst = f"{scale * m['worst']:.2f} ({m['worst_fold']})" if m else "—"
        a = e.get("agreement")
        a_scale = 100.0 if task.classes else 1.0
        agree = f"{a_scale * a['mean']:.2f}" if a else ""
        a_worst = f"{a_scale * a['worst']:.2f} ({a['worst_fold']})" if a else ""
        size = f"{e['size_bytes'] / 1024:.1f} KiB" if e.get("size_bytes") else ""
        parity = f"{e['parity_ok']}/{e['parity_of']} ok" if "parity_of" in e else ""
        lines.append(f"| {name} | {shown} | {worst} | {agree} | {a_worst} | {size} | {parity} |")
    lines += _per_fold(rep, key, scale) + _criteria(rep) + _failures(rep)
    return "\n".join(lines) + "\n"


def _per_fold(rep, key: str, scale: float) -> list[str]:
    table = rep.per_fold()
    cols = list(rep.aggregate)
    lines = ["", "## Per fold", "", f"{key}{' (%)' if scale == 100 else ''} of each model and file.", "",
             "| fold | held out | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]  # fmt: skip
    for f, values in table.items():
        cells = [f"{scale * values[c]:.2f}" if c in values else "" for c in cols]
        lines.append(f"| {f} | {rep.held_out.get(f, '')} | " + " | ".join(cells) + " |")
    return lines


def _criteria(rep) -> list[str]:
    verdicts = rep.verdicts()
    if not verdicts:
        return []
    by = defaultdict(list)
    for v in verdicts:
        by[(v["criterion"], v["where"])].append(v)
    lines = ["", "## Criteria", "", "| criterion | where | met in folds | worst value (fold) | limit |",
             "|---|---|---|---|---|"]  # fmt: skip
    for (crit, where), vs in by.items():
        worst = max(vs, key=lambda v: v["value"])
        fmt = ".3f" if crit == "max_size_ratio" else ".2f"
        lines.append(f"| {crit} | {where} | {sum(v['passed'] for v in vs)}/{len(vs)} | "
                     f"{worst['value']:{fmt}} ({worst['fold']}) | {worst['limit']:g} |")  # fmt: skip
    return lines


def _failures(rep) -> list[str]:
    parity, crit = rep.failures()
    if not parity and not crit:
        return []
    return ["", "## Failures", "", *[f"- parity: {p}" for p in parity], *[f"- criterion missed: {c}" for c in crit]]
