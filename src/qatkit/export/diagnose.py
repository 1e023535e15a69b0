"""Where an exported ONNX file departs from the PyTorch model it came from, layer by layer.

At export, :func:`record_layer_outputs` stores in the file which graph value each quantized layer's output is
(read from the exporter's per-node module scopes before they are stripped). :func:`compare_layers` then runs the
same inputs through the PyTorch model (forward hooks) and ONNX Runtime (those values as extra graph outputs), and
measures each layer's difference in units of its output quantization step (1.0 = one step).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qatkit.base.batch import InputSpec, call, num_rows, rows
from qatkit.export.verify import weight_layer
from qatkit.nn.modules import QuantModule

ONE_STEP = 1.0 + 1e-3
"""More than this many steps apart is a real difference (exactly one step shows as 1.000003 in float32)."""
ADDS = ("Add", "Sum", "ADD")
"""Op types of a residual add (ONNX, LiteRT)."""
LAYER_MAP_KEY = "qatkit.layers"
"""Model-level metadata key: JSON object {layer name: {"input": value read, "output": value produced}}, in graph
order."""


def layer_output_map(proto) -> dict[str, dict[str, str]]:
    """Each quantized layer (a QDQ layer module) -> ``{"input": the first value its nodes read, "output": the
    value its last node produces}``, from the exporter's node metadata (``namespace``: ``name: class`` per
    scope); empty when the metadata is gone. Ordered by each layer's last node (graph order)."""
    out: dict[str, dict[str, str]] = {}
    for node in proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        for part in props.get("namespace", "").split("/"):
            name, _, cls = part.partition(": ")
            if name and cls.endswith(".QDQLayer") and node.output:
                entry = out.pop(name, {"input": node.input[0] if node.input else ""})
                out[name] = {**entry, "output": node.output[0]}  # re-inserted: the order of last nodes
    return out


def record_layer_outputs(proto, layers: dict[str, dict[str, str]]) -> None:
    """Store ``layers`` in the file's metadata, keeping only outputs the (post-processed) graph still produces."""
    produced = {o for n in proto.graph.node for o in n.output}
    kept = {k: v for k, v in layers.items() if v["output"] in produced}
    for p in list(proto.metadata_props):
        if p.key == LAYER_MAP_KEY:
            proto.metadata_props.remove(p)
    if kept:
        proto.metadata_props.add(key=LAYER_MAP_KEY, value=json.dumps(kept))


def read_layer_outputs(proto) -> dict[str, dict[str, str]]:
    """The layer map :func:`record_layer_outputs` stored ({layer: {"input", "output"}}); ValueError when the
    file has none."""
    for p in proto.metadata_props:
        if p.key == LAYER_MAP_KEY:
            data = json.loads(p.value)
            if isinstance(data, dict) and all(isinstance(v, dict) and isinstance(v.get("output"), str)
                                              for v in data.values()):  # fmt: skip
                return data
    raise ValueError("the file has no qatkit layer map (exported by another tool or an older qatkit): export "
                     "it again with qatkit to diagnose it")  # fmt: skip


@dataclass
class LayerDiff:
    """One quantized layer: its output's difference between the runtime and PyTorch."""

    name: str
    step: float
    """The output quantization step the differences are measured in (the layer's output scale; without an output
    quantizer, 1/255 of the PyTorch output's range)."""
    step_kind: str
    max_steps: float
    mean_steps: float
    cosine: float
    off_share: float
    """Share of values more than half a step apart."""
    cause: str = ""
    plain_max_steps: float | None = None
    """The max difference with the runtime's graph optimisations off (None: not measured)."""
    own_max_steps: float | None = None
    """The max difference of the PyTorch layer fed the runtime's own input to it: the layer's own part (None:
    not measured)."""


def _step(module: nn.Module, ref: torch.Tensor, file_step: float | None = None) -> tuple[float, str]:
    fq = getattr(module, "output_quant", None)
    if fq is not None and fq.quantizing:
        return float(fq.scale.detach().reshape(-1)[0]), "output scale"
    if file_step:
        return file_step, "file's tensor scale"
    span = float(ref.max() - ref.min()) if ref.numel() else 0.0
    return max(span / 255.0, 1e-12), "range/255"


def torch_layer_outputs(
    model: nn.Module, layers: list[str], batches: list, input_shapes: dict[str, tuple] | None = None
) -> dict[str, torch.Tensor]:
    """Each named layer's output over ``batches`` (inputs as the model takes them), concatenated along rows;
    ``input_shapes`` (if given) gets each layer's input shape per row."""
    modules = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    shapes = {} if input_shapes is None else input_shapes

    def hook(m, i, o, n):
        got[n].append(o.detach().float().clone())  # a copy: an in-place ReLU6 after the layer would change it
        shapes[n] = tuple(i[0].shape[1:])

    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in layers]
    try:
        with torch.no_grad():
            model.eval()
            for b in batches:
                call(model, b)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items() if v}


