"""ExecuTorch export: ``.pte`` programs lowered to the XNNPACK delegate, run in ExecuTorch's own runtime.

Precisions: ``fp32`` from the float model; ``int8`` from each quantized model on its own scales (no
recalibration): the model's Q/DQ graph with int8 activations and int8 weight codes (``to_qdq(signed=True,
codes=True)``), which XNNPACK's partitioner turns into integer kernels. Files take float inputs and give float
outputs (the first quantize and the last dequantize run inside the delegate) and have a dynamic batch up to
``max_batch`` where ``torch.export`` allows it, else the example's fixed batch (fed in chunks, like LiteRT).

What the delegate takes is read from the lowered program before it is serialized: each Linear/Conv layer is
``int8`` (integer kernel), ``float`` (delegated, float kernel) or ``not delegated`` (ExecuTorch's portable
kernels), with the ops left outside the delegate; the file carries that map as a constant method.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qatkit.base.batch import InputSpec, Positional, adapt, repeat_rows, rows
from qatkit.base.extras import require
from qatkit.export.formats import Exporter, opened, quantized_layers
from qatkit.export.onnx import quiet
from qatkit.export.qdq import QDQWeight, require_int8_weights, to_qdq
from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.nn.modules import QuantModule

PRECISIONS = ("fp32", "int8")
INFO_METHOD = "qatkit_info"
"""The constant method holding what the delegate took (JSON), read back by the runner."""
EXAMPLE_ROWS = 16
"""Rows of the traced example: with fewer, a convolution's shape guard narrows the dynamic batch to below it."""
COMPUTE = ("aten.linear", "aten.convolution", "aten.addmm", "aten.mm.", "aten.bmm")
ABORTING = (".quantize_per_channel",)
"""Ops whose portable ExecuTorch kernel aborts the process (an assert, not an exception) on qatkit's graphs."""


def _executorch(what: str = "ExecuTorch export"):
    require("executorch", "executorch", what)  # the package first: its submodules may already be imported
    return require("executorch.exir", "executorch", what)


def export_executorch(model: nn.Module, example, path: str | Path, precision: str = "fp32",
                      max_batch: int = 256) -> dict:  # fmt: skip
    """Write ``model`` as an XNNPACK-delegated ``.pte`` at ``path`` (inputs as ``example``: a tensor, a tuple
    or a dict, taken positionally in that order); returns what the delegate took (see :func:`delegation`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"ExecuTorch precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    quantized = any(isinstance(m, QuantModule) for m in model.modules())
    if quantized != (precision == "int8"):
        need = "a quantized (PTQ or QAT)" if precision == "int8" else "a float"
        raise ValueError(f"ExecuTorch precision {precision!r} needs {need} model")
    if quantized:
        require_int8_weights(model, "ExecuTorch int8")
        model = _xnnpack_grids(to_qdq(model, signed=True, codes=True))
    spec = InputSpec.of(example)
    was_training = model.training
    graph = adapt(model.eval(), spec)
    with quiet("executorch"):
        _executorch()
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeProgramManager, to_edge_transform_and_lower

        program, batch = _export(graph, spec.named(example), max_batch)
        try:
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        except (RuntimeError, AssertionError) as e:
            hint = "; fold each BatchNorm into its convolution first (qatkit.transform.fold.fold_batchnorm)" if any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else ""  # fmt: skip
            raise ValueError(f"ExecuTorch {precision}: XNNPACK could not lower the graph "
                             f"({str(e).splitlines()[0][:200]}){hint}") from None  # fmt: skip
        info = {"batch": batch, **delegation(edge.exported_program().graph_module, graph)}
        bad = [o for o in info["outside"] if any(a in o["op"] for a in ABORTING)]
        if bad:
            raise ValueError(f"ExecuTorch {precision}: {bad[0]['op']} of layer {bad[0]['layer']!r} stays outside the "
                             "XNNPACK delegate, where ExecuTorch's kernel would abort the process")  # fmt: skip
        if info["outside"]:
            import executorch.kernels.quantized  # noqa: F401  (kernels for quantize/dequantize left outside)
        em = EdgeProgramManager({"forward": edge.exported_program()}, {INFO_METHOD: json.dumps(info)},
                                edge.compile_config)  # fmt: skip
        buffer = em.to_executorch().buffer
    model.train(was_training)  # the caller's model as it was (a float model is traced in place)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer)
    return info


def _export(graph: nn.Module, named: dict[str, torch.Tensor], max_batch: int):
    """``torch.export`` with a dynamic batch of 1..``max_batch`` (traced on the example's rows repeated to 16);
    where the model pins its batch, at the example's own batch. Returns the program and its batch ("dynamic" or
    the fixed size)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    shapes = tuple({0: batch} for _ in named)
    if isinstance(graph, Positional):
        shapes = (shapes,)  # the adapter takes the inputs as one *args parameter
    rows16 = tuple(v[torch.arange(max(EXAMPLE_ROWS, len(v))) % len(v)] for v in named.values())
    try:
        return torch.export.export(graph, rows16, dynamic_shapes=shapes), "dynamic"
    except Exception:  # noqa: BLE001  (a pinned batch raises several types; any other problem fails again below)
        pass
    args = tuple(named.values())
    return torch.export.export(graph, args), len(args[0])


