"""A diagnosis on disk: the per-layer differences of one exported file as a markdown table, JSON and a plot
of the difference by depth under ``RUN_DIR/diagnose/`` (written by ``qatkit diagnose`` and by verification)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from qatkit.export.diagnose import ONE_STEP, Diagnosis, LayerDiff, first_over_one_step
from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.runner.outdir import inside


def summary(diag: Diagnosis) -> str:
    """One line: the first layer more than one step apart and why, or that every layer is within one step."""
    first = first_over_one_step(diag.layers)
    if first is None:
        return "every layer within one output step"
    return f"first layer more than one step apart: {first.name} ({first.max_steps:.3g} steps; {first.cause})"


def write_diagnosis(run_dir: Path, path: Path, diag: Diagnosis) -> Path:
    """The table, the numbers and the plot for one file under ``run_dir/diagnose/``."""
    folder = inside(run_dir, run_dir / "diagnose")
    folder.mkdir(exist_ok=True)
    stem = f"{path.stem}_{path.suffix.lstrip('.')}"
    md, js, png = (inside(run_dir, folder / f"{stem}.{ext}") for ext in ("md", "json", "png"))
    atomic_write_bytes(md, ("\n".join(diagnosis_lines(path.name, diag)) + "\n").encode())
    atomic_write_bytes(js, json.dumps({"file": path.name, **asdict(diag)}, indent=1).encode())
    plot_diagnosis(diag.layers, png, path.name)
    return md


OPTIONAL = {"plain_max_steps": ("unfused", "the max with the runtime's graph optimisations off"),
            "own_max_steps": ("alone", "the max of the PyTorch layer fed the runtime's own input to it (the "
                              "layer's own part; the rest is inherited)")}  # fmt: skip
"""Per-layer numbers some runtimes give: column title and what it means."""


def diagnosis_lines(file: str, diag: Diagnosis) -> list[str]:
    """Markdown: the verdict (the first layer more than one step apart), then one row per layer in graph order."""
    first = first_over_one_step(diag.layers)
    verdict = (f"First layer more than one step apart: **{first.name}** ({first.max_steps:.3g} steps; {first.cause})."
               if first else "Every layer is within one output step of the PyTorch model.")  # fmt: skip
    extra = [k for k in OPTIONAL if any(getattr(d, k) is not None for d in diag.layers)]
    meaning = "".join(f"; *{OPTIONAL[k][0]}*: {OPTIONAL[k][1]}" for k in extra)
    lines = [f"# Diagnose: {file}", "", verdict, "", f"Runtime: {diag.runtime}.", *[f"- {n}" for n in diag.notes],
             "", "Differences between the runtime and PyTorch on the same test rows, in units of each layer's output "
             f"quantization step (1.0 = one step){meaning}.", "",
             "| # | layer | max steps | mean steps | share > ½ step | cosine | step | "
             + "".join(f"{OPTIONAL[k][0]} | " for k in extra) + "cause |",
             "|---|---|---|---|---|---|---|" + "---|" * len(extra) + "---|"]  # fmt: skip
    for i, d in enumerate(diag.layers):
        mark = "**" if d.max_steps > ONE_STEP else ""
        cells = "".join(f" {_num(getattr(d, k))} |" for k in extra)
        lines.append(f"| {i} | {d.name} | {mark}{d.max_steps:.3g}{mark} | {d.mean_steps:.3g} | {d.off_share:.2%} | "
                     f"{d.cosine:.6f} | {d.step:.3g} ({d.step_kind}) |{cells} {d.cause} |")  # fmt: skip
    return lines


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def plot_diagnosis(diffs: list[LayerDiff], path: Path, title: str) -> Path:
    """Max and mean difference (in steps) by depth, the one-step line drawn."""
    from matplotlib.figure import Figure

    names = [d.name for d in diffs]
    fig = Figure(figsize=(max(6.0, 0.4 * len(names) + 2), 3.8))
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.plot(xs, [max(d.max_steps, 1e-3) for d in diffs], "o-", label="max")
    ax.plot(xs, [max(d.mean_steps, 1e-3) for d in diffs], "s--", label="mean")
    for key, marker in zip(OPTIONAL, ("^:", "v:"), strict=True):
        if any(getattr(d, key) is not None for d in diffs):
            ax.plot(xs, [max(getattr(d, key) or 0.0, 1e-3) for d in diffs], marker, label=f"max, {OPTIONAL[key][0]}")
    ax.axhline(1.0, color="red", linewidth=0.8, label="one step")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("runtime − PyTorch (output steps)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
