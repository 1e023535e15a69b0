"""Core ML export through coremltools: ML Program ``.mlpackage`` files, and their structural inspection.

Precisions: ``fp16`` (float weights and activations in FP16); ``int8``: each quantized layer's weight is stored
as integers with the scales qatkit calibrated or trained (4-bit storage for grids of 4 bits or fewer),
activations FP16; ``lut``: each LUTLinear's weight is stored palettized with its own trained tables and indices
(not re-clustered), the low-rank scales applied around the matmul. Compression metadata is attached to plain
modules before conversion so that coremltools uses the given values. Core ML cannot run on Linux, so
:func:`inspect_mlpackage` checks files structurally: op types, stored tables and the weights they decode to.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qatkit.base.batch import InputSpec, adapt, rows
from qatkit.base.extras import require
from qatkit.export.formats import Exporter
from qatkit.export.onnx import quiet
from qatkit.export.verify import file_size
from qatkit.nn.lut_linear import LUTLinear
from qatkit.nn.modules import QuantConv1d, QuantLinear, QuantModule, activation_module

PRECISIONS = ("fp16", "int8", "lut")


def _ct():
    return require("coremltools", "coreml", "Core ML export")


def _register(module: nn.Module, **fields) -> None:
    """Attach coremltools compression metadata for ``module.weight`` (read by the converter)."""
    with quiet("coremltools"):
        _ct()
        from coremltools.optimize.torch._utils.metadata_utils import CompressionMetadata

    md = CompressionMetadata("weight")
    for k, v in fields.items():
        setattr(md, k, v)
    md.register(module)


def _plain_quantized(m: QuantModule) -> nn.Module:
    """A float Linear/Conv holding the wrapper's quantized weight, tagged with its integer scales."""
    fq = m.weight_quant
    with torch.no_grad():
        if fq.observing:
            fq.update_range(m.weight)
        w = fq(m.weight.detach())
    if isinstance(m, QuantLinear):
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    else:
        cls = nn.Conv1d if isinstance(m, QuantConv1d) else nn.Conv2d
        plain = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                    bias=m.bias is not None, padding_mode=m.padding_mode)  # fmt: skip
    with torch.no_grad():
        plain.weight.copy_(w)
        if m.bias is not None:
            plain.bias.copy_(m.bias)
    scale = _blocked(fq.scale.detach().float(), w.shape, fq.ch_axis, fq.group_size)
    fields = {"quantization_n_bits": 4 if fq.spec.bits <= 4 else 8, "quantization_scale": scale,
              "compression_type": ["quantization"]}  # fmt: skip
    if bool((fq.zero_point != 0).any()):
        fields["zero_point"] = _blocked(fq.zero_point.detach().float(), w.shape, fq.ch_axis, fq.group_size)
    _register(plain, **fields)
    bounds = m.fused_activation()
    return plain if bounds is None else nn.Sequential(plain, activation_module(bounds))


def _float_layer(m: QuantModule) -> nn.Module:
    """A quantized wrapper whose weight stays float (activation-only rules): its float layer, absorbed activation
    (ReLU / ReLU6 / Hardtanh) kept."""
    plain = copy.deepcopy(m).to_float()
    bounds = m.fused_activation()
    return plain if bounds is None else nn.Sequential(plain, activation_module(bounds))


def _blocked(p: torch.Tensor, shape: torch.Size, ch_axis: int | None, group: int) -> torch.Tensor:
    """A per-tensor / per-channel / per-group parameter shaped as Core ML's block-wise scale (same rank)."""
    if group:
        return p.reshape(shape[0], -1, *([1] * (len(shape) - 2)))
    out = [1] * len(shape)
    if ch_axis is not None:
        out[ch_axis] = shape[ch_axis]
    return p.reshape(out)