def _xnnpack_grids(g: nn.Module) -> nn.Module:
    """Conv weights on grids narrower than 8 bits declared on the int8 grid (the same codes and values):
    XNNPACK packs sub-8-bit weights for Linear layers only and fails to lower a 4-bit convolution."""
    for m in g.modules():
        if isinstance(m, QDQWeight) and len(m.shape) > 2 and m.dtype == torch.int8 and m.qmax < 127:
            m.qmin, m.qmax = -128, 127
    return g


def delegation(gm: torch.fx.GraphModule, root: nn.Module) -> dict:
    """What XNNPACK took from a lowered edge program: each Linear/Conv layer's form (``int8``, ``float`` or
    ``not delegated``), the ops left outside the delegate with their layers, and the delegate count."""
    from executorch.exir.lowered_backend_module import get_lowered_submodules

    prefix = "model." if isinstance(root, Positional) else ""
    layers: dict[str, str] = {}
    lowered = get_lowered_submodules(gm)
    for _, sub, _ in lowered:
        for n in sub.original_module.graph_module.graph.nodes:
            if _compute(n):
                layers[_layer(n, prefix)] = "int8" if _integer(n) else "float"
    outside = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or any(
            k in str(n.target) for k in ("executorch_call_delegate", "getitem", "sym_size")
        ):
            continue
        outside.append({"op": _op_name(n), "layer": _layer(n, prefix)})
        if _compute(n):
            layers[_layer(n, prefix)] = "not delegated"
    return {"delegates": len(lowered), "layers": layers, "outside": outside}


def _op_name(n: torch.fx.Node) -> str:
    """``aten.view_copy.default`` rather than the edge dialect's long repr."""
    name = getattr(n.target, "__name__", None) or str(n.target)
    return str(name).split(":")[0].strip("<> ").removeprefix("EdgeOpOverload").strip()