def runtime_layer_outputs(
    path: str | Path, values: dict[str, str], feeds: list[dict], optimize: bool = True
) -> dict[str, np.ndarray]:
    """The named graph values over ``feeds`` (ORT input dicts), computed by ONNX Runtime on CPU (``optimize``
    False: no graph optimisations, so Q/DQ pairs are not fused into integer kernels)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    outputs = {o.name for o in proto.graph.output}
    fed = {i.name for i in proto.graph.input}
    for v in values.values():
        if v not in outputs and v not in fed:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(v))
            outputs.add(v)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [v for v in dict.fromkeys(values.values()) if v not in fed]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in values.values()}
    for f in feeds:
        for n, arr in zip(names, sess.run(names, f), strict=True):
            parts[n].append(arr)
        for n in fed & set(parts):
            parts[n].append(f[n])
    return {layer: np.concatenate(parts[v]) for layer, v in values.items()}


@dataclass
class Diagnosis:
    """One file's per-layer differences, in graph order, with how they were captured."""

    layers: list[LayerDiff]
    runtime: str
    """What computed the file's side (the runtime and its settings)."""
    notes: list[str] = field(default_factory=list)
    """File-level findings (e.g. the delegated run against the kernels the layers were captured with)."""


@dataclass
class LayerContext:
    """What the file says about one layer, for naming a cause."""

    file_scale: np.ndarray | None = None
    """The layer's weight scale as stored in the file."""
    input_op: str | None = None
    """The op producing the layer's input (behind its input quantizer): ``Add`` for a residual add."""
    plain: np.ndarray | None = None
    """The layer's output with the runtime's graph optimisations (fusion into integer kernels) off."""
    step: float | None = None
    """The quantization step the file stores the layer's output with (for layers without an output quantizer)."""
    runtime_input: np.ndarray | None = None
    """The layer's input as the runtime computed it (in PyTorch's layout): fed to the PyTorch layer alone, it
    separates the layer's own difference from what it inherits."""
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    """An activation the file's op applies after the layer (LiteRT fuses ReLU/ReLU6 into it)."""


def batches_and_feeds(spec: InputSpec, inputs: dict[str, torch.Tensor], batch_size: int) -> tuple[list, list]:
    """``inputs`` cut into batches: structured as the model takes them, and as named arrays for a runtime."""
    cuts = [(i, min(i + batch_size, num_rows(inputs))) for i in range(0, num_rows(inputs), batch_size)]
    return ([spec.structured(rows(inputs, a, b)) for a, b in cuts],
            [{k: v.numpy() for k, v in rows(inputs, a, b).items()} for a, b in cuts])  # fmt: skip


