"""ONNX export: float models as they are, quantized models as QDQ graphs with int8 weight initializers."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from qatkit.base.batch import InputSpec, Positional, adapt, repeat_rows, rows
from qatkit.export import verify
from qatkit.export.diagnose import compare_layers, layer_output_map, record_layer_outputs
from qatkit.export.formats import Exporter, opened, quantized_layers
from qatkit.export.gemm_rewrite import rewrite_unfused_gemms
from qatkit.export.qdq import to_qdq
from qatkit.nn.modules import QuantModule


def export_onnx(model: nn.Module, example, path: str | Path, dynamic_batch: bool = True) -> Path:
    """Write ``model`` to ``path`` (one self-contained file). Quantized wrappers become Q/DQ + int8 weights.

    ``example`` is one input batch as the model takes it: a tensor, a tuple of tensors (positional inputs) or a
    dict (keyword inputs); the graph gets one named input per model input ("input" for a lone tensor, else the
    keyword names or "input0", "input1", ...), each with a dynamic batch dimension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = InputSpec.of(example)
    named = spec.named(example)
    quantized = any(isinstance(m, QuantModule) for m in model.modules())
    m = adapt(to_qdq(model) if quantized else model, spec)
    was_training = m.training
    m.eval()
    if dynamic_batch:  # batch size >= 2 so the exporter keeps the batch dimension symbolic
        named = {k: v if v.shape[0] >= 2 else v.expand(2, *v.shape[1:]).contiguous() for k, v in named.items()}
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in named) if dynamic_batch else None
    if shapes is not None and isinstance(m, Positional):
        shapes = (shapes,)  # the adapter takes the inputs as one *args parameter
    with quiet():
        torch.onnx.export(
            m,
            tuple(named.values()),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=shapes,
            input_names=list(spec.names),
            output_names=["logits"],
            verbose=False,
        )
    m.train(was_training)
    finish_onnx(path)
    return path


def finish_onnx(path: str | Path) -> None:
    """Post-process an exported file in place: record which value is each quantized layer's output (for
    ``qatkit diagnose``), drop debug metadata, make unfused int8 Gemms fusable, check it."""
    import onnx

    model = onnx.load(str(path))
    layers = layer_output_map(model)
    strip_debug_info(model)
    rewrite_unfused_gemms(model)
    record_layer_outputs(model, layers)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def strip_debug_info(model) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, local paths): not needed to run the model,
    it leaks the build machine's paths and would be a third of a small int8 file."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


@contextlib.contextmanager
def quiet(*more_loggers: str):
    """Silence the exporters' progress prints, warnings and the named loggers, and the native libraries' own
    logging to file descriptors 1 and 2 (LiteRT and Core ML write there from C++). Errors still raise."""
    names = ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo", "torch.utils._pytree", "torchao",
             *more_loggers)  # fmt: skip
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            _native_fds_to_devnull(),  # first, so it flushes the real streams before they are swapped
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


@contextlib.contextmanager
def _native_fds_to_devnull():
    """Point file descriptors 1 and 2 at /dev/null for the duration (restored afterwards)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


class OnnxExporter(Exporter):
    """ONNX files run in ONNX Runtime: the float model as it is, quantized models as QDQ graphs."""

    format, runtime, suffix = "onnx", "onnxruntime", ".onnx"

    def precisions(self, src, cfg):
        return ["int8" if src.quantized else "fp32"]

    def write(self, src, precision, path, example, spec, cfg):
        export_onnx(src.model, spec.structured(rows(example, 0, 2)), path)

    def open(self, art, cfg):
        return verify.session(art.path, threads=cfg.latency_threads)

    def runner(self, art, cfg):
        sess = opened(art, cfg)
        return lambda x: verify.run(sess, x)

    def timer(self, art, batch, sample, cfg, workdir):
        sess = opened(art, cfg)
        x = verify.feed(sess, repeat_rows(sample, batch))
        return lambda: sess.run(None, x)

    def details(self, art, cfg):
        return {"integer_kernels": verify.fused_int8_ops(art.path)} if art.source.quantized else {}

    def diagnose(self, model, path, spec, inputs):
        return compare_layers(model, path, spec, inputs)

    def float_layers(self, art, cfg):
        return (
            verify.float_quantized_layers(art.path, quantized_layers(art.source.model)) if art.source.quantized else []
        )
