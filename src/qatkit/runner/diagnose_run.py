"""``qatkit diagnose``: where a run's exported file departs from the model it was made from, layer by layer.

Writes ``RUN_DIR/diagnose/<file stem>.md`` (the table), ``.json`` (every number) and ``.png`` (difference by depth).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from qatkit.base.batch import rows as take_rows
from qatkit.components.splits import all_inputs
from qatkit.export.diagnose import ONE_STEP, LayerDiff, compare_layers, diffs_to_dicts, first_over_one_step
from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.recipe import RecipeError
from qatkit.runner.export_run import load_run, stage_model
from qatkit.runner.outdir import inside, run_lock

FORMATS = ("onnx",)
"""Formats whose files can be diagnosed (LiteRT's per-tensor capture is not built yet)."""


def diagnose_run(
    run_dir: str | Path, variant: str | None = None, stage: str = "qat", fmt: str = "onnx", rows: int = 512
) -> tuple[Path, list[LayerDiff]]:
    """Compare each quantized layer's output in ``RUN_DIR/<fmt>/<variant>_<stage>.<fmt>`` with the run's PyTorch
    model on ``rows`` test rows; returns the markdown file written and the per-layer differences."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise RecipeError(f"--format {fmt!r}: diagnose reads {', '.join(FORMATS)} files (LiteRT is not supported yet)")
    if stage not in ("ptq", "qat"):
        raise RecipeError(f"--stage {stage!r}: allowed ptq, qat")
    recipe, data, _, fp32 = load_run(run_dir)
    names = [v.name for v in recipe.variants]
    name = variant or names[0]
    if name not in names:
        raise RecipeError(f"--variant {name!r}: the run's variants are {', '.join(names)}")
    path = run_dir / fmt / f"{name}_{stage}.{fmt}"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (export it first: qatkit export {run_dir} -f {fmt})")
    v = next(v for v in recipe.variants if v.name == name)
    model = stage_model(run_dir, v, stage, copy.deepcopy(fp32))
    spec, x = all_inputs(data.test)
    x = take_rows(x, 0, min(rows, len(next(iter(x.values())))))
    diffs = compare_layers(model, path, spec, x)
    with run_lock(run_dir):
        return write_diagnosis(run_dir, path, diffs), diffs


def write_diagnosis(run_dir: Path, path: Path, diffs: list[LayerDiff]) -> Path:
    """The table, the numbers and the plot for one file under ``run_dir/diagnose/``."""
    folder = inside(run_dir, run_dir / "diagnose")
    folder.mkdir(exist_ok=True)
    stem = f"{path.stem}_{path.suffix.lstrip('.')}"
    md, js, png = (inside(run_dir, folder / f"{stem}.{ext}") for ext in ("md", "json", "png"))
    atomic_write_bytes(md, ("\n".join(diagnosis_lines(path.name, diffs)) + "\n").encode())
    atomic_write_bytes(js, json.dumps({"file": path.name, "layers": diffs_to_dicts(diffs)}, indent=1).encode())
    plot_diagnosis(diffs, png, path.name)
    return md


def diagnosis_lines(file: str, diffs: list[LayerDiff]) -> list[str]:
    """Markdown: the verdict (the first layer more than one step apart), then one row per layer in graph order."""
    first = first_over_one_step(diffs)
    verdict = (f"First layer more than one step apart: **{first.name}** ({first.max_steps:.3g} steps; {first.cause})."
               if first else "Every layer is within one output step of the PyTorch model.")  # fmt: skip
    lines = [f"# Diagnose: {file}", "", verdict, "",
             "Differences between the runtime and PyTorch on the same test rows, in units of each layer's output "
             "quantization step (1.0 = one step).", "",
             "| # | layer | max steps | mean steps | share > ½ step | cosine | step | cause |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, d in enumerate(diffs):
        mark = "**" if d.max_steps > ONE_STEP else ""
        lines.append(f"| {i} | {d.name} | {mark}{d.max_steps:.3g}{mark} | {d.mean_steps:.3g} | {d.off_share:.2%} | "
                     f"{d.cosine:.6f} | {d.step:.3g} ({d.step_kind}) | {d.cause} |")  # fmt: skip
    return lines


def plot_diagnosis(diffs: list[LayerDiff], path: Path, title: str) -> Path:
    """Max and mean difference (in steps) by depth, the one-step line drawn."""
    from matplotlib.figure import Figure

    names = [d.name for d in diffs]
    fig = Figure(figsize=(max(6.0, 0.4 * len(names) + 2), 3.8))
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.plot(xs, [max(d.max_steps, 1e-3) for d in diffs], "o-", label="max")
    ax.plot(xs, [max(d.mean_steps, 1e-3) for d in diffs], "s--", label="mean")
    ax.axhline(1.0, color="red", linewidth=0.8, label="one step")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("runtime − PyTorch (output steps)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
