"""Command line: ``qatkit run [RECIPE]``, ``qatkit export RUN_DIR``, ``qatkit diagnose RUN_DIR``, ``qatkit layers
RECIPE``, ``qatkit recipes``
(LM commands: cli_lm.py).

Errors print one readable line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from qatkit.cli import lm as cli_lm

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="qatkit: quantization-aware training from float baseline to verified int8 files.",
)
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that tables do not wrap
    console.width = 160
err_console = Console(stderr=True)
STATE = {"debug": False}
DEFAULT_RECIPE = "digits_mlp"


def bundled_recipes() -> dict[str, Path]:
    """Recipes shipped inside the package, by file stem."""
    folder = resources.files("qatkit.components") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_recipe(name_or_path: str | None) -> Path:
    """A recipe file path: an existing file, or the name of a bundled recipe (default: digits_mlp)."""
    if name_or_path is None:
        return bundled_recipes()[DEFAULT_RECIPE]
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = bundled_recipes()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise FileNotFoundError(
        f"no recipe file {name_or_path!r} and no bundled recipe of that name (bundled: {', '.join(sorted(bundled))})"
    )


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug


@app.command()
def run(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML file or bundled recipe name (default: digits_mlp)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: runs/<recipe name>)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="'auto': skip finished stages, continue the interrupted one; or a checkpoint path."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into a folder holding files qatkit did not write (they are never replaced)."
    ),
) -> None:
    """Run FP32 -> PTQ -> QAT -> export -> verify each file in its runtime; write DIR/report.{json,md}.
    With cv: in the recipe, once per fold into DIR/folds/<fold>/ and one aggregate report.

    Exits 1 if an exported file fails parity (unless the recipe sets export.allow_parity_failure) or a criterion
    of the recipe is missed."""
    from qatkit.recipe import load_recipe
    from qatkit.runner.folds import run_folds
    from qatkit.runner.pipeline import run as run_pipeline
    from qatkit.train.loop import TrainingInterrupted

    r = load_recipe(resolve_recipe(recipe))
    show = not no_progress and console.is_terminal
    try:
        job = run_folds if r.cv is not None else run_pipeline  # cv: the whole job once per fold
        job(r, out or Path("runs") / r.name, console=console, progress=show, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as e:
        err_console.print(f"stopped: {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(130)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run folder (with report.json and checkpoints)."),
    formats: Optional[list[str]] = typer.Option(
        None, "--format", "-f", help="onnx, tflite, coreml or packed; repeat for several (default: the recipe's)."
    ),
    allow_parity_failure: bool = typer.Option(False, "--allow-parity-failure", help="Exit 0 even if parity fails."),
) -> None:
    """Write and verify exported files for a finished run from its checkpoints; update its report."""
    from qatkit.runner.artifacts import check_parity
    from qatkit.runner.export_run import export_run

    report, recipe = export_run(run_dir, formats, console)
    check_parity(report, allow_parity_failure or recipe.export.allow_parity_failure, console)


@app.command()
def layers(recipe: Optional[str] = typer.Argument(None, help="Recipe YAML file or bundled recipe name.")) -> None:
    """Print, without training, which layers each variant of the recipe quantizes and why."""
    from qatkit.components.datasets import load_data
    from qatkit.components.models import check_model
    from qatkit.components.splits import first_inputs
    from qatkit.recipe import RecipeError, load_recipe
    from qatkit.runner.pipeline import make_task
    from qatkit.runner.rebuild import float_model
    from qatkit.transform.fold import fold_batchnorm
    from qatkit.transform.prepare import plan

    r = load_recipe(resolve_recipe(recipe))
    data = load_data(r.data, r.task.name, r.seed, r.base_dir)
    task = make_task(r, data)
    build = lambda: float_model(r.model, r.base_dir, data.input_shape, task.num_outputs(), False)  # noqa: E731
    check_model(build, first_inputs(data.test), meta=r.model.hf is None)
    for v in r.variants:
        model = float_model(r.model, r.base_dir, data.input_shape, task.num_outputs(), False)
        if r.fp32.fold_batchnorm:
            fold = fold_batchnorm(model)
            if v is r.variants[0]:
                console.print("\n".join(fold.lines()), highlight=False)
        try:
            report, _ = plan(model, v.quant)
        except RecipeError as e:
            raise RecipeError(f"variant {v.name!r}: {e}") from None
        table = report.rich_table()
        table.title = f"{v.name}: {report.summary()}"
        console.print(table)


@app.command()
def sensitivity(
    run_dir: Path = typer.Argument(..., help="A finished run folder (its fp32.safetensors is measured)."),
    variant: Optional[str] = typer.Option(None, "--variant", "-v", help="Whose rules (default: the first)."),
    bits: str = typer.Option("2,3,4,8", "--bits", help="Candidate weight widths, comma-separated."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Average bits per weight: choose widths."),
    rows: int = typer.Option(1024, "--rows", help="Held-out rows to measure on."),
) -> None:
    """Per-layer sensitivity: each layer alone at each width vs the float model; with --budget, the widths
    with the least total divergence, written as RUN_DIR/<variant>_mixed_precision.yaml."""
    from pydantic import ValidationError

    from qatkit.base.config import format_validation_error
    from qatkit.recipe import MixedPrecision, RecipeError
    from qatkit.runner.sensitivity_run import sensitivity_of_run

    try:
        cands = [int(b) for b in bits.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--bits {bits!r}: comma-separated integers, e.g. 2,4,8") from None
    try:  # the recipe's bounds
        MixedPrecision(budget_bits=budget or 8, candidates=cands, eval_rows=rows)
    except ValidationError as e:
        raise RecipeError(f"qatkit sensitivity: {format_validation_error(e, MixedPrecision)}") from None
    md, _ = sensitivity_of_run(run_dir, variant, cands, budget, rows)
    console.print(md.read_text(), highlight=False)


@app.command()
def diagnose(
    run_dir: Path = typer.Argument(..., help="A finished run folder with exported files."),
    variant: Optional[str] = typer.Option(None, "--variant", "-v", help="Whose file (default: the first variant)."),
    stage: str = typer.Option("qat", "--stage", help="ptq or qat."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="The file's format: onnx or tflite."),
    rows: int = typer.Option(512, "--rows", min=1, max=1 << 20, help="Test rows to compare on."),
) -> None:
    """Where an exported file departs from its PyTorch model: each quantized layer's output difference in
    output quantization steps, the first layer more than one step apart, and the cause where it can be named."""
    from qatkit.runner.diagnose_run import diagnose_run

    md, _ = diagnose_run(run_dir, variant, stage, fmt, rows)
    console.print(md.read_text(), highlight=False)
    console.print(f"written: {md} (and .json, .png)")


@app.command()
def recipes() -> None:
    """List the bundled recipes."""
    from qatkit.recipe import load_recipe

    for name, path in sorted(bundled_recipes().items()):
        r = load_recipe(path)
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        console.print(f"[bold]{name}[/]{mark}: {r.description.strip().splitlines()[0] if r.description else ''}")


cli_lm.register(app)


def main() -> None:
    """Entry point: usage errors are typer's (exit 2); expected failures print one line and exit 2; a parity
    failure of an exported file exits 1."""
    from qatkit.io.checkpoint import CheckpointError
    from qatkit.recipe import RecipeError
    from qatkit.runner.artifacts import ParityError
    from qatkit.runner.criteria import CriteriaError

    expected = (RecipeError, CheckpointError, FileNotFoundError, ValueError, RuntimeError, OSError, ImportError)
    debug = "--debug" in sys.argv
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        known = isinstance(e, expected)
        msg = str(e) if known else f"{type(e).__name__}: {e} (rerun with --debug for the traceback)"
        # escaped: a message may hold brackets rich would read as markup (e.g. gloo's "[/path/pair.cc:553]")
        err_console.print(f"[bold red]error:[/] {escape(' '.join(msg.split()))}", highlight=False, soft_wrap=True)
        sys.exit(1 if isinstance(e, (ParityError, CriteriaError)) or not known else 2)


if __name__ == "__main__":
    main()
