"""``report.html``: the run's report as one self-contained page (plots inline as PNG data, no network): the
verdict first, then every row with its size and latency, then the plots - training curves per stage with the
guards' interventions and the stage boundaries, the task metric against file size, per-class recall,
sensitivity and the layer-by-layer diagnoses of exported files."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.runner.criteria import judge, shown
from qatkit.runner.report import Report

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:left}th{background:#f3f3f3}.ok{color:#186a1e}.bad{color:#b00020;font-weight:bold}
figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}img{max-width:100%}"""

CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('img[data-plot]')];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.dataset.plot);
  document.body.dataset.plots = imgs.length;
  document.body.dataset.broken = broken.join(',');
  document.body.dataset.loaded = 'yes';
});
</script>"""
"""Marks the page once loaded: how many plots it holds and which failed to decode (read by the browser test)."""


def write_html(report: Report, out: Path) -> Path:
    """``out/report.html`` for ``report`` (the run folder supplies the training CSVs and plots on disk)."""
    parts = [*verdict(report), *rows_table(report), "<h2>Plots</h2>"]
    parts += [figure(plot, caption, png) for plot, caption, png in plots(report, out)]
    path = out / "report.html"
    atomic_write_bytes(path, page(f"qatkit report: {report.recipe.get('name', 'run')}", parts).encode())
    return path


def verdict(report: Report) -> list[str]:
    """Parity of every exported file, the recipe's criteria and the warnings, before anything else."""
    failed = [r for r in report.rows if r.parity and r.parity.startswith("failed")]
    exported = [r for r in report.rows if r.parity]
    if not exported:
        head = "<p>No exported files.</p>"
    elif failed:
        items = "".join(f"<li>{html.escape(f'{r.label} {r.format} {r.precision}: {r.parity}')}</li>" for r in failed)
        head = f"<p class='bad'>{len(failed)} of {len(exported)} exported files failed parity:</p><ul>{items}</ul>"
    else:
        head = f"<p class='ok'>All {len(exported)} exported files passed parity.</p>"
    lines = ["<h2>Verdict</h2>", head]
    crit = judge(report)
    if crit:
        items = "".join(f"<li class='{'ok' if v['passed'] else 'bad'}'>{html.escape(v['criterion'])} "
                        f"{html.escape(v['where'])}: {shown(v)} (limit {v['limit']:g}) "
                        f"{'met' if v['passed'] else 'MISSED'}</li>" for v in crit)  # fmt: skip
        lines.append(f"<p>Criteria: {sum(v['passed'] for v in crit)} of {len(crit)} met.</p><ul>{items}</ul>")
    if report.warnings():
        items = "".join(f"<li>{html.escape(w)}</li>" for w in report.warnings())
        lines.append(f"<p>Warnings:</p><ul>{items}</ul>")
    return lines


def rows_table(report: Report) -> list[str]:
    """Every stage and file with all columns of report.md."""
    return ["<h2>Stages and files</h2>", table(report.header(), report.table_rows())]


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of text cells (escaped)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: list[str]) -> str:
    """A whole self-contained page: the style, ``body`` and the load check."""
    t = html.escape(title)
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{t}</title>",
                      f"<style>{STYLE}</style></head><body><h1>{t}</h1>", *body, CHECK_SCRIPT, "</body></html>"])  # fmt: skip


