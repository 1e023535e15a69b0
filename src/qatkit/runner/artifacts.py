"""Write every file the recipe's ``export`` section asks for, run each in its own runtime, compare with its source.

One row per artifact: the task's metrics and the agreement with the PyTorch model it came from (ONNX Runtime,
LiteRT, PyTorch for packed checkpoints), size, latency at the recipe's batch sizes, the quantized layers the
runtime still runs in float, and a parity verdict. Core ML cannot run on Linux: its files are checked
structurally and their rows say they were not run. Formats come from the registry in ``export/formats.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from qatkit.base.batch import InputSpec
from qatkit.base.extras import check_installed
from qatkit.export import EXPORTERS, Artifact, Source, verify
from qatkit.export.config import ExportConfig
from qatkit.export.formats import diagnosable, quantized_layers
from qatkit.runner.diagnosis import summary, write_diagnosis
from qatkit.runner.outdir import inside
from qatkit.runner.report import Report, Row
from qatkit.tasks import Task

INTEGER_PRECISIONS = {"int8", "dynamic_int8"}
"""Precisions held to the agreement threshold, with every packed file (float files: the metric threshold only).
hybrid and int8_weights add weight rounding their source does not have (like fp16): they are held to
max_accuracy_drop, and their agreement is reported."""

__all__ = ["Artifact", "ParityError", "Source", "check_extras", "check_parity", "verify_artifacts", "write_artifacts"]


class ParityError(RuntimeError):
    """An exported file does not match the model it came from (see the report)."""


def check_extras(cfg: ExportConfig) -> None:
    """Refuse, before any training, formats whose optional extra is not installed."""
    for fmt in cfg.formats:
        extra = EXPORTERS[fmt].extra
        if extra:
            check_installed(extra, f"{EXPORTERS[fmt].title or fmt} (export.formats: {fmt})")


def write_artifacts(
    sources: list[Source], cfg: ExportConfig, out: Path, spec: InputSpec, inputs: dict[str, torch.Tensor], console=None
) -> list[Artifact]:
    """Write every (source, format, precision) the config asks for. A failed export is kept as an artifact with
    its error (the report shows it and parity fails) so that the other files are still written and checked."""
    arts = []
    example = {k: v[:2] for k, v in inputs.items()}
    for fmt in cfg.formats:
        ex = EXPORTERS[fmt]
        for src in sources:
            for p in ex.precisions(src, cfg):
                name = src.stem if p in ("fp32", "int8") or fmt == "packed" else f"{src.stem}_{p}"
                path = inside(out, out / fmt / f"{name}{ex.suffix}")
                art = Artifact(src, fmt, p, path, spec)
                try:
                    ex.write(src, p, path, example, spec, cfg)
                except Exception as e:  # any converter failure: recorded, the other files still go ahead
                    art.error = _one_line(e)
                if console is not None:
                    console.print(f"{fmt} {p} from {src.stem}: {art.error or path}", highlight=False)
                arts.append(art)
    return arts


def verify_artifacts(
    arts: list[Artifact], spec: InputSpec, inputs: dict[str, torch.Tensor], targets: torch.Tensor, task: Task,
    cfg: ExportConfig, report: Report,
) -> list[Row]:  # fmt: skip
    """Run each file in its runtime on the test split and add one row per file to ``report``."""
    x = {k: v.numpy() for k, v in inputs.items()}
    rows: dict[int, Row] = {}
    for i, art in enumerate(arts):
        ex = EXPORTERS[art.format]
        row = Row(art.source.variant, art.source.stage, ex.runtime, None, format=art.format, precision=art.precision,
                  file=str(Path(art.format) / art.path.name))  # fmt: skip
        rows[i] = row
        if art.error:
            row.parity = f"failed: export error: {art.error}"
            continue
        row.size_bytes = verify.file_size(art.path)
        try:
            row.details = ex.details(art, cfg) or None
            row.float_layers = ex.float_layers(art, cfg)
            run, outputs = ex.runner(art, cfg), None
            if run is not None:
                outputs = torch.from_numpy(np.asarray(run(x)))
                row.metrics = task.metrics(outputs, targets)
                row.agreement = task.agreement(outputs.numpy(), art.source.outputs.numpy())
        except Exception as e:  # a file its runtime cannot load or run fails parity; the others are still checked
            art.error = _one_line(e)
            row.parity = f"failed: cannot run: {art.error}"
            continue
        finite = bool(torch.isfinite(art.source.outputs).all()) and (
            outputs is None or bool(torch.isfinite(outputs).all())
        )
        row.parity = _parity(row, art, task.metrics(art.source.outputs, targets), task, cfg, finite)
        if (
            art.format in diagnosable()
            and art.source.quantized
            and outputs is not None
            and (row.parity != "ok" or row.agreement != task.exact_agreement)
        ):
            _diagnose(art, row, spec, inputs)
    _time(arts, rows, x, cfg)
    for row in rows.values():
        report.add(row)
    return list(rows.values())


def _diagnose(art: Artifact, row: Row, spec: InputSpec, inputs: dict[str, torch.Tensor], n: int = 512) -> None:
    """Where a file that does not agree exactly with its source departs from it, layer by layer: the files
    under ``diagnose/`` and a line in the row's details (a file that cannot be diagnosed says why there)."""
    try:
        diag = EXPORTERS[art.format].diagnose(art.source.model, art.path, spec, {k: v[:n] for k, v in inputs.items()})
        md = write_diagnosis(art.path.parents[1], art.path, diag)
        row.details = {**(row.details or {}), "diagnose": f"{summary(diag)} ({md.parent.name}/{md.name})"}
    except (ValueError, RuntimeError, OSError) as e:
        row.details = {**(row.details or {}), "diagnose": f"not diagnosed: {_one_line(e)}"}


