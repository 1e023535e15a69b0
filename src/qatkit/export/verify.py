"""Check an exported file in ONNX Runtime: outputs, accuracy, fused int8 kernels, size and latency."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

INTEGER_KERNELS = {
    "QGemm",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
    "QLinearAdd",
    "QLinearMul",
    "DynamicQuantizeMatMul",
    "QAttention",
    "MatMulNBits",
    "GatherBlockQuantized",
}
"""ORT op types that compute on integer data (what QDQ fusion should produce)."""


def session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None):
    """An ORT CPU session with a fixed thread count (so latency comparisons are fair)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feed(sess, x) -> dict[str, np.ndarray]:
    """ORT's input dict for named arrays (a lone array goes to the first input); floats as float32."""
    if not isinstance(x, dict):
        x = {sess.get_inputs()[0].name: x}
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in x.items()}


def run(sess, x, batch_size: int = 256) -> np.ndarray:
    """Outputs for all rows of ``x`` (an array, or named arrays for several inputs), in batches."""
    x = feed(sess, x)
    n = len(next(iter(x.values())))
    outs = [sess.run(None, {k: v[i : i + batch_size] for k, v in x.items()})[0] for i in range(0, n, batch_size)]
    return np.concatenate(outs)


def optimized_op_counts(path: str | Path) -> Counter:
    """Op types of the graph ORT actually runs after its optimisations (QDQ fusion included)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        session(path, optimized_path=opt)
        graph = onnx.load(str(opt)).graph
    return Counter(n.op_type for n in graph.node)


def fused_int8_ops(path: str | Path) -> dict[str, int]:
    """Integer kernels in ORT's optimised graph; empty means the QDQ graph runs in float."""
    return {k: v for k, v in optimized_op_counts(path).items() if k in INTEGER_KERNELS}


FLOAT_KERNELS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose"}


def float_quantized_layers(path: str | Path, layers: list[str]) -> list[str]:
    """Those of ``layers`` (qualified module names) whose weight still feeds a float Conv/Gemm/MatMul in ORT's
    optimised graph, i.e. that ONNX Runtime dequantizes and runs in float instead of as an integer kernel."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        session(path, optimized_path=opt)
        graph = onnx.load(str(opt)).graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    slow = []
    for node in graph.node:
        if node.op_type not in FLOAT_KERNELS:
            continue
        for inp in node.input:
            dq = producers.get(inp)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            layer = weight_layer(dq.input[0], layers)
            if layer is not None and layer not in slow:
                slow.append(layer)
    return slow


def _flat(name: str) -> str:
    """A tensor or module name with separators removed (exporters write ``a.b`` as ``a_b`` or ``p_a_b``)."""
    return name.removeprefix("p_").removeprefix("b_").replace(".", "").replace("_", "")


def weight_layer(tensor: str, layers) -> str | None:
    """Which of ``layers`` (qualified module names) the exported weight tensor ``tensor`` belongs to (the longest
    name it starts with, followed by "weight"), or None."""
    name = _flat(tensor)
    keys = sorted(((_flat(layer), layer) for layer in layers), key=lambda k: len(k[0]), reverse=True)
    return next((layer for k, layer in keys if name.startswith(k + "weight")), None)


def file_size(path: str | Path) -> int:
    """Bytes in a file, or in all files under a folder (an .mlpackage is a folder)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(p) for f in fs)


def time_calls(calls: dict[str, Callable[[], object]], seconds: float = 0.5, rounds: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each callable, measured interleaved.

    The callables take turns in ``rounds`` rounds of about ``seconds / rounds`` each, so machine noise hits all
    of them alike; the median over rounds is reported.
    """
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for k, fn in calls.items():
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                el = time.perf_counter() - t0
                if el >= seconds / rounds and n >= 3:
                    break
            times[k].append(1000.0 * el / n)
    return {k: statistics.median(v) for k, v in times.items()}


def batch_of(sample: np.ndarray, b: int) -> np.ndarray:
    """``b`` rows made by repeating ``sample`` (float32)."""
    reps = int(np.ceil(b / len(sample)))
    return np.concatenate([sample] * reps)[:b].astype(np.float32)


def latencies(
    sessions: dict[str, object], sample: np.ndarray, batches: list[int], seconds: float = 0.5, rounds: int = 5
) -> dict[str, dict[int, float]]:
    """Median milliseconds per call for each ORT session and batch size (see :func:`time_calls`)."""
    out: dict[str, dict[int, float]] = {k: {} for k in sessions}
    for b in batches:
        x = batch_of(sample, b)
        calls = {k: (lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x})) for k, s in sessions.items()}
        for k, ms in time_calls(calls, seconds, rounds).items():
            out[k][b] = ms
    return out
