"""Where a LiteRT file departs from the PyTorch model it came from, layer by layer.

LiteRT keeps intermediate tensors only when asked (``experimental_preserve_all_tensors``) and only for the
kernels it runs itself: the XNNPACK delegate, which verification uses, keeps none. Layers are therefore captured
with LiteRT's builtin kernels, and the delegated run's final outputs are compared with the builtin ones (a note
says how far apart they are). A layer is found by the module scope litert-torch writes into the names of the
tensors it produces (``Root/pkg.Class_attr/...``), so files written with ``tflite: {strip_names: true}`` cannot
be diagnosed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qatkit.base.batch import InputSpec, adapt
from qatkit.export.diagnose import Diagnosis, LayerContext, layer_diffs
from qatkit.export.qdq import QDQLayer
from qatkit.export.tflite import COMPUTE_OPS, TFLiteRunner
from qatkit.nn.modules import QuantModule

CHANNELS_LAST = ("CONV_2D", "DEPTHWISE_CONV_2D")
"""Ops whose outputs LiteRT lays out channels last (NHWC); PyTorch's are channels first."""
FUSED_ACTIVATIONS = {1: ("RELU", lambda t: t.clamp(min=0)), 2: ("RELU_N1_TO_1", lambda t: t.clamp(-1, 1)),
                     3: ("RELU6", lambda t: t.clamp(0, 6)), 4: ("TANH", torch.tanh)}  # fmt: skip
"""LiteRT's ``ActivationFunctionType`` codes: an op's output already has the next activation applied."""


def _qualname(m: nn.Module) -> str:
    cls = QDQLayer if isinstance(m, QuantModule) else type(m)  # the exporter converts the Q/DQ form
    return f"{cls.__module__}.{cls.__qualname__}"


def layer_scopes(model: nn.Module, spec: InputSpec) -> dict[str, str]:
    """Each quantized layer of ``model`` -> the scope litert-torch names its tensors with, in a file written
    from ``model`` taking inputs ``spec`` (``Root/pkg.Class_attr/.../qatkit.export.qdq.QDQLayer_attr``)."""
    root = adapt(model, spec)
    prefix = "" if root is model else "model."  # Positional wraps the model as .model
    scopes = {"": _qualname(root)}
    out = {}
    for name, m in root.named_modules():
        if not name:
            continue
        parent, _, attr = name.rpartition(".")
        scopes[name] = f"{scopes[parent]}/{_qualname(m)}_{attr}"
        if isinstance(m, QuantModule):
            out[name.removeprefix(prefix)] = scopes[name]
    return out


def layer_ops(interpreter, scopes: dict[str, str]) -> dict[str, dict]:
    """Each layer's compute op (FULLY_CONNECTED, CONV_2D, ...), in execution order: the first compute op not yet
    taken whose output's name holds the layer's exact scope (fused ops list several scopes, ``;``-separated)."""
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    by_scope = {v: k for k, v in scopes.items()}
    out: dict[str, dict] = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] not in COMPUTE_OPS:
            continue
        pieces = [p for i in op["outputs"] for p in tensors[i]["name"].split(";")]
        layer = next((by_scope[p] for p in pieces if p in by_scope and by_scope[p] not in out), None)
        if layer is not None:
            out[layer] = op
    return out


def compare_layers_tflite(
    model: nn.Module, path: str | Path, spec: InputSpec, inputs: dict[str, torch.Tensor]
) -> Diagnosis:
    """Per quantized layer of the LiteRT file, in execution order: its output in LiteRT's builtin kernels
    against ``model`` on the same ``inputs``, with the cause where it can be named."""
    runner = TFLiteRunner(path, keep_tensors=True)
    tensors = {t["index"]: t for t in runner.interpreter.get_tensor_details()}
    ops = layer_ops(runner.interpreter, layer_scopes(model, spec))
    if not ops:
        raise ValueError(f"{Path(path).name}: no layer found by its tensor names (written with strip_names, or "
                         "not by qatkit): export it again with names kept to diagnose it")  # fmt: skip
    x = {k: v.numpy() for k, v in inputs.items()}
    producers = {o: op for op in runner.interpreter._get_ops_details() for o in op["outputs"]}
    wanted = [op["outputs"][0] for op in ops.values()] + [_layer_input(op, producers) for op in ops.values()]
    captured = runner.capture(x, [tensors[i] for i in wanted])
    fused = fused_activations(path)
    got, context = {}, {}
    for (name, op), values, runtime_in in zip(ops.items(), captured[: len(ops)], captured[len(ops) :], strict=True):
        got[name] = _channels_first(values, op)
        weight = tensors[op["inputs"][1]]["quantization_parameters"]["scales"] if len(op["inputs"]) > 1 else None
        out_scale = float(tensors[op["outputs"][0]]["quantization"][0]) or None
        fed_by = producers.get(op["inputs"][0])
        if fed_by is not None and fed_by["op_name"] == "QUANTIZE":
            fed_by = producers.get(fed_by["inputs"][0])
        act = FUSED_ACTIVATIONS.get(fused.get(op["index"], 0))
        context[name] = LayerContext(weight if weight is not None and len(weight) else None,
                                     fed_by["op_name"] if fed_by else None, step=out_scale,
                                     runtime_input=_channels_first(runtime_in, op), activation=act[1] if act else None)  # fmt: skip
    layers = layer_diffs(model, [spec.structured(inputs)], got, context)
    notes = [_delegate_note(path, x, runner.capture(x, [runner.output])[0])]
    applied: dict[str, list[str]] = {}
    for name, op in ops.items():
        if fused.get(op["index"]) in FUSED_ACTIVATIONS:
            applied.setdefault(FUSED_ACTIVATIONS[fused[op["index"]]][0], []).append(name)
    for act, names in applied.items():
        notes.append(f"{len(names)} layers' ops apply the following {act} (compared after it in PyTorch): "
                     f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")  # fmt: skip
    return Diagnosis(layers, "LiteRT builtin kernels (the XNNPACK delegate keeps no intermediate tensors)", notes)


def _channels_first(values: np.ndarray, op: dict) -> np.ndarray:
    return np.moveaxis(values, -1, 1) if op["op_name"] in CHANNELS_LAST else values


def _layer_input(op: dict, producers: dict[int, dict]) -> int:
    """The tensor holding a layer's input: the compute op's first input, before an explicit PAD."""
    fed_by = producers.get(op["inputs"][0])
    return fed_by["inputs"][0] if fed_by is not None and fed_by["op_name"] in ("PAD", "PADV2") else op["inputs"][0]


def fused_activations(path: str | Path) -> dict[int, int]:
    """Operator index (first subgraph) -> the activation fused into it (LiteRT ``ActivationFunctionType``)."""
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0).subgraphs[0]
    return {i: int(getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0)
            for i, op in enumerate(graph.operators)}  # fmt: skip


def _delegate_note(path: str | Path, x: dict[str, np.ndarray], builtin: np.ndarray) -> str:
    """How far the delegated run (what verification measured) is from the builtin kernels' outputs."""
    delegated = TFLiteRunner(path).run(x)
    gap = float(np.abs(delegated - builtin).max()) if builtin.size else 0.0
    span = float(builtin.max() - builtin.min()) if builtin.size else 0.0
    steps = gap / max(span / 255.0, 1e-12)
    return (f"the XNNPACK-delegated run (what verification measures) against the builtin kernels: outputs up to "
            f"{gap:.3g} apart ({steps:.3g} steps of the output's range/255)")  # fmt: skip