def _time(arts: list[Artifact], rows: dict[int, Row], x: dict[str, np.ndarray], cfg: ExportConfig) -> None:
    """Latency of every file at each batch size, measured interleaved so machine noise hits all alike."""
    sample = {k: v[:64] for k, v in x.items()}
    with tempfile.TemporaryDirectory() as workdir:
        for b in cfg.latency_batches:
            calls = {}
            for i, art in enumerate(arts):
                if art.error:
                    continue
                try:
                    t = EXPORTERS[art.format].timer(art, b, sample, cfg, Path(workdir))
                except Exception as e:  # e.g. the batch-b LiteRT copy does not convert: no latency
                    rows[i].details = {**(rows[i].details or {}), f"latency_b{b}": f"not timed: {_one_line(e)}"}
                    continue
                if t is not None:
                    calls[i] = t
            for i, ms in verify.time_calls(calls, cfg.latency_seconds).items():
                rows[i].latency_ms[str(b)] = ms


def _parity(row: Row, art: Artifact, source: dict, task: Task, cfg: ExportConfig, finite: bool = True) -> str:
    """ "ok", "failed: <why>", or for files that cannot run here the structural verdict. Non-finite outputs
    (of the file or of its source model) always fail: two NaN models would otherwise agree perfectly."""
    problems = [] if finite else ["non-finite outputs (NaN or Inf) from the file or its source model"]
    if row.metrics is None:
        w = (row.details or {}).get("weights")
        if w is not None and (w["layers"] != w["expected"] or w["max_rel_diff"] > 1e-2 or w["luts_equal"] is False):
            problems.append(f"stored weights differ from the source ({w})")
        return f"failed: {'; '.join(problems)}" if problems else "structure ok (not run)"
    drop = task.primary_drop(source, row.metrics)
    integer = art.precision in INTEGER_PRECISIONS or art.format == "packed"
    if integer:
        problems.append(task.agreement_problem(row.agreement, cfg))
        expected = len(quantized_layers(art.source.model))
        if EXPORTERS[art.format].float_in_effect_fails and expected and len(row.float_layers) >= expected:
            problems.append(f"none of its {expected} quantized layers runs as an integer kernel (float in effect)")
    if drop > cfg.max_accuracy_drop:
        problems.append(
            f"{task.primary} {100 * drop:.2f} points below the source (limit {100 * cfg.max_accuracy_drop:.0f})"
        )
    problems = [p for p in problems if p]
    return f"failed: {'; '.join(problems)}" if problems else "ok"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def parity_failures(report: Report) -> list[str]:
    """One line per artifact row whose parity failed."""
    return [f"{r.label} {r.format} {r.precision}: {r.parity[len('failed: '):]}" for r in report.rows
            if r.parity and r.parity.startswith("failed")]  # fmt: skip


def check_parity(report: Report, allowed: bool, console) -> None:
    """Raise ParityError naming the failed files, unless the recipe allows failures (then only warn)."""
    failed = parity_failures(report)
    if not failed:
        return
    msg = f"{len(failed)} exported file(s) failed parity: " + "; ".join(failed)
    if not allowed:
        raise ParityError(msg + " (set export.allow_parity_failure: true to accept)")
    console.print(f"[yellow]warning:[/] {msg} (allowed by the recipe)", highlight=False, soft_wrap=True)
