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

from ..nn.modules import QuantModule
from .gemm_rewrite import rewrite_unfused_gemms
from .qdq import to_qdq


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, dynamic_batch: bool = True) -> Path:
    """Write ``model`` to ``path`` (one self-contained file). Quantized wrappers become Q/DQ + int8 weights.

    ``example`` is one input batch (batch size >= 2 so the batch dimension stays dynamic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    quantized = any(isinstance(m, QuantModule) for m in model.modules())
    m = to_qdq(model) if quantized else model
    was_training = m.training
    m.eval()
    if dynamic_batch and example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with quiet():
        torch.onnx.export(
            m,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=shapes,
            input_names=["input"],
            output_names=["logits"],
            verbose=False,
        )
    m.train(was_training)
    finish_onnx(path)
    return path


def finish_onnx(path: str | Path) -> None:
    """Post-process an exported file in place: drop debug metadata, make unfused int8 Gemms fusable, check it."""
    import onnx

    model = onnx.load(str(path))
    strip_debug_info(model)
    rewrite_unfused_gemms(model)
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
