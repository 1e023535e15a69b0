"""LiteRT (TFLite) export through litert-torch, and running the files in the LiteRT interpreter.

Precisions: ``fp32`` (the float graph), ``fp16`` (FP16 weights) and ``dynamic_int8`` (int8 weights,
activations quantized at run time), both from the float file by ai-edge-quantizer; ``int8``: a full-integer
model from a quantized qatkit model, using the scales it was calibrated or trained with (no re-calibration).
``io`` picks int8 or float inputs/outputs for ``int8`` files. Files have a fixed batch size (the exporter
cannot lower a dynamic batch through flatten); run() feeds the rows in chunks of that size.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..extras import require
from ..nn.modules import QuantModule
from .onnx import quiet
from .qdq import to_qdq

PRECISIONS = ("fp32", "fp16", "dynamic_int8", "int8")
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
    model: nn.Module, example: torch.Tensor, path: str | Path, precision: str = "fp32", io: str = "float"
) -> Path:
    """Write ``model`` as a LiteRT flatbuffer at ``path`` (batch size of ``example``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"TFLite precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if io not in ("float", "int8"):
        raise ValueError(f"TFLite io {io!r} is not one of float, int8")
    quantized = any(isinstance(m, QuantModule) for m in model.modules())
    if quantized != (precision == "int8"):
        need = "a quantized (PTQ or QAT) model" if precision == "int8" else "a float model"
        raise ValueError(f"TFLite precision {precision!r} needs {need}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet("litert_torch", "absl"):
        lt = _litert_torch()
        if precision == "int8":
            _convert_int8(lt, model, example, path, io)
        elif precision == "fp32":
            lt.convert(model.eval(), (example,)).export(str(path))
        else:
            with tempfile.TemporaryDirectory() as d:
                float_path = Path(d) / "float.tflite"
                lt.convert(model.eval(), (example,)).export(str(float_path))
                _quantize_file(float_path, path, precision)
    return path


def _convert_int8(lt, model: nn.Module, example: torch.Tensor, path: Path, io: str) -> None:
    """The Q/DQ graph with constant scales, converted in litert-torch's static Q/DQ mode."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    for name, m in model.named_modules():
        if isinstance(m, QuantModule) and m.weight_quant is not None and not m.weight_quant.spec.symmetric:
            raise ValueError(f"LiteRT int8 needs symmetric weight quantization; layer {name!r} is asymmetric")
    qdq = to_qdq(model, signed=True)
    if io == "int8":
        _check_int8_io(qdq, example)
    config = QuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(get_symmetric_quantization_config(True)))
    with _strict_qdq(io == "float"):
        lt.convert(qdq, (example,), quant_config=config).export(str(path))
    if io == "int8":
        runner = TFLiteRunner(path)
        dtypes = (np.dtype(runner.input["dtype"]).name, np.dtype(runner.output["dtype"]).name)
        if dtypes != ("int8", "int8"):
            path.unlink()
            raise ValueError(f"TFLite io 'int8' gave {dtypes[0]} inputs and {dtypes[1]} outputs: the model's first "
                             "layer must quantize its input and the layer producing its output must quantize its "
                             "output (`output: {}`)")  # fmt: skip


def _check_int8_io(qdq: nn.Module, example: torch.Tensor) -> None:
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


class TFLiteRunner:
    """A LiteRT interpreter over one file: float arrays in, float logits out (int8 I/O converted here)."""

    def __init__(self, path: str | Path, threads: int = 1):
        with quiet():
            interp = require("ai_edge_litert.interpreter", "tflite", "Running TFLite files")
            self.interpreter = interp.Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self.batch = int(self.input["shape"][0])
            self._call(np.zeros(self.input["shape"], np.float32))  # the first call logs the delegate's set-up

    @property
    def io_dtype(self) -> str:
        return np.dtype(self.input["dtype"]).name

    def op_names(self) -> list[str]:
        return [d["op_name"] for d in self.interpreter._get_ops_details()]

    def _call(self, x: np.ndarray) -> np.ndarray:
        if self.input["dtype"] != np.float32:
            s, z = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / s) + z, info.min, info.max).astype(self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        if self.output["dtype"] != np.float32:
            s, z = self.output["quantization"]
            y = (y.astype(np.float32) - z) * s
        return y.astype(np.float32, copy=True)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for every row of ``x`` (fed in chunks of the file's batch size; the tail is padded)."""
        x = x.astype(np.float32)
        outs = []
        for i in range(0, len(x), self.batch):
            chunk = x[i : i + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            outs.append(self._call(chunk)[:n])
        return np.concatenate(outs)
