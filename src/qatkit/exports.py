"""Write every file the recipe's ``export`` section asks for, run each in its own runtime, compare with its source.

One row per artifact: accuracy and top-1 agreement with the PyTorch model it came from (ONNX Runtime, LiteRT,
PyTorch for packed checkpoints), size, latency at the recipe's batch sizes, and a parity verdict. Core ML cannot
run on Linux: its files are checked structurally (op types, stored weights decoded and compared with the
source's) and their rows say they were not run. Formats dispatch through the ``EXPORTERS`` registry.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .export import verify
from .recipe import ExportConfig
from .report import Report, Row
from .train import agreement, classification_metrics

INTEGER_PRECISIONS = {"int8", "dynamic_int8"}
"""Precisions held to the agreement threshold, with every packed file (float files: the accuracy threshold only)."""


class ParityError(RuntimeError):
    """An exported file does not match the model it came from (see the report)."""


@dataclass
class Source:
    """A PyTorch model whose files are written: ``variant`` is "fp32" for the float model."""

    variant: str
    stage: str
    model: nn.Module
    logits: torch.Tensor
    build: dict | None = None
    """How to rebuild the model (see export.packed.load_packed_model), stored in packed files."""

    @property
    def quantized(self) -> bool:
        return self.variant != "fp32"

    @property
    def stem(self) -> str:
        return "fp32" if not self.quantized else f"{self.variant}_{self.stage}"


@dataclass
class Artifact:
    source: Source
    format: str
    precision: str
    path: Path
    error: str | None = None
    handle: object = None
    """The file opened in its runtime (an ORT session, a LiteRT interpreter), opened once and shared."""


class Exporter:
    """One format: which precisions a source gets, how to write one, and how to run it (None: cannot run here)."""

    format = ""
    runtime = ""
    suffix = ""

    def precisions(self, src: Source, cfg: ExportConfig) -> list[str]:
        raise NotImplementedError

    def open(self, art: Artifact, cfg: ExportConfig) -> object:
        """The file loaded in its runtime; opened once per artifact (see :func:`opened`)."""
        raise NotImplementedError

    def write(self, src: Source, precision: str, path: Path, example: torch.Tensor, cfg: ExportConfig) -> None:
        raise NotImplementedError

    def runner(self, art: Artifact, cfg: ExportConfig) -> Callable[[np.ndarray], np.ndarray] | None:
        return None

    def timer(
        self, art: Artifact, batch: int, sample: np.ndarray, cfg: ExportConfig, workdir: Path
    ) -> Callable[[], object] | None:
        """A no-argument call that runs the file once at ``batch`` (None: not timed here)."""
        return None

    def details(self, art: Artifact, cfg: ExportConfig) -> dict:
        return {}


class OnnxExporter(Exporter):
    format, runtime, suffix = "onnx", "onnxruntime", ".onnx"

    def precisions(self, src, cfg):
        return ["int8" if src.quantized else "fp32"]

    def write(self, src, precision, path, example, cfg):
        from .export.onnx import export_onnx

        export_onnx(src.model, example[:2] if len(example) >= 2 else example, path)

    def open(self, art, cfg):
        return verify.session(art.path, threads=cfg.latency_threads)

    def runner(self, art, cfg):
        sess = opened(art, cfg)
        return lambda x: verify.run(sess, x)

    def timer(self, art, batch, sample, cfg, workdir):
        sess = opened(art, cfg)
        x = {sess.get_inputs()[0].name: verify.batch_of(sample, batch)}
        return lambda: sess.run(None, x)

    def details(self, art, cfg):
        return {"integer_kernels": verify.fused_int8_ops(art.path)} if art.source.quantized else {}


class TFLiteExporter(Exporter):
    format, runtime, suffix = "tflite", "litert", ".tflite"

    def precisions(self, src, cfg):
        return [p for p in cfg.tflite.precisions if (p == "int8") == src.quantized]

    def write(self, src, precision, path, example, cfg):
        from .export.tflite import export_tflite

        export_tflite(src.model, example[:1], path, precision, cfg.tflite.io)

    def open(self, art, cfg):
        from .export.tflite import TFLiteRunner

        return TFLiteRunner(art.path, cfg.latency_threads)

    def runner(self, art, cfg):
        return opened(art, cfg).run

    def timer(self, art, batch, sample, cfg, workdir):
        """Files are written at batch 1; other batch sizes are timed on a copy converted at that batch."""
        from .export.tflite import TFLiteRunner, export_tflite

        runner = opened(art, cfg)
        if batch != runner.batch:
            path = workdir / f"b{batch}_{art.path.name}"
            example = torch.from_numpy(verify.batch_of(sample, batch))
            export_tflite(art.source.model, example, path, art.precision, cfg.tflite.io)
            runner = TFLiteRunner(path, cfg.latency_threads)
        x = verify.batch_of(sample, batch)
        return lambda: runner.run(x)

    def details(self, art, cfg):
        r = opened(art, cfg)
        return {"ops": dict(Counter(r.op_names())), "io_dtype": r.io_dtype}


class CoreMLExporter(Exporter):
    format, runtime, suffix = "coreml", "coreml (not run)", ".mlpackage"

    def precisions(self, src, cfg):
        return [p for p in cfg.coreml.precisions if (p != "fp16") == src.quantized]

    def write(self, src, precision, path, example, cfg):
        from .export.coreml import export_coreml

        export_coreml(src.model, example[:1], path, precision)

    def details(self, art, cfg):
        from .export.coreml import inspect_mlpackage, match_weights

        info = inspect_mlpackage(art.path)
        out = {"ops": info["ops"], "not_run": "Core ML has no runtime on Linux"}
        if art.precision != "fp16":
            out["weights"] = match_weights(info, art.source.model, art.precision)
        return out


class PackedExporter(Exporter):
    format, runtime, suffix = "packed", "pytorch (packed)", ".packed.safetensors"

    def precisions(self, src, cfg):
        """One file, labelled by the weight grids it packs: "packed-int2", or "packed-int2..8" when mixed."""
        from .nn.modules import QuantModule

        if not src.quantized:
            return []
        bits = sorted({m.weight_quant.spec.bits for m in src.model.modules()
                       if isinstance(m, QuantModule) and m.weight_quant is not None})  # fmt: skip
        if not bits:
            return []
        return [f"packed-int{bits[0]}" if len(bits) == 1 else f"packed-int{bits[0]}..{bits[-1]}"]

    def write(self, src, precision, path, example, cfg):
        from .export.packed import save_packed

        save_packed(src.model, path, {"source": src.stem, **(src.build or {})})

    def runner(self, art, cfg):
        """The file loaded back on its own when it says how to build the model, else into a copy of the source."""
        from .export.packed import apply_packed, load_packed_model

        if art.source.build:
            model = load_packed_model(art.path)
        else:
            model = apply_packed(copy.deepcopy(art.source.model), art.path)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return torch.cat([model(torch.from_numpy(x[i : i + 512])) for i in range(0, len(x), 512)]).numpy()

        return run


def opened(art: Artifact, cfg: ExportConfig):
    """The artifact's file loaded in its runtime, once: details, the accuracy run and timing share it."""
    if art.handle is None:
        art.handle = EXPORTERS[art.format].open(art, cfg)
    return art.handle