class PalettizedLinear(nn.Module):
    """``Σ_r a[:, r] ⊙ ((x ⊙ b[r]) @ Q.T) + bias`` with Q = lut[index]: a LUTLinear in a form whose weight
    is exactly a palettized tensor (the low-rank scales become two elementwise products per rank)."""

    def __init__(self, m: LUTLinear):
        super().__init__()
        with torch.no_grad():
            a, b = m.factors()
            q = m.codes(a, b) if bool(m.frozen) else m.table().gather(1, m._grouped(m.current_index()).long())
        self.weight = nn.Parameter(m._ungroup(q).detach().clone(), requires_grad=False)
        self.register_buffer("a", a.detach().t().contiguous().clone())
        self.register_buffer("b", b.detach().clone())
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        lut = m.table().detach().float()
        _register(self, lut=lut.reshape(lut.shape[0], 1, lut.shape[1], 1), compression_type=["palettization"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x * self.b[0], self.weight) * self.a[0]
        for r in range(1, self.b.shape[0]):
            y = y + F.linear(x * self.b[r], self.weight) * self.a[r]
        return y if self.bias is None else y + self.bias


def for_coreml(model: nn.Module, precision: str) -> nn.Module:
    """A copy of ``model`` with quantized layers replaced by plain modules carrying compression metadata."""
    out = copy.deepcopy(model).eval()
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantModule) and precision == "int8":
            new = _plain_quantized(m) if m.weight_quant is not None else _float_layer(m)
        elif isinstance(m, LUTLinear) and precision == "lut":
            new = PalettizedLinear(m)
        elif isinstance(m, (QuantModule, LUTLinear)):
            kind = "int8 (affine-quantized layers)" if isinstance(m, QuantModule) else "lut (LUT layers)"
            raise ValueError(f"Core ML precision {precision!r} cannot hold layer {name!r}: use {kind}")
        else:
            continue
        out.set_submodule(name, new)
    return out


