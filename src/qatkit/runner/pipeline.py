"""The main job, top to bottom: FP32 -> PTQ -> QAT (warm-started) -> export -> verify each file in its runtime.

Every number in the report comes from this run: PyTorch stages are evaluated on the test split, exported
files (ONNX, LiteRT, Core ML, packed; the recipe's ``export.formats``) are run in their runtimes on the same
split and compared with the PyTorch model they came from (Core ML: checked structurally, see artifacts.py).
The model, the data and the task are the recipe's: bundled, the user's own by import path or file, or given
directly to :func:`run` from Python.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from qatkit.base.config import RecipeError
from qatkit.components.datasets import load_data
from qatkit.components.models import check_model
from qatkit.components.splits import DataSplits, all_inputs, first_inputs, targets_of
from qatkit.io.checkpoint import read_metadata, save_weights
from qatkit.recipe import Recipe, Variant
from qatkit.runner.artifacts import Source, check_extras, check_parity, verify_artifacts, write_artifacts
from qatkit.runner.criteria import CriteriaError, judge, missed
from qatkit.runner.outdir import claim, inside, run_lock
from qatkit.runner.qat_notes import explain_stages
from qatkit.runner.rebuild import build_info, float_model, load_packed_model
from qatkit.runner.report import Report, Row
from qatkit.runner.sensitivity_run import choose_widths, saved_choice, sensitivity_lines, write_choice
from qatkit.runner.stages import StageRunner, seed_everything, stage_names
from qatkit.tasks import TASKS, Task, predict
from qatkit.train import make_loader
from qatkit.train.config import as_stages
from qatkit.train.distill import Teacher
from qatkit.train.distributed import barrier, current, init_from_env
from qatkit.transform.calibrate import calibrate
from qatkit.transform.fold import fold_batchnorm
from qatkit.transform.prepare import prepare, quant_status, weight_errors
from qatkit.transform.warm_start import warm_start


def make_task(recipe: Recipe, data: DataSplits) -> Task:
    """The recipe's task, sized by the data (classes, or regression targets)."""
    cls = TASKS[recipe.task.name]
    if not cls.classes:
        targets = targets_of(data.train)
        return cls(threshold=recipe.task.threshold, num_targets=1 if targets.dim() == 1 else targets.shape[1])
    if recipe.task.name == "binary" and data.num_classes != 2:
        raise RecipeError(f"task binary needs two classes; the data has {data.num_classes}")
    return cls(data.num_classes, data.class_names, recipe.task.threshold)


def run(
    recipe: Recipe,
    out_dir: str | Path,
    console: Console | None = None,
    progress: bool = True,
    resume: str | None = None,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    data: DataSplits | None = None,
    overwrite: bool = False,
    check: bool = True,
) -> Report:
    """Run every stage of ``recipe``; write checkpoints, exported files and the report into ``out_dir``.

    ``resume``: None starts afresh; ``"auto"`` skips finished stages and continues the interrupted one from
    its last checkpoint; a checkpoint path continues that checkpoint's stage. Under torchrun every rank
    trains; only rank 0 writes files, exports and verifies. ``model`` (a module, copied, or a factory) and
    ``data`` replace the recipe's own (for notebooks where nothing is importable). ``out_dir`` must be new,
    empty or a qatkit run folder; ``overwrite`` lets qatkit write beside foreign files (never replacing them).
    ``check``: raise ParityError / CriteriaError at the end when a file fails parity or a criterion is missed.
    """
    check_extras(recipe.export)
    info = init_from_env()
    console = console or Console()
    console.quiet = console.quiet or not info.main
    out = Path(out_dir)
    with run_lock(out) if info.main else contextlib.nullcontext():
        if info.main:
            claim(out, overwrite)
        barrier()
        report = _run(recipe, out, console, progress, resume, model, data)
    if check:
        check_parity(report, recipe.export.allow_parity_failure, console)
        check_criteria(report, console)
    return report


def check_criteria(report: Report, console: Console) -> None:
    """Print the criteria verdicts and raise CriteriaError when one is missed."""
    verdicts = judge(report)
    if verdicts:
        console.print(f"criteria: {sum(v['passed'] for v in verdicts)} of {len(verdicts)} met")
    failed = missed(verdicts)
    if failed:
        raise CriteriaError(f"{len(failed)} criteria missed: " + "; ".join(failed))


