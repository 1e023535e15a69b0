"""LiteRT (TFLite) export through litert-torch, and running the files in the LiteRT interpreter.

Precisions: ``fp32`` (the float graph) and ``fp16`` (FP16 weights, by ai-edge-quantizer) from the float model;
``int8``: a full-integer model from a quantized qatkit model, using the scales it was calibrated or trained with
(no re-calibration); ``hybrid``: the same, with the layers the rules left float storing int8 weights (float
compute); ``int8_weights`` (weight-only int8 everywhere, float compute) and ``dynamic_int8`` (int8 weights,
activations quantized at run time, by ai-edge-quantizer) from either, a quantized model contributing its
fake-quantized weights. ``io`` picks int8 or float inputs/outputs for ``int8``/``hybrid`` files. Files have a
fixed batch size (the exporter cannot lower a dynamic batch through flatten); run() feeds rows in chunks of it.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qatkit.base.batch import InputSpec, adapt, repeat_rows, rows
from qatkit.base.extras import require
from qatkit.export.formats import Exporter, opened, quantized_layers
from qatkit.export.onnx import quiet
from qatkit.export.qdq import require_int8_weights, to_qdq
from qatkit.export.tflite_weights import count_layers, float_copy, layer_forms, with_int8_weights
from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.nn.modules import QuantModule

PRECISIONS = ("fp32", "fp16", "dynamic_int8", "int8", "hybrid", "int8_weights")
FLOAT_ONLY, QUANTIZED_ONLY = ("fp32", "fp16"), ("int8", "hybrid")
"""Precisions made from the float model only / from a quantized model only (the others: from either)."""
_FP16_RECIPE = [
    {
        "regex": ".*",
        "operation": "*",
        "algorithm_key": "float_casting",
        "op_config": {
            "weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
            "compute_precision": "FLOAT",
            "explicit_dequantize": True,
        },
    }
]


def _litert_torch():
    return require("litert_torch", "tflite", "TFLite export")


def export_tflite(
    model: nn.Module, example, path: str | Path, precision: str = "fp32", io: str = "float", strip_names: bool = False
) -> Path:
    """Write ``model`` as a LiteRT flatbuffer at ``path`` (batch size of ``example``: a tensor, a tuple of
    positional inputs or a dict of keyword inputs; the file takes them positionally, in that order)."""
    if precision not in PRECISIONS:
        raise ValueError(f"TFLite precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if io not in ("float", "int8"):
        raise ValueError(f"TFLite io {io!r} is not one of float, int8")
    _check_source(model, precision)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = InputSpec.of(example)
    args = tuple(spec.named(example).values())
    with quiet("litert_torch", "absl"):
        lt = _litert_torch()
        if precision in QUANTIZED_ONLY:
            _convert_int8(lt, model, spec, args, path, io, weights_too=precision == "hybrid")
        elif precision == "int8_weights":
            _convert_static(lt, to_qdq(with_int8_weights(model, False), signed=True), spec, args, path, True)
        elif precision == "fp32":
            lt.convert(adapt(model.eval(), spec), args).export(str(path))
        else:
            with tempfile.TemporaryDirectory() as d:
                float_path = Path(d) / "float.tflite"
                lt.convert(adapt(float_copy(model), spec), args).export(str(float_path))
                _quantize_file(float_path, path, precision)
    if strip_names:
        strip_tensor_names(path)
    return path


def strip_tensor_names(path: Path) -> int:
    """Rewrite a LiteRT file without its internal tensor names (debug strings; graph inputs and outputs keep
    theirs): the same graph and buffers in a smaller file. Returns the bytes saved."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    data = path.read_bytes()
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    for sg in model.subgraphs:
        keep = {int(i) for ids in (sg.inputs, sg.outputs) if ids is not None for i in ids}
        for i, t in enumerate(sg.tensors):
            if i not in keep:
                t.name = b""
    builder = flatbuffers.Builder(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out = bytes(builder.Output())
    atomic_write_bytes(path, out)
    return len(data) - len(out)


def _check_source(model: nn.Module, precision: str) -> None:
    """Refuse a precision the model cannot give (fp32/fp16 need a float model; int8/hybrid a quantized one)."""
    quantized = any(isinstance(m, QuantModule) for m in model.modules())
    if precision in FLOAT_ONLY and quantized:
        raise ValueError(f"TFLite precision {precision!r} needs a float model")
    if precision in QUANTIZED_ONLY and not quantized:
        hint = " (for int8 weights with float compute from a float model, use 'int8_weights')"
        raise ValueError(f"TFLite precision {precision!r} needs a quantized (PTQ or QAT) model{hint}")


def _convert_int8(lt, model: nn.Module, spec: InputSpec, args: tuple, path: Path, io: str,
                  weights_too: bool = False) -> None:  # fmt: skip
    """The model's Q/DQ graph with constant scales; ``weights_too``: float layers get int8 weights (hybrid)."""
    require_int8_weights(model, "LiteRT int8")
    if weights_too:
        model = with_int8_weights(model, keep_activations=True)
    qdq = to_qdq(model, signed=True)
    if io == "int8":
        _check_int8_io(qdq)
    _convert_static(lt, qdq, spec, args, path, io == "float")
    if io == "int8":
        runner = TFLiteRunner(path)
        dtypes = (runner.io_dtype, np.dtype(runner.output["dtype"]).name)
        if dtypes != ("int8", "int8"):
            path.unlink()
            raise ValueError(f"TFLite io 'int8' gave {dtypes[0]} inputs and {dtypes[1]} outputs: the model's first "
                             "layer must quantize its input and the layer producing its output must quantize its "
                             "output (`output: {}`)")  # fmt: skip


def _convert_static(lt, model: nn.Module, spec: InputSpec, args: tuple, path: Path, float_io: bool) -> None:
    """Convert a Q/DQ graph in litert-torch's static Q/DQ mode (constant-scale pairs become int8 tensors)."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    config = QuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(get_symmetric_quantization_config(True)))
    with _strict_qdq(float_io):
        lt.convert(adapt(model, spec), args, quant_config=config).export(str(path))


def _check_int8_io(qdq: nn.Module) -> None:
    """int8 outputs need the logits quantized by the recipe: say which layer needs ``output: {}``."""
    last = None
    for name, m in qdq.named_modules():
        if hasattr(m, "output_qdq"):
            last = (name, m)
    if last is None or last[1].output_qdq is None:
        where = f"layer {last[0]!r}" if last else "the last layer"
        raise ValueError(f"TFLite io 'int8' needs quantized outputs: add `output: {{}}` to a rule matching {where}")


@contextlib.contextmanager
def _strict_qdq(on: bool):
    """Strict Q/DQ mode keeps the graph's first quantize and last dequantize as ops: float inputs/outputs.

    litert-torch exposes no argument for it, so the converter's pass entry point is wrapped while converting.
    """
    from litert_torch._convert import litert_converter as lc

    api = lc.converter_api_ext
    original = api.run_convert_to_tfl_passes

    def run_passes(module, pass_manager, config):
        config.strict_qdq_mode = on
        return original(module, pass_manager, config)

    api.run_convert_to_tfl_passes = run_passes
    try:
        yield
    finally:
        api.run_convert_to_tfl_passes = original


def _quantize_file(src: Path, dst: Path, precision: str) -> None:
    """ai-edge-quantizer on a float file: ``fp16`` weights or ``dynamic_int8``."""
    aeq = require("ai_edge_quantizer", "tflite", "TFLite fp16 / dynamic-int8 export")
    from ai_edge_quantizer import recipe

    qt = aeq.quantizer.Quantizer(str(src))
    qt.load_quantization_recipe(_FP16_RECIPE if precision == "fp16" else recipe.dynamic_wi8_afp32())
    with contextlib.redirect_stdout(None):
        qt.quantize().export_model(str(dst), overwrite=True)


COMPUTE_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL")
"""LiteRT ops that quantized Linear/Conv layers become."""


class TFLiteRunner:
    """A LiteRT interpreter over one file: named float arrays in (one per model input, in signature order),
    float outputs out (int8 I/O converted here)."""

    def __init__(self, path: str | Path, threads: int = 1, keep_tensors: bool = False):
        """``keep_tensors``: keep every intermediate tensor for :meth:`capture`, which needs LiteRT's builtin
        kernels (the XNNPACK delegate keeps none), so the file runs without it."""
        self.path = Path(path)
        self._graph = None
        with quiet():
            interp = require("ai_edge_litert.interpreter", "tflite", "Running TFLite files")
            extra = {}
            if keep_tensors:
                extra = {"experimental_preserve_all_tensors": True,
                         "experimental_op_resolver_type": interp.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}  # fmt: skip
            self.interpreter = interp.Interpreter(model_path=str(path), num_threads=threads, **extra)
            self.interpreter.allocate_tensors()
            self.inputs = sorted(self.interpreter.get_input_details(), key=_arg_position)
            self.input = self.inputs[0]
            self.output = self.interpreter.get_output_details()[0]
            self.batch = int(self.input["shape"][0])
            self._call([np.zeros(d["shape"], np.float32) for d in self.inputs])  # the first call logs set-up

    @property
    def io_dtype(self) -> str:
        return np.dtype(self.input["dtype"]).name

    @property
    def graph(self):
        """The file's own ops, read by an interpreter without the XNNPACK delegate (which replaces the ops it
        takes, DEQUANTIZE of weights included, by DELEGATE nodes): what the file holds, for counting."""
        if self._graph is None:
            with quiet():
                interp = require("ai_edge_litert.interpreter", "tflite", "Running TFLite files")
                plain = interp.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
                self._graph = interp.Interpreter(model_path=str(self.path), experimental_op_resolver_type=plain)
        return self._graph

    def op_names(self) -> list[str]:
        return [d["op_name"] for d in self.graph._get_ops_details()]

    def float_ops(self, kinds=COMPUTE_OPS) -> list[str]:
        """Ops of ``kinds`` whose input is float: layers the interpreter runs in float, not in int8."""
        tensors = {d["index"]: d for d in self.graph.get_tensor_details()}
        out = []
        for op in self.graph._get_ops_details():
            ins = [i for i in op["inputs"] if i >= 0]
            if op["op_name"] in kinds and ins and tensors[ins[0]]["dtype"] == np.float32:
                out.append(f"{op['op_name']} #{op['index']}")
        return out

    def _call(self, xs: list[np.ndarray]) -> np.ndarray:
        for d, x in zip(self.inputs, xs, strict=True):
            if d["dtype"] == np.int8 or d["dtype"] == np.uint8:
                s, z = d["quantization"]
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / s) + z, info.min, info.max)
            self.interpreter.set_tensor(d["index"], x.astype(d["dtype"]))
        self.interpreter.invoke()
        return self.float_tensor(self.output)

    def float_tensor(self, detail: dict) -> np.ndarray:
        """A tensor's current value (``detail`` from the interpreter's tensor details), dequantized if integer."""
        y = self.interpreter.get_tensor(detail["index"])
        if y.dtype != np.float32:
            s, z = detail["quantization"]
            y = (y.astype(np.float32) - z) * s
        return y.astype(np.float32, copy=True)

    def run(self, x) -> np.ndarray:
        """Outputs for every row of ``x`` (an array, or named arrays in model-input order), fed in chunks of the
        file's batch size; the tail is padded."""
        return np.concatenate([self._call(chunk)[:k] for chunk, k in self._chunks(x)])

    def capture(self, x, tensors: list[dict]) -> list[np.ndarray]:
        """Float values of ``tensors`` (tensor details) over every row of ``x``, as :meth:`run` feeds them
        (needs ``keep_tensors``), concatenated along the first axis (a tensor whose first axis is not the batch,
        e.g. tokens x features, stays whole: only a padded tail chunk is cut)."""
        got: list[list[np.ndarray]] = [[] for _ in tensors]
        for chunk, k in self._chunks(x):
            self._call(chunk)
            for part, t in zip(got, tensors, strict=True):
                v = self.float_tensor(t)
                part.append(v[:k] if k < self.batch else v)
        return [np.concatenate(p) for p in got]

    def _chunks(self, x):
        xs = list(x.values()) if isinstance(x, dict) else [x]
        if len(xs) != len(self.inputs):
            raise ValueError(f"the file takes {len(self.inputs)} inputs, got {len(xs)}")
        for i in range(0, len(xs[0]), self.batch):
            chunk = [v[i : i + self.batch] for v in xs]
            k = len(chunk[0])
            if k < self.batch:
                chunk = [np.concatenate([c, np.repeat(c[-1:], self.batch - k, axis=0)]) for c in chunk]
            yield chunk, k


