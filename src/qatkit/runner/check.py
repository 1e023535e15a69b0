"""The run's verification as one call, for a model trained with the user's own loop: export it (and optionally
its float original, the reference for size and latency ratios), run every file in its runtime on the test data,
and report metrics, agreement, size, latency, quantized layers left in float and a parity verdict."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from qatkit.components.splits import all_inputs, targets_of
from qatkit.export.config import ExportConfig
from qatkit.runner.artifacts import Source, check_extras, check_parity, verify_artifacts, write_artifacts
from qatkit.runner.report import Report, Row
from qatkit.tasks import TASKS, predict
from qatkit.train import make_loader
from qatkit.transform.prepare import quant_status


def verify_model(
    model: nn.Module,
    test: Dataset,
    out_dir: str | Path,
    formats: list[str] | tuple[str, ...] = ("onnx",),
    task: str = "classification",
    float_model: nn.Module | None = None,
    threshold: float = 0.5,
    name: str = "model",
    strict: bool = False,
    **export,
) -> Report:
    """Write ``model`` in ``formats`` under ``out_dir``, verify every file on ``test`` (items ``(inputs, target)``)
    and write ``report.md``/``report.json`` there. ``export`` takes any ``export:`` recipe setting
    (``tflite={...}``, ``latency_batches=[1, 32]``, ``min_agreement=...``); ``strict`` raises on a parity failure."""
    cfg = ExportConfig(formats=list(formats), **export)
    check_extras(cfg)
    out = Path(out_dir)
    spec, x = all_inputs(test)
    targets = targets_of(test)
    loader = make_loader(test, 512, False)
    models = ([("fp32", "fp32", float_model)] if float_model is not None else []) + [(name, "qat", model)]
    outputs = {v: predict(m, loader)[0] for v, _, m in models}
    cls = TASKS[task]
    n = outputs[name].shape[1] if cls.classes and task == "classification" else 2
    task_obj = cls(n, [str(i) for i in range(n)], threshold) if cls.classes else cls(threshold=threshold)
    report = Report({"name": name, "task": {"name": task, "threshold": threshold}, "export": cfg.model_dump()},
                    {"source": "Python data", "test": len(test)}, task_obj.class_names)  # fmt: skip
    sources = []
    for variant, stage, m in models:
        status = quant_status(m) if variant != "fp32" else None
        report.add(Row(variant, stage, "pytorch", task_obj.metrics(outputs[variant], targets), status=status))
        sources.append(Source(variant, stage, m, outputs[variant]))
    out.mkdir(parents=True, exist_ok=True)
    arts = write_artifacts(sources, cfg, out, spec, x)
    verify_artifacts(arts, spec, x, targets, task_obj, cfg, report)
    report.write(out)
    if strict:
        check_parity(report, False, Console(quiet=True))
    return report
