"""``qatkit export RUN_DIR``: write and verify exported files for a finished run, from its checkpoints.

The run's report.json gives the recipe; every stage checkpoint (fp32, each variant's ptq and qat) is loaded into
a model built and prepared as in the run, evaluated again on the test split (the reference for agreement), and
exported in the asked formats. Rows of those formats in the report are replaced; the rest are kept.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from rich.console import Console

from qatkit.components.datasets import load_data
from qatkit.components.splits import all_inputs, targets_of
from qatkit.export.config import ExportConfig
from qatkit.io.checkpoint import CheckpointError, check_state_fits, load_weights, read_metadata
from qatkit.io.jsonfile import read_json_object
from qatkit.recipe import Recipe, Variant, parse_recipe
from qatkit.runner.artifacts import Source, check_extras, verify_artifacts, write_artifacts
from qatkit.runner.outdir import run_lock
from qatkit.runner.pipeline import make_task
from qatkit.runner.rebuild import build_info, float_model, load_packed_model
from qatkit.runner.report import Report
from qatkit.runner.sensitivity_run import variant_quant
from qatkit.tasks import predict
from qatkit.train import make_loader
from qatkit.transform.prepare import prepare


def _load(model: torch.nn.Module, path: Path, stage: str) -> torch.nn.Module:
    state = load_weights(path, expect={"stage": stage})
    check_state_fits(path, model.state_dict(), state)
    model.load_state_dict(state)
    return model.eval()


def stage_model(run_dir: Path, v: Variant, stage: str, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (the float architecture, folded as the run folded it) prepared with the variant's rules and
    loaded with its ``stage`` ("ptq" or "qat") checkpoint."""
    prepare(model, variant_quant(run_dir, v))
    return _load(model, run_dir / f"{v.name}_{stage}.safetensors", f"{v.name}/{stage}")


def run_sources(run_dir: Path, recipe, data, task, console: Console | None = None) -> list[Source]:
    """The run's models, rebuilt from their checkpoints, with their test outputs (missing stages are named)."""
    test = make_loader(data.test, 512, False)
    fp32_path = run_dir / "fp32.safetensors"
    if not fp32_path.is_file():
        raise CheckpointError(f"{run_dir}: no fp32.safetensors (not a qatkit run folder, or the run did not finish)")
    folded = bool(read_metadata(fp32_path).get("folded"))
    shape, n_out = data.input_shape, task.num_outputs()

    def new_model() -> torch.nn.Module:
        return float_model(recipe.model, recipe.base_dir, shape, n_out, folded)

    sources = [Source("fp32", "fp32", _load(new_model(), fp32_path, "fp32"), None)]
    for v in recipe.variants:
        for stage in ("ptq", "qat"):
            path = run_dir / f"{v.name}_{stage}.safetensors"
            if not path.is_file():
                if console is not None and (stage == "ptq" or v.qat is not None):
                    console.print(f"[yellow]warning:[/] no {path.name}: {v.name} {stage} is not exported")
                continue
            quant = variant_quant(run_dir, v)
            build = build_info(recipe.model, recipe.base_dir, shape, n_out, folded, quant)
            model = stage_model(run_dir, v, stage, new_model())
            sources.append(Source(v.name, stage, model, None, build, partial(load_packed_model, trust_code=True)))
    for s in sources:
        s.outputs, _ = predict(s.model, test)
    return sources


def export_run(
    run_dir: str | Path, formats: list[str] | None = None, console: Console | None = None
) -> tuple[Report, Recipe]:
    """Export a finished run's models in ``formats`` (default: the recipe's), verify them, update its report.
    Returns the report and the recipe (with the formats used)."""
    run_dir = Path(run_dir)
    console = console or Console()
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no report.json (not a finished qatkit run)")
    saved = read_report(report_path)
    export = saved["recipe"].get("export", {})
    if "onnx" in export:  # reports written before export.formats existed had export.onnx: bool
        export["formats"] = ["onnx"] if export.pop("onnx") else []
    recipe = parse_recipe(saved["recipe"], str(report_path))
    if formats:
        recipe.export = ExportConfig.model_validate({**recipe.export.model_dump(), "formats": formats})
    check_extras(recipe.export)
    with run_lock(run_dir):
        return _export(run_dir, recipe, saved, console), recipe


def read_report(path: Path) -> dict:
    """A run's report.json, refused with one line if it is not JSON or lacks the recipe it was run with."""
    saved = read_json_object(path, CheckpointError, "a qatkit report")
    if not isinstance(saved.get("recipe"), dict):
        raise CheckpointError(f"{path}: not a qatkit report (no 'recipe' mapping at the top)")
    if not isinstance(saved["recipe"].get("export", {}), dict):
        raise CheckpointError(f"{path}: recipe.export is not a mapping")
    try:
        Report.from_dict(saved)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed qatkit report ({type(e).__name__}: {str(e)[:120]})") from None
    return saved


def _export(run_dir: Path, recipe: Recipe, saved: dict, console: Console) -> Report:
    """Write and verify the files, update the report (under the run folder's lock)."""
    data = load_data(recipe.data, recipe.task.name, recipe.seed, recipe.base_dir)
    task = make_task(recipe, data)
    sources = run_sources(run_dir, recipe, data, task, console)
    report = Report.from_dict(saved)
    report.rows = [r for r in report.rows if r.runtime == "pytorch" or r.format not in recipe.export.formats]
    spec, x = all_inputs(data.test)
    arts = write_artifacts(sources, recipe.export, run_dir, spec, x, console)
    verify_artifacts(arts, spec, x, targets_of(data.test), task, recipe.export, report)
    report.write(run_dir)
    console.print(report.rich_table())
    console.print(f"report: {run_dir / 'report.md'}\npage with plots: {run_dir / 'report.html'}")
    return report


def load_run(run_dir: str | Path) -> tuple[Recipe, object, object, torch.nn.Module]:
    """A finished run's recipe, data splits, task and float model (report.json and fp32.safetensors)."""
    run_dir = Path(run_dir)
    saved = read_report(run_dir / "report.json")
    recipe = parse_recipe(saved["recipe"], str(run_dir / "report.json"))
    data = load_data(recipe.data, recipe.task.name, recipe.seed, recipe.base_dir)
    task = make_task(recipe, data)
    fp32_path = run_dir / "fp32.safetensors"
    folded = bool(read_metadata(fp32_path).get("folded"))
    model = float_model(recipe.model, recipe.base_dir, data.input_shape, task.num_outputs(), folded)
    return recipe, data, task, _load(model, fp32_path, "fp32")
