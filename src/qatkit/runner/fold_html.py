"""``report.html`` of a cross-validation run: one self-contained page with the verdict over all folds, the
aggregate and per-fold tables of report.md, links to each fold's own page, and plots across folds - the primary
metric of every model and file in every fold, metric against file size, mean per-class recall and confusion
matrices summed over the folds."""

from __future__ import annotations

import html
from pathlib import Path

from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.runner import fold_markdown as tables
from qatkit.runner import html_report as h
from qatkit.runner.fold_report import FoldsReport, row_key


def write_folds_html(rep: FoldsReport, out: Path) -> Path:
    """``out/report.html`` for a cross-validation run (fold pages stay at ``out/folds/<fold>/report.html``)."""
    key = rep.task.primary
    parts = [*verdict(rep), "<h2>Aggregate</h2>",
             f"<p>{html.escape(tables.scheme(rep))}, {len(rep.reports)} folds, {rep.seconds:.0f} s. Mean ± standard "
             f"deviation over folds and the worst fold of {html.escape(key)}, agreement with the source model and "
             "parity.</p>", h.table(*tables.aggregate_table(rep)), "<h2>Per fold</h2>", h.table(*tables.per_fold_table(rep)),
             "<p>Each fold's own page: " + ", ".join(f"<a href='folds/{html.escape(f)}/report.html'>{html.escape(f)}"
                                                     "</a>" for f in rep.reports) + "</p>"]  # fmt: skip
    crit = tables.criteria_table(rep)
    if crit[1]:
        parts += ["<h2>Criteria</h2>", h.table(*crit)]
    parts.append("<h2>Plots</h2>")
    parts += [h.figure(plot, caption, png) for plot, caption, png in fold_plots(rep)]
    path = out / "report.html"
    atomic_write_bytes(path, h.page(f"qatkit cross-validation report: {rep.recipe.get('name', 'run')}", parts).encode())
    return path


def verdict(rep: FoldsReport) -> list[str]:
    """Parity and criteria over every fold, before anything else."""
    failures = tables.failure_lines(rep)
    verdicts = rep.verdicts()
    files = sum(e.get("parity_of", 0) for e in rep.aggregate.values())
    if failures:
        items = "".join(f"<li>{html.escape(f)}</li>" for f in failures)
        head = f"<p class='bad'>{len(failures)} failures over {len(rep.reports)} folds:</p><ul>{items}</ul>"
    else:
        head = f"<p class='ok'>All {files} exported files of {len(rep.reports)} folds passed parity"
        head += f"; all {len(verdicts)} criterion checks were met.</p>" if verdicts else ".</p>"
    return ["<h2>Verdict</h2>", head]


def fold_plots(rep: FoldsReport) -> list[tuple[str, str, bytes]]:
    """(name, caption, PNG) of every plot the folds have data for."""
    found = [("metric-by-fold", f"{rep.task.primary} of every model and file in every fold (dots) with the mean "
              "± standard deviation over folds (bars).", by_fold_png(rep)),
             ("metric-vs-size", "Mean metric over folds against mean file size, ± one standard deviation.",
              size_png(rep)),
             ("per-class-recall", "Per-class recall averaged over folds: the float model and each integer file.",
              recall_png(rep)),
             ("confusion", "Confusion matrices summed over folds (every row held out once): the float model and the "
              "deployed file.", confusion_png(rep))]  # fmt: skip
    return [f for f in found if f[2] is not None]


def by_fold_png(rep: FoldsReport) -> bytes | None:
    """One column per model/file: each fold's value as a dot, the mean ± std as an error bar."""
    from matplotlib.figure import Figure

    per_fold, scale = rep.per_fold(), tables.percent(rep)
    cols = [c for c in rep.aggregate if any(c in v for v in per_fold.values())]
    if not cols:
        return None
    fig = Figure(figsize=(max(6.0, 0.45 * len(cols) + 2), 4.2))
    ax = fig.add_subplot()
    for fold, values in per_fold.items():
        pts = [(i, scale * values[c]) for i, c in enumerate(cols) if c in values]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", alpha=0.6, label=f"fold {fold}")
    for i, c in enumerate(cols):
        m = rep.aggregate[c]["metrics"].get(rep.task.primary)
        if m:
            ax.errorbar([i + 0.25], [scale * m["mean"]], yerr=[scale * m["std"]], fmt="ks", capsize=3)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel(rep.task.primary + (" (%)" if scale == 100 else ""))
    ax.legend(fontsize=6)
    return h.png_bytes(fig)


def size_png(rep: FoldsReport) -> bytes | None:
    key = rep.task.primary
    pts = [(e["size_bytes"] / 1024, e["metrics"][key]["mean"], e["metrics"][key]["std"], name)
           for name, e in rep.aggregate.items() if e.get("size_bytes") and key in e["metrics"]]  # fmt: skip
    return h.metric_size_plot(pts, key) if pts else None


def recall_png(rep: FoldsReport) -> bytes | None:
    """Mean per-class recall over the folds where a model/file has it."""
    series: dict[str, list[list[float]]] = {}
    for r in (r for report in rep.reports.values() for r in report.rows):
        if r.metrics and "per_class_recall" in r.metrics and h.recall_shown(r):
            series.setdefault(row_key(r), []).append(r.metrics["per_class_recall"])
    if not series:
        return None
    means = [(k, [sum(c) / len(c) for c in zip(*v, strict=True)]) for k, v in series.items()]
    n = len(means[0][1])
    names = next(iter(rep.reports.values())).class_names or [str(i) for i in range(n)]
    return h.recall_plot(means, names[:n])


def confusion_png(rep: FoldsReport) -> bytes | None:
    """The float model's and the deployed file's confusion matrices, each summed over the folds."""
    pairs = []
    for pick in (lambda report: report.find("fp32", "fp32", "pytorch"), h.deployed):
        picked = [pick(report) for report in rep.reports.values()]
        mats = [r.metrics["confusion"] for r in picked if r is not None and r.metrics and "confusion" in r.metrics]
        if len(mats) == len(picked) and mats:
            total = [[sum(m[i][j] for m in mats) for j in range(len(mats[0]))] for i in range(len(mats[0]))]
            pairs.append((row_key(picked[0]), total))
    if not pairs:
        return None
    n = len(pairs[0][1])
    return h.confusion_plot(pairs, (next(iter(rep.reports.values())).class_names or [str(i) for i in range(n)])[:n])
