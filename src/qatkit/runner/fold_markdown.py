"""The tables of a cross-validation report (aggregate, per fold, criteria, failures) as header + rows of text,
and report.md built from them (report.html renders the same tables: runner/fold_html.py)."""

from __future__ import annotations

from collections import defaultdict

Table = tuple[list[str], list[list[str]]]
"""A header and its rows, as text cells."""


def scheme(rep) -> str:
    """How the folds were made, in words."""
    cv = rep.recipe.get("cv") or {}
    return "leave-one-group-out" if cv.get("by") == "group" else f"stratified {cv.get('k')}-fold"


def percent(rep) -> float:
    """100 for a metric shown in percent (higher is better), else 1."""
    return 100.0 if rep.task.primary not in rep.task.lower_better else 1.0


def aggregate_table(rep) -> Table:
    """Per model and file: mean ± std and the worst fold of the primary metric and of agreement, size, parity."""
    task, key, scale = rep.task, rep.task.primary, percent(rep)
    header = ["model / file", f"{key} mean ± std", "worst (fold)", "agreement mean", "agreement worst (fold)", "size",
              "parity"]  # fmt: skip
    rows = []
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
        rows.append([name, shown, worst, agree, a_worst, size, parity])
    return header, rows


def per_fold_table(rep) -> Table:
    """The primary metric of each model and file in each fold, with what the fold held out."""
    table, cols, scale = rep.per_fold(), list(rep.aggregate), percent(rep)
    rows = [[f, rep.held_out.get(f, ""), *[f"{scale * values[c]:.2f}" if c in values else "" for c in cols]]
            for f, values in table.items()]  # fmt: skip
    return ["fold", "held out", *cols], rows


def criteria_table(rep) -> Table:
    """Each criterion and where it applies: in how many folds it was met, and its worst fold."""
    by = defaultdict(list)
    for v in rep.verdicts():
        by[(v["criterion"], v["where"])].append(v)
    rows = []
    for (crit, where), vs in by.items():
        worst = max(vs, key=lambda v: v["value"])
        fmt = ".3f" if crit == "max_size_ratio" else ".2f"
        rows.append([crit, where, f"{sum(v['passed'] for v in vs)}/{len(vs)}",
                     f"{worst['value']:{fmt}} ({worst['fold']})", f"{worst['limit']:g}"])  # fmt: skip
    return ["criterion", "where", "met in folds", "worst value (fold)", "limit"], rows


def failure_lines(rep) -> list[str]:
    """Every parity failure and missed criterion, naming the fold."""
    parity, crit = rep.failures()
    return [*[f"parity: {p}" for p in parity], *[f"criterion missed: {c}" for c in crit]]


def markdown_table(table: Table) -> list[str]:
    header, rows = table
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def folds_markdown(rep) -> str:
    """The whole report.md of a FoldsReport."""
    key, scale = rep.task.primary, percent(rep)
    unit = " (%)" if scale == 100 else ""
    lines = [f"# qatkit cross-validation report: {rep.recipe.get('name', 'run')}", "",
             (rep.recipe.get("description") or "").strip(), "",
             f"{scheme(rep)}, {len(rep.reports)} folds (each fold's full report: `folds/<fold>/report.md`); "
             f"{rep.seconds:.0f} s.", "", "## Aggregate", "",
             f"Mean ± standard deviation over folds, and the worst fold, of {key}{unit}, agreement with the source "
             "model and parity.", "", *markdown_table(aggregate_table(rep)),
             "", "## Per fold", "", f"{key}{unit} of each model and file.", "", *markdown_table(per_fold_table(rep))]  # fmt: skip
    crit = criteria_table(rep)
    if crit[1]:
        lines += ["", "## Criteria", "", *markdown_table(crit)]
    if failure_lines(rep):
        lines += ["", "## Failures", "", *[f"- {f}" for f in failure_lines(rep)]]
    return "\n".join(lines) + "\n"