EXPORTERS: dict[str, Exporter] = {
    e.format: e for e in (OnnxExporter(), TFLiteExporter(), CoreMLExporter(), PackedExporter())
}


def check_extras(cfg: ExportConfig) -> None:
    """Refuse, before any training, formats whose optional extra is not installed."""
    from .extras import check_installed

    for fmt, what in (
        ("tflite", "TFLite export (export.formats: tflite)"),
        ("coreml", "Core ML export (export.formats: coreml)"),
    ):
        if fmt in cfg.formats:
            check_installed(fmt, what)


def write_artifacts(
    sources: list[Source], cfg: ExportConfig, out: Path, example: torch.Tensor, console=None
) -> list[Artifact]:
    """Write every (source, format, precision) the config asks for. A failed export is kept as an artifact with
    its error (the report shows it and parity fails) so that the other files are still written and checked."""
    arts = []
    for fmt in cfg.formats:
        ex = EXPORTERS[fmt]
        for src in sources:
            for p in ex.precisions(src, cfg):
                name = src.stem if p in ("fp32", "int8") or fmt == "packed" else f"{src.stem}_{p}"
                path = out / fmt / f"{name}{ex.suffix}"
                art = Artifact(src, fmt, p, path)
                try:
                    ex.write(src, p, path, example, cfg)
                except Exception as e:  # any converter failure: recorded, the other files still go ahead
                    art.error = _one_line(e)
                if console is not None:
                    console.print(f"{fmt} {p} from {src.stem}: {art.error or path}", highlight=False)
                arts.append(art)
    return arts


def verify_artifacts(
    arts: list[Artifact], x: np.ndarray, y: torch.Tensor, num_classes: int, cfg: ExportConfig, report: Report
) -> list[Row]:
    """Run each file in its runtime on the test split and add one row per file to ``report``."""
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
            run = ex.runner(art, cfg)
            if run is not None:
                logits = torch.from_numpy(run(x))
                row.metrics = classification_metrics(logits, y, num_classes)
                row.agreement = agreement(logits.numpy(), art.source.logits.numpy())
        except Exception as e:  # a file its runtime cannot load or run fails parity; the others are still checked
            art.error = _one_line(e)
            row.parity = f"failed: cannot run: {art.error}"
            continue
        src_acc = classification_metrics(art.source.logits, y, num_classes)["accuracy"]
        row.parity = _parity(row, art, src_acc, cfg)
    with tempfile.TemporaryDirectory() as workdir:
        for b in cfg.latency_batches:
            calls = {}
            for i, art in enumerate(arts):
                if not art.error:
                    try:
                        t = EXPORTERS[art.format].timer(art, b, x[:64], cfg, Path(workdir))
                    except Exception as e:  # e.g. the batch-b LiteRT copy does not convert: no latency
                        rows[i].details = {**(rows[i].details or {}), f"latency_b{b}": f"not timed: {_one_line(e)}"}
                        continue
                    if t is not None:
                        calls[i] = t
            for i, ms in verify.time_calls(calls, cfg.latency_seconds).items():
                rows[i].latency_ms[str(b)] = ms
    for row in rows.values():
        report.add(row)
    return list(rows.values())


def _parity(row: Row, art: Artifact, source_accuracy: float, cfg: ExportConfig) -> str:
    """ "ok", "failed: <why>", or for files that cannot run here the structural verdict."""
    problems = []
    if row.metrics is None:
        w = (row.details or {}).get("weights")
        if w is not None and (w["layers"] != w["expected"] or w["max_rel_diff"] > 1e-2 or w["luts_equal"] is False):
            problems.append(f"stored weights differ from the source ({w})")
        return f"failed: {'; '.join(problems)}" if problems else "structure ok (not run)"
    drop = source_accuracy - row.metrics["accuracy"]
    integer = art.precision in INTEGER_PRECISIONS or art.format == "packed"
    if integer and row.agreement < cfg.min_agreement:
        problems.append(f"top-1 agreement {100 * row.agreement:.2f}% < {100 * cfg.min_agreement:.0f}%")
    if drop > cfg.max_accuracy_drop:
        problems.append(f"accuracy {100 * drop:.2f} points below the source (limit {100 * cfg.max_accuracy_drop:.0f})")
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