def figure(plot: str, caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return (f"<figure><img data-plot='{html.escape(plot)}' alt='{html.escape(caption)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip


def plots(report: Report, out: Path) -> list[tuple[str, str, bytes]]:
    """(name, caption, PNG bytes) of every plot the run has data for."""
    found = [("training", "Training curves per stage: train loss and the monitored validation metric; dashed lines "
              "mark stage boundaries, red crosses the guards' interventions.", training_png(report, out)),
             ("metric-vs-size", "The task's headline metric against file size, for every stage and file.",
              metric_size_png(report)),
             ("per-class-recall", "Per-class recall of the float model and of each integer file.", recall_png(report)),
             ("confusion", "Confusion matrices (rows: true class) of the float model and of the deployed file: the "
              "first integer file of the last QAT stage.", confusion_png(report)),
             ("layer-error", "Weight quantization error per layer (RMS error over RMS weight) of each variant's "
              "quantized model.", layer_error_png(report))]  # fmt: skip
    found = [f for f in found if f[2] is not None]
    for png in sorted(out.glob("*_sensitivity.png")):
        found.append((f"sensitivity:{png.stem}", f"Sensitivity by layer and width ({png.name}).", png.read_bytes()))
    for png in sorted((out / "diagnose").glob("*.png")):
        found.append((f"diagnose:{png.stem}", f"Runtime against PyTorch by layer ({png.name}).", png.read_bytes()))
    return found


def png_bytes(fig) -> bytes:
    """PNG bytes of ``fig`` with fixed margins (matplotlib's automatic layout costs more than the drawing)."""
    buf = io.BytesIO()
    fig.subplots_adjust(left=0.11, right=0.9, bottom=0.24, top=0.9, wspace=0.3)
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def training_png(report: Report, out: Path) -> bytes | None:
    """All stages one after another on one epoch axis: train loss (left) and the first validation metric
    (right); a dashed line at each stage boundary, a red cross at each intervention."""
    from matplotlib.figure import Figure

    stages = [(s, out / f"{s}_train.csv") for s in report.training if (out / f"{s}_train.csv").is_file()]
    if not stages:
        return None
    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    offset, val_key = 0, None
    for stage, path in stages:
        rows = _read_csv(path)
        val_key = val_key or next((k for k in rows[0] if k.startswith("val_")), None) if rows else val_key
        ep = [offset + int(r["epoch"]) for r in rows if r.get("train_loss")]
        ax.plot(ep, [float(r["train_loss"]) for r in rows if r.get("train_loss")], ".-", color="tab:blue")
        if val_key:
            pts = [(offset + int(r["epoch"]), float(r[val_key])) for r in rows if r.get(val_key)]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], ".-", color="tab:orange")
        for i in report.training[stage].get("interventions", []):
            if isinstance(i, dict) and i.get("epoch") is not None:
                ax.axvline(offset + int(i["epoch"]), color="red", linewidth=0.6)
                ax.plot([offset + int(i["epoch"])], [ax.get_ylim()[1]], "rx")
        ax.text(offset + 0.2, 0.98, stage, transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        offset += max([int(r["epoch"]) for r in rows] or [0]) + 1
        ax.axvline(offset - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("epoch (stages in order)")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2.set_ylabel(val_key or "validation", color="tab:orange")
    return png_bytes(fig)


def metric_size_png(report: Report) -> bytes | None:
    """Headline metric (y) against size in KiB (x, log), one labelled point per row with both."""
    key = report.task.primary
    pts = [(r.size_bytes / 1024, r.metrics[key], 0.0, f"{r.label} {r.format} {r.precision or ''}".strip())
           for r in report.rows if r.size_bytes and r.metrics and key in r.metrics]  # fmt: skip
    return metric_size_plot(pts, key) if pts else None


def metric_size_plot(pts: list[tuple[float, float, float, str]], key: str) -> bytes:
    """Labelled points (size KiB, metric, its error bar, label) on a log size axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    for x, y, err, label in pts:
        ax.errorbar([x], [y], yerr=[err] if err else None, fmt="o", capsize=3)
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("size (KiB)")
    ax.set_ylabel(key)
    return png_bytes(fig)


def recall_png(report: Report) -> bytes | None:
    """Per-class recall bars: the float model and every integer file that ran."""
    rows = [r for r in report.rows if r.metrics and "per_class_recall" in r.metrics and recall_shown(r)]
    if not rows:
        return None
    n = len(rows[0].metrics["per_class_recall"])
    names = report.class_names or [str(i) for i in range(n)]
    return recall_plot([(f"{r.label} {r.format}", r.metrics["per_class_recall"]) for r in rows], names[:n])


def recall_shown(r) -> bool:
    """Rows whose per-class recall is plotted: the float model and integer files."""
    return r.variant == "fp32" and r.runtime == "pytorch" or r.precision in ("int8", "packed-int4")


def recall_plot(series: list[tuple[str, list[float]]], names: list[str]) -> bytes:
    """Grouped bars: one group per class, one bar per (label, recall per class)."""
    from matplotlib.figure import Figure

    n = len(names)
    fig = Figure(figsize=(max(6.0, 0.5 * n * len(series) / 3 + 3), 3.8))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (label, recall) in enumerate(series):
        ax.bar([i + j * width for i in range(n)], recall, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(n)], names, fontsize=7, rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.legend(fontsize=6)
    return png_bytes(fig)


def deployed(report: Report):
    """The file a user ships: the first integer file of the last variant's QAT (else PTQ) stage that ran."""
    ran = [r for r in report.rows if r.runtime != "pytorch" and r.metrics and r.variant != "fp32"
           and r.precision not in (None, "fp32", "fp16")]  # fmt: skip
    for stage in ("qat", "ptq"):
        rows = [r for r in ran if r.stage == stage]
        if rows:
            return [r for r in rows if r.variant == rows[-1].variant][0]
    return None


def confusion_png(report: Report) -> bytes | None:
    """The float model's confusion matrix next to the deployed file's, as counts with a shared colour scale."""
    fp32, chosen = report.find("fp32", "fp32", "pytorch"), deployed(report)
    pairs = [(f"fp32 {r.format}" if r is fp32 else f"{r.label} {r.format} {r.precision}", r.metrics["confusion"])
             for r in (fp32, chosen) if r is not None and r.metrics and "confusion" in r.metrics]  # fmt: skip
    if not pairs:
        return None
    n = len(pairs[0][1])
    return confusion_plot(pairs, (report.class_names or [str(i) for i in range(n)])[:n])


def confusion_plot(pairs: list[tuple[str, list[list[int]]]], names: list[str]) -> bytes:
    """Confusion matrices (title, counts) side by side, one colour scale."""
    from matplotlib.figure import Figure

    n = len(names)
    top = max(max(max(row) for row in m) for _, m in pairs) or 1
    fig = Figure(figsize=(4.2 * len(pairs) + 0.5, 4.0))
    for k, (title, m) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), k + 1)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=top)
        for i in range(n):
            for j in range(n):
                if n <= 12:
                    ax.text(j, i, str(m[i][j]), ha="center", va="center", fontsize=6,
                            color="white" if m[i][j] > top / 2 else "black")  # fmt: skip
        ax.set_xticks(range(n), names, fontsize=6, rotation=45)
        ax.set_yticks(range(n), names, fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_title(title, fontsize=8)
    return png_bytes(fig)


def layer_error_png(report: Report) -> bytes | None:
    """One line per variant (its QAT model, else PTQ): weight quantization error by layer in model order."""
    from matplotlib.figure import Figure

    series = []
    for v, info in report.layers.items():
        errors = info.get("weight_error", {}) if isinstance(info, dict) else {}
        stage = "qat" if errors.get("qat") else "ptq"
        if errors.get(stage):
            series.append((f"{v} {stage}", errors[stage]))
    if not series:
        return None
    names = list(dict.fromkeys(n for _, e in series for n in e))
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 3.8))
    ax = fig.add_subplot()
    for label, e in series:
        ax.plot([i for i, n in enumerate(names) if n in e], [max(e[n], 1e-9) for n in names if n in e], "o-",
                label=label)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("RMS error / RMS weight")
    ax.legend(fontsize=6)
    return png_bytes(fig)