def compare_layers(
    model: nn.Module, path: str | Path, spec: InputSpec, inputs: dict[str, torch.Tensor], batch_size: int = 256
) -> Diagnosis:
    """Per quantized layer of the ONNX file, in graph order: difference between ONNX Runtime and ``model`` on the
    same ``inputs`` (named as ``spec`` says), also with ORT's graph optimisations off (no integer-kernel
    fusion), with the cause where it can be named."""
    import onnx

    batches, feeds = batches_and_feeds(spec, inputs, batch_size)
    proto = onnx.load(str(path), load_external_data=False)
    layer_map = read_layer_outputs(proto)
    modules = dict(model.named_modules())
    values = {k: v["output"] for k, v in layer_map.items() if isinstance(modules.get(k), QuantModule)}
    got = runtime_layer_outputs(path, values, feeds)
    plain = runtime_layer_outputs(path, values, feeds, optimize=False)
    # a session of its own: a value read out is not fused, so reading inputs would change the measured layers
    inputs_read = runtime_layer_outputs(path, {k: layer_map[k].get("input", "") for k in values}, feeds)
    scales = weight_scales(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    context = {}
    for name in values:
        fed_by = producers.get(layer_map[name].get("input", ""))
        if fed_by is not None and fed_by.op_type == "QuantizeLinear":  # the layer's input quantizer: look behind it
            fed_by = producers.get(fed_by.input[0])
        context[name] = LayerContext(scales.get(name), fed_by.op_type if fed_by else None, plain[name],
                                     runtime_input=inputs_read[name])  # fmt: skip
    layers = layer_diffs(model, batches, got, context)
    return Diagnosis(layers, "ONNX Runtime, CPU, all graph optimisations (as verification runs it)")


def layer_diffs(
    model: nn.Module, batches: list, got: dict[str, np.ndarray], context: dict[str, LayerContext]
) -> list[LayerDiff]:
    """Each layer of ``got`` (runtime outputs, in PyTorch's layout) against the PyTorch model on ``batches``, in
    that order; where the runtime's input to a layer is known, also the layer alone on that input."""
    modules = dict(model.named_modules())
    in_shapes: dict[str, tuple] = {}
    ref = torch_layer_outputs(model, list(got), batches, in_shapes)
    diffs: list[LayerDiff] = []
    for name, values in got.items():
        ctx = context.get(name, LayerContext())
        act = ctx.activation or (lambda t: t)
        r = act(ref[name])
        step, kind = _step(modules[name], r, ctx.step)
        g = _as_ref(values, r)
        d = (g - r).abs() / step
        cos = (
            float(nn.functional.cosine_similarity(g.double().flatten(), r.double().flatten(), dim=0))
            if r.numel()
            else 1.0
        )
        plain = None if ctx.plain is None else float(((_as_ref(ctx.plain, r) - r).abs() / step).max())
        own = None
        if ctx.runtime_input is not None and ctx.runtime_input.size == r.shape[0] * int(np.prod(in_shapes[name])):
            x = torch.from_numpy(np.asarray(ctx.runtime_input, np.float32)).reshape(-1, *in_shapes[name])
            with torch.no_grad():
                own = float(((g - act(modules[name](x)).reshape(r.shape)).abs() / step).max())
        diffs.append(LayerDiff(name, step, kind, float(d.max()), float(d.mean()), cos,
                               float((d > 0.5).float().mean()), plain_max_steps=plain, own_max_steps=own))  # fmt: skip
        diffs[-1].cause = cause(diffs, modules[name], ctx.file_scale, ctx.input_op)
    return diffs


def _as_ref(values: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(ref.shape)


def weight_scales(proto) -> dict[str, np.ndarray]:
    """Each layer's weight scale as stored in the file: the scale of the DequantizeLinear whose integer weight
    initializer is named after the layer (exporters write ``a.b`` as ``a_b`` or ``p_a_b``)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    layers = list(read_layer_outputs(proto))
    out: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[1] not in inits:
            continue
        layer = weight_layer(node.input[0], layers)
        if layer is not None:
            out[layer] = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    return out


def cause(diffs: list[LayerDiff], module: nn.Module, file_scale: np.ndarray | None, input_op: str | None) -> str:
    """Why the last of ``diffs`` differs, where that can be known from the file and the model (``input_op``: the
    op type producing the layer's input, behind its input quantizer)."""
    d = diffs[-1]
    fq = getattr(module, "weight_quant", None)
    if fq is not None and file_scale is not None:
        mine = fq.scale.detach().double().reshape(-1).numpy()
        if mine.shape == file_scale.reshape(-1).shape:
            rel = float(np.max(np.abs(file_scale.reshape(-1) - mine) / np.maximum(np.abs(mine), 1e-30)))
            if rel > 1e-6:
                return f"the file's weight scale differs from the model's (up to {100 * rel:.3g}%)"
    if d.max_steps <= ONE_STEP:
        return "at most one step: rounding in the runtime's integer kernel" if d.max_steps > 0.5 else ""
    fused = d.plain_max_steps is not None and d.plain_max_steps <= ONE_STEP
    unfused = (f"; with the runtime's graph optimisations off it is within {d.plain_max_steps:.3g} steps: the "
               "fused integer kernels are the source" if fused else "")  # fmt: skip
    own = d.own_max_steps
    if own is not None and own <= ONE_STEP:  # the layer is right on the runtime's input: the input differs
        given = f"; fed the runtime's own input, the layer is within {own:.3g} steps"
        if input_op in ADDS:
            return ("its input is a residual add: one-step differences of the integer kernels before it add up "
                    f"there and are requantized{given}")  # fmt: skip
        src = next((p for p in reversed(diffs[:-1]) if p.max_steps >= 0.99), None)
        return (f"inherits the differences of earlier layers{f' ({src.name}: {src.max_steps:.3g} steps)' if src else ''}"
                f", which its weights amplify{given}")  # fmt: skip
    if own is not None:
        mine = f"{own:.3g} steps apart even on the runtime's own input"
        if fused:
            return f"this layer's own integer kernel: {mine}{unfused}"
        if d.plain_max_steps is not None:
            return (f"this layer itself: {mine}, {d.plain_max_steps:.3g} steps also with the runtime's optimisations "
                    "off: the file computes it differently (an export mismatch), not kernel rounding")  # fmt: skip
        return f"this layer itself: {mine}: the runtime's kernel (requantization or a fused op) computes it differently"
    upstream = next((p for p in reversed(diffs[:-1]) if p.max_steps > ONE_STEP), None)
    if upstream is not None:
        return f"inherits the difference of {upstream.name}{unfused}"
    if input_op in ADDS:
        return ("its input is a residual add: one-step differences of the integer kernels before it add up there "
                f"and are requantized{unfused}")  # fmt: skip
    if fused:
        return f"an op the runtime fused into an integer kernel rounds differently{unfused}"
    if d.step_kind == "output scale":
        return "several steps apart with matching inputs: requantization or an op the runtime fused differently"
    return "the runtime computes this layer differently (a fused or reordered op)"


def first_over_one_step(diffs: list[LayerDiff]) -> LayerDiff | None:
    """The first layer, in graph order, whose output differs by more than one step somewhere."""
    return next((d for d in diffs if d.max_steps > ONE_STEP), None)


def diffs_to_dicts(diffs: list[LayerDiff]) -> list[dict]:
    return [asdict(d) for d in diffs]