def _arg_position(detail: dict) -> int:
    """Position of a LiteRT input in the model's signature (``serving_default_args_3`` -> 3)."""
    m = re.search(r"args_(\d+)", detail["name"])
    return int(m.group(1)) if m else detail["index"]


class TFLiteExporter(Exporter):
    """LiteRT flatbuffers: fp32/fp16/dynamic-int8 from the float model, full-int8 from each quantized model."""

    format, runtime, suffix, extra, title = "tflite", "litert", ".tflite", "tflite", "TFLite export"

    def precisions(self, src, cfg):
        """Float model: fp32, fp16, dynamic_int8, int8_weights; quantized: int8, hybrid, int8_weights (a quantized
        model's dynamic_int8 file is written by :func:`export_tflite` only, so default runs stay as they were)."""
        own = ("int8", "hybrid", "int8_weights") if src.quantized else ("fp32", "fp16", "dynamic_int8", "int8_weights")
        return [p for p in cfg.tflite.precisions if p in own]

    def write(self, src, precision, path, example, spec, cfg):
        example = spec.structured(rows(example, 0, 1))
        export_tflite(src.model, example, path, precision, cfg.tflite.io, cfg.tflite.strip_names)

    def open(self, art, cfg):
        return TFLiteRunner(art.path, cfg.latency_threads)

    def runner(self, art, cfg):
        return opened(art, cfg).run

    def timer(self, art, batch, sample, cfg, workdir):
        """Files are written at batch 1; other batch sizes are timed on a copy converted at that batch."""
        runner = opened(art, cfg)
        x = repeat_rows(sample, batch)
        if batch != runner.batch:
            path = workdir / f"b{batch}_{art.path.name}"
            example = art.spec.structured({k: torch.from_numpy(v) for k, v in x.items()})
            export_tflite(art.source.model, example, path, art.precision, cfg.tflite.io, cfg.tflite.strip_names)
            runner = TFLiteRunner(path, cfg.latency_threads)
        return lambda: runner.run(x)

    def details(self, art, cfg):
        r = opened(art, cfg)
        forms = dict(layer_forms(r.graph))
        layers = {**forms, "model layers": count_layers(art.source.model)}
        return {"ops": dict(Counter(r.op_names())), "io_dtype": r.io_dtype, "layers": layers}

    def diagnose(self, model, path, spec, inputs):
        from qatkit.export.diagnose_tflite import compare_layers_tflite

        return compare_layers_tflite(model, path, spec, inputs)

    def float_layers(self, art, cfg):
        """How many quantized layers have no integer op in the file (LiteRT op names do not name layers)."""
        if art.precision not in QUANTIZED_ONLY:
            return []
        r = opened(art, cfg)
        integer = sum(r.op_names().count(k) for k in COMPUTE_OPS) - len(r.float_ops())
        expected = len(quantized_layers(art.source.model))
        if integer >= expected:
            return []
        return [
            f"{expected - integer} of {expected} quantized layers ({integer} integer FULLY_CONNECTED/CONV ops in the file)"
        ]