def _run(recipe: Recipe, out: Path, console: Console, progress: bool, resume: str | None, model, data) -> Report:
    """The stages, in order, in a claimed and locked output folder."""
    info = current()
    t_start = time.perf_counter()
    seed_everything(recipe.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if recipe.device == "auto" else recipe.device
    data = data if data is not None else load_data(recipe.data, recipe.task.name, recipe.seed, recipe.base_dir)
    task = make_task(recipe, data)
    bs = recipe.data.batch_size
    test_loader = make_loader(data.test, 512, False)
    spec, x_test = all_inputs(data.test)
    report = Report(recipe=recipe.model_dump(mode="json"), data=data.info, class_names=data.class_names)
    fingerprint = {"recipe": recipe.name, "model": recipe.model.label}
    stages = StageRunner(out, recipe, data, resume, progress, device, task)

    def new_model() -> nn.Module:
        if model is None:
            return float_model(recipe.model, recipe.base_dir, data.input_shape, task.num_outputs(), False)
        return copy.deepcopy(model) if isinstance(model, nn.Module) else model()

    check_model(new_model, first_inputs(data.test), meta=model is None and recipe.model.hf is None)

    sources: list[Source] = []

    def save(name: str, m: nn.Module, meta: dict) -> Path:
        path = inside(out, out / name)
        if info.main:
            save_weights(path, m.state_dict(), dict(fingerprint, **meta))
        barrier()
        return path

    def record(m: nn.Module, variant: str, stage: str, size_bytes: int | None = None, v: Variant | None = None):
        """Evaluate on the test split, add the PyTorch row, and keep the model as a source of exported files."""
        outputs, targets = predict(m, test_loader)
        metrics = task.metrics(outputs, targets)
        status = None if variant == "fp32" else quant_status(m)
        report.add(Row(variant, stage, "pytorch", metrics, size_bytes=size_bytes, status=status))
        if variant != "fp32":  # per-layer weight quantization error, for the report's plot
            report.layers.setdefault(variant, {}).setdefault("weight_error", {})[stage] = weight_errors(m)
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in task.monitors if k in metrics)
        console.print(f"{stage.upper()} test {shown}")
        build = None
        if v is not None and model is None:
            build = build_info(
                recipe.model, recipe.base_dir, data.input_shape, task.num_outputs(), bool(folded), v.quant
            )
        sources.append(
            Source(variant, stage, m, outputs, build, partial(load_packed_model, trust_code=True) if build else None)
        )

    def summarize(prefix: str) -> None:
        for name, summary in stages.summaries.items():
            if name == prefix or name.startswith(prefix + "-"):
                report.training[name] = summary

    # ---- FP32 baseline -------------------------------------------------------------------------
    console.rule(f"[bold]{recipe.name}[/]: FP32 baseline")
    fp32 = new_model()
    folded: list[str] = []
    if recipe.fp32.checkpoint is not None:
        ckpt_path = recipe.resolve(recipe.fp32.checkpoint)
        if ckpt_path.is_dir():  # a Hugging Face save_pretrained folder: its weights file
            ckpt_path = ckpt_path / "model.safetensors"
        if read_metadata(ckpt_path, allow_foreign=True).get("folded"):
            folded = fold_batchnorm(fp32).folded  # saved after folding: give the model the same structure first
        # a Hugging Face model's own keys (bert.*) are those of the wrapped model, not of the logits wrapper
        own = fp32.model if recipe.model.hf is not None and not _has_key_prefix(ckpt_path, "model.") else fp32
        ws = warm_start(own, ckpt_path, strict=True)
        console.print("\n".join(ws.lines()), highlight=False)
    else:
        stages.train(fp32, recipe.fp32.train, "fp32", recipe.seed)
        summarize("fp32")
    if recipe.fp32.fold_batchnorm:
        fold = fold_batchnorm(fp32)
        folded += fold.folded
        report.folding = fold.to_dict()
        console.print("\n".join(fold.lines()), highlight=False)
    ckpt = save("fp32.safetensors", fp32, {"stage": "fp32", "folded": folded})
    record(fp32, "fp32", "fp32", ckpt.stat().st_size)

    # ---- each quantized variant: PTQ, then QAT warm-started from the float checkpoint -----------
    distills = any(c.distill for v in recipe.variants for c in as_stages(v.qat))
    teacher = Teacher(fp32) if distills else None  # a frozen copy of the float model for QAT stages with distill
    for vi, v in enumerate(recipe.variants):
        console.rule(f"[bold]{v.name}[/]: PTQ and QAT")
        if v.mixed_precision is not None:  # widths per layer from measured sensitivity, under the bit budget
            saved = saved_choice(out, v) if resume is not None else None
            quant, chosen = saved or choose_widths(fp32, v.quant, v.mixed_precision, data, task, recipe.seed)
            v = v.model_copy(update={"quant": quant})
            report.sensitivity[v.name] = chosen
            path = write_choice(out, v.name, quant, chosen) if info.main and saved is None else None
            console.print("\n".join(sensitivity_lines(chosen)), highlight=False)
            how = f"recipe {path}" if saved is None else "as chosen before the resume"
            console.print(f"mixed precision: {chosen['average_bits']:.2f} bits per weight; {how}")
        ptq_model = copy.deepcopy(fp32)
        layers = _prepare_variant(ptq_model, v)
        console.print(layers.rich_table())
        for note in layers.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
        report.layers[v.name] = layers.to_dict()
        calibrate(ptq_model, make_loader(data.train, bs, True, recipe.seed), v.ptq.calib_batches)
        pckpt = save(f"{v.name}_ptq.safetensors", ptq_model, {"stage": f"{v.name}/ptq"})
        record(ptq_model, v.name, "ptq", pckpt.stat().st_size, v)
        if v.qat is None:
            continue
        qat_model = new_model()
        if folded:
            fold_batchnorm(qat_model)
        _prepare_variant(qat_model, v)
        ws = warm_start(qat_model, ckpt)  # seed 003: start from the float weights, report what was copied
        report.warm_start[v.name] = ws.to_dict()
        console.print("\n".join(ws.lines()), highlight=False)
        calibrate(qat_model, make_loader(data.train, bs, True, recipe.seed), v.ptq.calib_batches)
        status = quant_status(qat_model)
        if status["fake_quant_on"] == 0:
            raise RuntimeError(f"variant {v.name}: QAT requested but no fake quantizer is active")
        console.print(f"QAT active: {status['fake_quant_on']} fake quantizers on {status['wrappers']} layers")
        stages.train(qat_model, v.qat, f"{v.name}_qat", recipe.seed + 1000 * (vi + 1), teacher)
        summarize(f"{v.name}_qat")
        cfgs = as_stages(v.qat)
        explain_stages(out, report, stage_names(f"{v.name}_qat", cfgs), cfgs, v.name, task,
                       len(data.val) if data.val is not None else 0, ptq_model, qat_model)  # fmt: skip
        qckpt = save(f"{v.name}_qat.safetensors", qat_model, {"stage": f"{v.name}/qat"})
        record(qat_model, v.name, "qat", qckpt.stat().st_size, v)

    # ---- write every exported file, run each in its runtime ------------------------------------
    if recipe.export.formats and info.main:
        report.write(out, html=False)  # the training results are safe on disk before any converter runs
        console.rule(f"[bold]export[/]: {', '.join(recipe.export.formats)}; accuracy, agreement, size, latency")
        arts = write_artifacts(sources, recipe.export, out, spec, x_test, console)
        verify_artifacts(arts, spec, x_test, targets_of(data.test), task, recipe.export, report)
    report.seconds = time.perf_counter() - t_start
    if info.main:
        report.write(out)
    console.print(report.rich_table())
    for w in report.warnings():
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    console.print(f"report: {out / 'report.md'}\npage with plots: {out / 'report.html'}")
    return report


def _has_key_prefix(path: Path, prefix: str) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(prefix) for k in f.keys())


def _prepare_variant(model: nn.Module, v: Variant):
    """prepare() with the variant named in any recipe error."""
    try:
        return prepare(model, v.quant)
    except RecipeError as e:
        raise RecipeError(f"variant {v.name!r}: {e}") from None