def _compute(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and any(c in str(n.target) for c in COMPUTE)


def _layer(n: torch.fx.Node, prefix: str) -> str:
    """The module a node was traced in (QDQ layers keep their source layer's name)."""
    stack = n.meta.get("nn_module_stack") or {}
    name = list(stack.values())[-1][0] if stack else ""
    name = "" if name.startswith("_empty") else name
    name = "" if name == prefix.rstrip(".") else name.removeprefix(prefix)
    return name.rsplit(".weight_qdq", 1)[0].rsplit(".input_qdq", 1)[0].rsplit(".output_qdq", 1)[0] or "(model)"


def _is(node, name: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and name in str(node.target)


def _integer(n: torch.fx.Node) -> bool:
    """XNNPACK's integer pattern: dequantized activation and weight in, a quantize out (through one ReLU/clamp)."""
    x, w = n.args[0], n.args[1]
    if _is(n, "addmm"):  # addmm(bias, x, permute(w))
        x, w = n.args[1], n.args[2].args[0] if _is(n.args[2], "permute") else n.args[2]
    users = list(n.users)
    if len(users) == 1 and any(_is(users[0], a) for a in ("relu", "clamp", "hardtanh")):
        users = list(users[0].users)
    dq = "dequantize_per"
    return _is(x, dq) and _is(w, dq) and bool(users) and all(_is(u, "quantize_per_tensor") for u in users)


_THREADS: list[int] = []
"""The thread count ExecuTorch's pool was set to in this process (it is set once, before any method loads)."""


def _set_threads(threads: int) -> None:
    """Size ExecuTorch's process-wide thread pool before the first method is loaded: resetting it after a
    method holds it is unsafe (a crash, not an exception); later requests for another size keep the first."""
    if _THREADS:
        return
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(threads)
    _THREADS.append(threads)


class ExecuTorchRunner:
    """A ``.pte`` file loaded in ExecuTorch's runtime: named float arrays in, float outputs out."""

    def __init__(self, path: str | Path, threads: int = 1):
        self.path = Path(path)
        with quiet("executorch"):
            _executorch("Running ExecuTorch files")
            _set_threads(threads)
            from executorch.runtime import Runtime

            try:
                program = Runtime.get().load_program(self.path)
                self.method = program.load_method("forward")
                self.info = json.loads(program.load_method(INFO_METHOD).execute([])[0])
            except (RuntimeError, ValueError) as e:  # ExecuTorch's own error codes say little
                raise ValueError(f"{self.path}: not an ExecuTorch program written by qatkit, or a damaged one "
                                 f"({str(e).splitlines()[0][:120]})") from None  # fmt: skip
        self.batch = self.info["batch"]
        """"dynamic" (any batch up to the exported maximum) or the file's fixed batch."""
        self.max_batch = program.metadata("forward").input_tensor_meta(0).sizes()[0]

    def call(self, xs: list[torch.Tensor]) -> np.ndarray:
        return self.method.execute(xs)[0].numpy()

    def tensors(self, x) -> list[torch.Tensor]:
        xs = list(x.values()) if isinstance(x, dict) else [x]
        return [torch.from_numpy(np.ascontiguousarray(v)) for v in xs]

    def run(self, x) -> np.ndarray:
        """Outputs for every row of ``x`` (an array, or named arrays in model-input order), in chunks of the
        file's batch (a fixed-batch file's tail padded)."""
        xs = self.tensors(x)
        out = []
        for i in range(0, len(xs[0]), self.max_batch):
            chunk = [v[i : i + self.max_batch] for v in xs]
            k = len(chunk[0])
            if self.batch != "dynamic" and k < self.max_batch:
                chunk = [torch.cat([c, c[-1:].expand(self.max_batch - k, *c.shape[1:])]) for c in chunk]
            out.append(self.call([c.contiguous() for c in chunk])[:k])
        return np.concatenate(out)


class ExecuTorchExporter(Exporter):
    """ExecuTorch programs with the XNNPACK delegate: fp32 from the float model, int8 from each quantized one."""

    format, runtime, suffix, extra, title = (
        "executorch",
        "executorch-xnnpack",
        ".pte",
        "executorch",
        "ExecuTorch export",
    )
    float_in_effect_fails = True

    def precisions(self, src, cfg):
        return [p for p in cfg.executorch.precisions if (p == "int8") == src.quantized]

    def write(self, src, precision, path, example, spec, cfg):
        export_executorch(src.model, spec.structured(rows(example, 0, 2)), path, precision, cfg.executorch.max_batch)

    def open(self, art, cfg):
        return ExecuTorchRunner(art.path, cfg.latency_threads)

    def runner(self, art, cfg):
        return opened(art, cfg).run

    def timer(self, art, batch, sample, cfg, workdir):
        r = opened(art, cfg)
        if (r.batch != "dynamic" and batch != r.max_batch) or batch > r.max_batch:
            return lambda: r.run(repeat_rows(sample, batch))
        xs = r.tensors(repeat_rows(sample, batch))
        return lambda: r.call(xs)

    def details(self, art, cfg):
        info = opened(art, cfg).info
        forms: dict[str, int] = {}
        for form in info["layers"].values():
            forms[form] = forms.get(form, 0) + 1
        outside = sorted({f"{o['op']} @ {o['layer']}" for o in info["outside"]})
        return {"batch": info["batch"], "delegates": info["delegates"], "layers": forms, "outside": outside}

    def float_layers(self, art, cfg):
        """Quantized layers the file does not run as XNNPACK integer kernels, by name and form."""
        if not art.source.quantized:
            return []
        forms = opened(art, cfg).info["layers"]
        return [f"{n} ({forms.get(n, 'not found')})" for n in quantized_layers(art.source.model)
                if forms.get(n) != "int8"]  # fmt: skip
