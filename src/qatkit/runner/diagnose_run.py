"""``qatkit diagnose``: where a run's exported file departs from the model it was made from, layer by layer.

Writes ``RUN_DIR/diagnose/<file stem>_<format>.md`` (the table), ``.json`` (every number) and ``.png``
(difference by depth): see runner/diagnosis.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

from qatkit.base.batch import rows as take_rows
from qatkit.components.splits import all_inputs
from qatkit.export.diagnose import Diagnosis
from qatkit.export.formats import EXPORTERS, diagnosable
from qatkit.recipe import RecipeError
from qatkit.runner.diagnosis import write_diagnosis
from qatkit.runner.export_run import load_run, stage_model
from qatkit.runner.outdir import run_lock


def diagnose_run(
    run_dir: str | Path, variant: str | None = None, stage: str = "qat", fmt: str = "onnx", rows: int = 512
) -> tuple[Path, Diagnosis]:
    """Compare each quantized layer's output in ``RUN_DIR/<fmt>/<variant>_<stage>.<fmt>`` with the run's PyTorch
    model on ``rows`` test rows; returns the markdown file written and the per-layer differences."""
    run_dir = Path(run_dir)
    if fmt not in diagnosable():
        raise RecipeError(f"--format {fmt!r}: diagnose reads {', '.join(diagnosable())} files")
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
    diag = EXPORTERS[fmt].diagnose(model, path, spec, x)
    with run_lock(run_dir):
        return write_diagnosis(run_dir, path, diag), diag