def export_coreml(model: nn.Module, example, path: str | Path, precision: str = "fp16", method: str = "auto") -> Path:
    """Write ``model`` as an ML Program ``.mlpackage`` (FP16 compute, iOS 18 ops) for inputs shaped like
    ``example`` (float features, or int token ids for a causal LM wrapper).

    ``method``: "trace" (TorchScript, coremltools' most tested frontend), "export" (``torch.export``; Hugging
    Face causal LMs and ``nn.MultiheadAttention`` need it: the TorchScript frontend lacks ops they use, while
    the export frontend refuses some reshapes the tracer handles), or "auto": trace, then export if that fails.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Core ML precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    with quiet("coremltools"):
        ct = _ct()
    spec = InputSpec.of(example)
    m = adapt(for_coreml(model, precision), spec)
    example = spec.named(example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if method not in ("auto", "trace", "export"):
        raise ValueError(f"Core ML conversion method {method!r} is not one of auto, trace, export")
    if method == "auto":
        try:
            ml = _convert(ct, m, example, "trace")
        except Exception as first:  # coremltools raises many types for unsupported graphs
            try:
                ml = _convert(ct, m, example, "export")
            except Exception as second:
                raise RuntimeError(
                    f"Core ML conversion failed: trace: {_line(first)}; export: {_line(second)}"
                ) from None
    else:
        ml = _convert(ct, m, example, method)
    ml.save(str(path))
    return path


def _convert(ct, m: nn.Module, example: dict[str, torch.Tensor], method: str):
    """Convert with one Core ML input per model input (named as in ``example``)."""
    args = tuple(example.values())
    with quiet("coremltools"), torch.no_grad():
        if method == "trace":
            program = torch.jit.trace(m, args, check_trace=False)
            inputs = [ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.float32 if t.is_floating_point() else np.int32)
                      for n, t in example.items()]  # fmt: skip
        else:
            program, inputs = _exported(m, args), None
        return ct.convert(
            program,
            inputs=inputs,
            outputs=[ct.TensorType(name="logits")],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.iOS18,
        )


def _line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _exported(model: nn.Module, args: tuple):
    """``torch.export`` program in core ATen ops, without the ``alias`` nodes coremltools cannot convert (they
    are no-ops in inference; Hugging Face attention masks produce them)."""
    program = torch.export.export(model, args).run_decompositions()
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return program


def inspect_mlpackage(path: str | Path) -> dict:
    """What a saved .mlpackage holds, read without the Core ML runtime: op counts, input types, and for each
    compressed weight its decoded values (float32) and, for palettized ones, the stored table."""
    with quiet("coremltools"):
        ct = _ct()
        from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

        ml = ct.models.MLModel(str(path), skip_model_load=True)
        spec = ml.get_spec()
        prog = load_milproto(spec, specification_version=spec.specificationVersion, file_weights_dir=ml.weights_dir)
    ops = prog.functions["main"].operations
    weights = {}
    for op in ops:
        if op.op_type in ("constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"):
            entry = {"op": op.op_type, "value": np.asarray(op.materialized_val_inference(), dtype=np.float32)}
            if op.op_type == "constexpr_lut_to_dense":
                entry["lut"] = np.asarray(op.lut.val, dtype=np.float32)
                entry["index_dtype"] = str(op.indices.val.dtype)
            else:
                entry["data_dtype"] = str(op.data.val.dtype)
            weights[op.name] = entry
    return {
        "ops": dict(Counter(op.op_type for op in ops)),
        "inputs": [(i.name, i.type.WhichOneof("Type")) for i in spec.description.input],
        "weights": weights,
        "size_bytes": file_size(path),
    }


def match_weights(inspected: dict, model: nn.Module, precision: str) -> dict:
    """Compare each compressed weight in a file with the weight ``model`` computes with (FP16-rounded).

    Returns the number of layers compared, the largest absolute difference relative to the layer's largest
    weight, and for ``lut`` whether every stored table equals the trained one.
    """
    plain = for_coreml(model, precision)
    expected = {n.replace(".", "_"): p.detach().half().float().numpy() for n, p in plain.named_parameters()
                if n.endswith("weight") and hasattr(plain.get_submodule(n.rpartition(".")[0]), "_COREML_/weight/compression_type")}  # fmt: skip
    tables = {n.replace(".", "_"): m.table().detach().half().float().numpy() for n, m in model.named_modules()
              if isinstance(m, LUTLinear)}  # fmt: skip
    worst, luts_equal, matched = 0.0, True, 0
    for op_name, w in inspected["weights"].items():
        bare = op_name.removeprefix("p_").removeprefix("op_")  # p_<path>: torch.export; op_<n>: a top-level index
        names = (bare, bare.removeprefix("model_"))  # model_<path>: a multi-input model under its adapter
        key = next((k for k in expected for b in names if b.startswith(k + "_") or b == k), None)
        if key is None:
            continue
        matched += 1
        ref = expected[key]
        worst = max(worst, float(np.abs(w["value"] - ref).max() / max(np.abs(ref).max(), 1e-12)))
        layer = key[: -len("_weight")]
        if "lut" in w and layer in tables:
            stored = w["lut"].reshape(w["lut"].shape[0], -1)[:, : tables[layer].shape[1]]
            luts_equal &= bool(np.array_equal(stored, tables[layer]))
    return {"layers": matched, "expected": len(expected), "max_rel_diff": worst,
            "luts_equal": luts_equal if precision == "lut" else None}  # fmt: skip


class CoreMLExporter(Exporter):
    """ML Program packages: fp16 from the float model, int8 weights on each quantized model's own scales. There
    is no Core ML runtime on Linux: files are checked structurally (ops, stored weights decoded and compared)."""

    format, runtime, suffix, extra, title = "coreml", "coreml (not run)", ".mlpackage", "coreml", "Core ML export"

    def precisions(self, src, cfg):
        return [p for p in cfg.coreml.precisions if (p != "fp16") == src.quantized]

    def write(self, src, precision, path, example, spec, cfg):
        export_coreml(src.model, spec.structured(rows(example, 0, 1)), path, precision)

    def details(self, art, cfg):
        info = inspect_mlpackage(art.path)
        out = {"ops": info["ops"], "not_run": "Core ML has no runtime on Linux"}
        if art.precision != "fp16":
            out["weights"] = match_weights(info, art.source.model, art.precision)
        return out
