"""Cross-validation: the whole job (FP32 -> PTQ -> QAT -> export -> verify) once per fold, each into
``OUT/folds/<fold>/`` with its own full report, then one aggregate report at ``OUT``.

``resume="auto"`` skips folds that finished and continues the interrupted one from its last checkpoint;
``cv.workers`` runs folds in parallel processes (each rebuilds the data and its fold, so the folds and numbers
are those of a sequential run).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from rich.console import Console

from qatkit.base.config import RecipeError
from qatkit.components.datasets import load_data
from qatkit.components.folds import Fold, make_folds
from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.io.jsonfile import read_json_object
from qatkit.recipe import Recipe, parse_recipe
from qatkit.runner.artifacts import ParityError
from qatkit.runner.criteria import CriteriaError
from qatkit.runner.fold_report import FoldsReport
from qatkit.runner.outdir import claim, run_lock
from qatkit.runner.pipeline import run
from qatkit.runner.report import Report
from qatkit.train.distributed import current

PROGRESS = "folds.json"


def run_folds(
    recipe: Recipe,
    out_dir: str | Path,
    console: Console | None = None,
    progress: bool = True,
    resume: str | None = None,
    model=None,
    data=None,
    overwrite: bool = False,
    check: bool = True,
) -> FoldsReport:
    """Run every fold of ``recipe.cv`` and write the aggregate report; see the module docstring."""
    if recipe.cv is None:
        raise RecipeError("run_folds needs a recipe with cv:")
    if current().world > 1:
        raise RecipeError("cv: folds run one process each (cv.workers); not under torchrun")
    if resume not in (None, "auto"):
        raise RecipeError("--resume with cv: takes 'auto' (each fold resumes from its own checkpoints)")
    console = console or Console()
    out = Path(out_dir)
    t0 = time.perf_counter()
    with run_lock(out):
        claim(out, overwrite)
        full = data if data is not None else load_data(recipe.data, recipe.task.name, recipe.seed, recipe.base_dir)
        folds = make_folds(full, recipe.cv, recipe.data.val_fraction, recipe.task.name, recipe.seed)
        done = _finished(out) if resume == "auto" else []
        _write_progress(out, done)
        todo = [f for f in folds if f.name not in done]
        if recipe.cv.workers > 1 and len(todo) > 1:
            if model is not None or data is not None:
                raise RecipeError("cv.workers > 1 rebuilds the model and data in each process: give them in the "
                                  "recipe (model.name/target/hf, data.name/path/target), or use workers: 1")  # fmt: skip
            _parallel(recipe, out, todo, resume, done)
        for fold in todo if recipe.cv.workers == 1 or len(todo) == 1 else []:
            console.rule(f"[bold]fold {fold.name}[/]: {fold.held_out} held out")
            _run_fold(recipe, out, fold, console, progress, resume, model)
            done.append(fold.name)
            _write_progress(out, done)
        reports = {f.name: _read_fold(out, f.name) for f in folds}
        rep = FoldsReport(recipe.model_dump(mode="json"), {f.name: f.held_out for f in folds}, reports)
        rep.seconds = time.perf_counter() - t0
        rep.write(out)
    console.print(f"cross-validation report: {out / 'report.md'}")
    console.print(f"page with plots: {out / 'report.html'}")
    if check:
        _check(rep, recipe, console)
    return rep


def _run_fold(recipe: Recipe, out: Path, fold: Fold, console, progress, resume, model) -> Report:
    """One fold's whole job into ``OUT/folds/<fold>`` (its verdicts are judged with the others at the end)."""
    single = recipe.model_copy(update={"cv": None, "name": f"{recipe.name}-{fold.name}"})
    return run(single, out / "folds" / fold.name, console, progress, resume, model, fold.data, check=False)


def _parallel(recipe: Recipe, out: Path, todo: list[Fold], resume, done: list[str]) -> None:
    """Run ``todo`` in ``cv.workers`` spawned processes, each with its share of the CPU threads."""
    workers = min(recipe.cv.workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    payload = recipe.model_dump(mode="json")
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        jobs = {f.name: pool.submit(_fold_worker, payload, str(out), f.name, resume, threads) for f in todo}
        for name, job in jobs.items():
            job.result()  # re-raises a fold's error here
            done.append(name)
            _write_progress(out, done)


def _fold_worker(payload: dict, out: str, name: str, resume, threads: int) -> None:
    """A spawned process: rebuild the recipe, the data and the one fold, and run it."""
    import torch

    torch.set_num_threads(threads)
    recipe = parse_recipe(payload, "cv worker")
    data = load_data(recipe.data, recipe.task.name, recipe.seed, recipe.base_dir)
    cv = recipe.cv.model_copy(update={"folds": [name]})
    (fold,) = make_folds(data, cv, recipe.data.val_fraction, recipe.task.name, recipe.seed)
    _run_fold(recipe, Path(out), fold, Console(quiet=True), False, resume, None)


def _finished(out: Path) -> list[str]:
    """Folds a previous run of this folder finished (their report.json written after the last stage)."""
    path = out / PROGRESS
    if not path.exists():
        return []
    done = read_json_object(path, RecipeError, "the folds' progress").get("done", [])
    if not isinstance(done, list) or not all(isinstance(d, str) for d in done):
        raise RecipeError(f"{path}: 'done' must be a list of fold names")
    return [d for d in done if (out / "folds" / d / "report.json").is_file()]


def _write_progress(out: Path, done: list[str]) -> None:
    atomic_write_bytes(out / PROGRESS, json.dumps({"done": done}).encode())


def _read_fold(out: Path, name: str) -> Report:
    from qatkit.runner.export_run import read_report

    return Report.from_dict(read_report(out / "folds" / name / "report.json"))


def _check(rep: FoldsReport, recipe: Recipe, console) -> None:
    """Parity and criteria over all folds: the first kind of failure raises, naming the folds."""
    parity, crit = rep.failures()
    if parity and not recipe.export.allow_parity_failure:
        raise ParityError(f"{len(parity)} exported file(s) failed parity: " + "; ".join(parity))
    verdicts = rep.verdicts()
    if verdicts:
        console.print(f"criteria: {sum(v['passed'] for v in verdicts)} of {len(verdicts)} met over the folds")
    if crit:
        raise CriteriaError(f"{len(crit)} criteria missed: " + "; ".join(crit))
