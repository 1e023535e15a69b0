"""The main job, top to bottom: FP32 -> PTQ -> QAT (warm-started) -> export -> verify each file in its runtime.

Every number in the report comes from this run: PyTorch stages are evaluated on the test split, exported
files (ONNX, LiteRT, Core ML, packed; the recipe's ``export.formats``) are run in their runtimes on the same
split and compared with the PyTorch model they came from (Core ML: checked structurally, see exports.py).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from rich.console import Console

from .checkpoint import read_metadata, save_weights
from .data import load_dataset
from .export.packed import build_info
from .exports import Source, check_extras, check_parity, verify_artifacts, write_artifacts
from .fold import fold_batchnorm
from .models import build_model
from .prepare import prepare, quant_status
from .ptq import calibrate
from .recipe import Recipe, RecipeError, Variant
from .report import Report, Row
from .stages import StageRunner, seed_everything
from .train import classification_metrics, make_loader, predict
from .train.distributed import barrier, init_from_env
from .warmstart import warm_start


def run(
    recipe: Recipe,
    out_dir: str | Path,
    console: Console | None = None,
    progress: bool = True,
    resume: str | None = None,
) -> Report:
    """Run every stage of ``recipe``; write checkpoints, exported files and the report into ``out_dir``.

    ``resume``: None starts afresh; ``"auto"`` skips finished stages and continues the interrupted one from
    its last checkpoint; a checkpoint path continues that checkpoint's stage. Under torchrun every rank
    trains; only rank 0 writes files, exports and verifies.
    """
    check_extras(recipe.export)
    info = init_from_env()
    console = console or Console()
    console.quiet = console.quiet or not info.main
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    seed_everything(recipe.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if recipe.device == "auto" else recipe.device
    data = load_dataset(recipe.data.name, recipe.data.val_fraction, recipe.seed)
    bs, nc = recipe.data.batch_size, data.num_classes
    test_loader = make_loader(data.test, 512, False)
    x_test = data.test.tensors[0]
    report = Report(recipe=recipe.model_dump(mode="json"), data=data.info, class_names=data.class_names)
    fingerprint = {"recipe": recipe.name, "model": recipe.model.name}
    stages = StageRunner(out, recipe, data, resume, progress, device)

    def new_model() -> torch.nn.Module:
        return build_model(recipe.model.name, data.input_shape, nc, **recipe.model.args)

    sources: list[Source] = []

    def save(name: str, model: torch.nn.Module, meta: dict) -> Path:
        path = out / name
        if info.main:
            save_weights(path, model.state_dict(), dict(fingerprint, **meta))
        barrier()
        return path

    def record(
        model: torch.nn.Module, variant: str, stage: str, size_bytes: int | None = None, v: Variant | None = None
    ) -> None:
        """Evaluate on the test split, add the PyTorch row, and keep the model as a source of exported files."""
        logits, targets = predict(model, test_loader)
        metrics = classification_metrics(logits, targets, nc)
        status = None if variant == "fp32" else quant_status(model)
        report.add(Row(variant, stage, "pytorch", metrics, size_bytes=size_bytes, status=status))
        console.print(f"{stage.upper()} test accuracy {metrics['accuracy']:.4f}, NLL {metrics['loss']:.4f}")
        build = None
        if v is not None:
            build = build_info(recipe.model.name, recipe.model.args, data.input_shape, nc, bool(folded), v.quant)
        sources.append(Source(variant, stage, model, logits, build))

    def summarize(prefix: str) -> None:
        for name, summary in stages.summaries.items():
            if name == prefix or name.startswith(prefix + "-"):
                report.training[name] = summary

    # ---- FP32 baseline -------------------------------------------------------------------------
    console.rule(f"[bold]{recipe.name}[/]: FP32 baseline")
    fp32 = new_model()
    folded: list[str] = []
    if recipe.fp32.checkpoint is not None:
        if read_metadata(recipe.fp32.checkpoint, allow_foreign=True).get("folded"):
            folded = fold_batchnorm(fp32)  # saved after folding: give the model the same structure first
        ws = warm_start(fp32, recipe.fp32.checkpoint, strict=True)
        console.print("\n".join(ws.lines()), highlight=False)
    else:
        stages.train(fp32, recipe.fp32.train, "fp32", recipe.seed)
        summarize("fp32")
    if recipe.fp32.fold_batchnorm:
        folded += fold_batchnorm(fp32)
    if folded:
        console.print(f"folded BatchNorm into the preceding layer: {', '.join(folded)}")
    ckpt = save("fp32.safetensors", fp32, {"stage": "fp32", "folded": folded})
    record(fp32, "fp32", "fp32", ckpt.stat().st_size)

    # ---- each quantized variant: PTQ, then QAT warm-started from the float checkpoint -----------
    for vi, v in enumerate(recipe.variants):
        console.rule(f"[bold]{v.name}[/]: PTQ and QAT")
        ptq_model = copy.deepcopy(fp32)
        layers = _prepare_variant(ptq_model, v)
        console.print(layers.rich_table())
        report.layers[v.name] = layers.to_dict()
        calibrate(ptq_model, make_loader(data.train, bs, True, recipe.seed), v.ptq.calib_batches)
        pckpt = save(f"{v.name}_ptq.safetensors", ptq_model, {"stage": f"{v.name}/ptq"})
        record(ptq_model, v.name, "ptq", pckpt.stat().st_size, v)
        if v.qat is None:
            continue
        qat_model, ws = _warm_started(new_model, bool(folded), v, ckpt)
        report.warm_start[v.name] = ws.to_dict()
        console.print("\n".join(ws.lines()), highlight=False)
        calibrate(qat_model, make_loader(data.train, bs, True, recipe.seed), v.ptq.calib_batches)
        status = quant_status(qat_model)
        if status["fake_quant_on"] == 0:
            raise RuntimeError(f"variant {v.name}: QAT requested but no fake quantizer is active")
        console.print(f"QAT active: {status['fake_quant_on']} fake quantizers on {status['wrappers']} layers")
        stages.train(qat_model, v.qat, f"{v.name}_qat", recipe.seed + 1000 * (vi + 1))
        summarize(f"{v.name}_qat")
        qckpt = save(f"{v.name}_qat.safetensors", qat_model, {"stage": f"{v.name}/qat"})
        record(qat_model, v.name, "qat", qckpt.stat().st_size, v)

    # ---- write every exported file, run each in its runtime ------------------------------------
    if recipe.export.formats and info.main:
        report.write(out)  # the training results are safe on disk before any converter runs
        console.rule(f"[bold]export[/]: {', '.join(recipe.export.formats)}; accuracy, agreement, size, latency")
        arts = write_artifacts(sources, recipe.export, out, x_test, console)
        verify_artifacts(arts, x_test.numpy(), data.test.tensors[1], nc, recipe.export, report)
    report.seconds = time.perf_counter() - t_start
    if info.main:
        report.write(out)
    console.print(report.rich_table())
    console.print(f"report: {out / 'report.md'}")
    check_parity(report, recipe.export.allow_parity_failure, console)
    return report


def _prepare_variant(model: torch.nn.Module, v: Variant):
    """prepare() with the variant named in any recipe error."""
    try:
        return prepare(model, v.quant)
    except RecipeError as e:
        raise RecipeError(f"variant {v.name!r}: {e}") from None


def _warm_started(new_model, folded: bool, v: Variant, ckpt: Path):
    """A fresh model (BatchNorm folded like the FP32 one), prepared for ``v`` and warm-started from the FP32
    checkpoint file (seed 003)."""
    model = new_model()
    if folded:
        fold_batchnorm(model)
    _prepare_variant(model, v)
    return model, warm_start(model, ckpt)
