"""LiteRT ``hybrid``, ``int8_weights`` and ``dynamic_int8`` files of a tiny transformer whose QAT quantizes only
the FFN layers (fc1/fc2): sizes against the fp32 file, outputs against the fake-quant model, and the form each
Linear layer takes in the file."""

import copy

import numpy as np
import pytest
import torch

from qatkit import calibrate, prepare
from qatkit.base.batch import InputSpec
from qatkit.components.datasets import load_basic_motions
from qatkit.components.models import TinyTransformer
from qatkit.export.config import ExportConfig
from qatkit.export.formats import Artifact, Source
from qatkit.train import TrainConfig, fit, make_loader, predict

pytest.importorskip("litert_torch")

from qatkit.export.tflite import TFLiteExporter, TFLiteRunner, export_tflite  # noqa: E402

FFN_ONLY = {"rules": [{"match": ["*.fc1", "*.fc2"], "weight": {"bits": 8, "granularity": "channel"}, "activation": {}}]}
LAYERS, QUANTIZED = 8, 2
"""Linear layers of the model (embed, q/k/v/out_proj, fc1, fc2, head) and how many the rules quantize."""


@pytest.fixture(scope="module")
def ffn_qat():
    """(data, float model, FFN-only QAT model): a few epochs, enough for real scales and clear top-1 margins."""
    torch.manual_seed(0)
    data = load_basic_motions(0.0, 0)
    model = TinyTransformer(data.input_shape, 4, dim=128, heads=4, ffn=512, layers=1)
    fit(model, data.train, None, TrainConfig(epochs=4, lr=2e-3), num_classes=4, batch_size=8, progress=False)
    qat = copy.deepcopy(model.eval())
    prepare(qat, FFN_ONLY)
    calibrate(qat, make_loader(data.train, 8, True), 4)
    fit(qat, data.train, None, TrainConfig(epochs=1, lr=1e-4), num_classes=4, batch_size=8, progress=False)
    return data, model.eval(), qat.eval()


def _logits(model, data):
    return predict(model, make_loader(data.test, 256, False))[0].numpy()


def _details(model, precision, path):
    """The exporter's report on a file: what the runner shows for it."""
    x = torch.zeros(1, 6, 100)
    art = Artifact(Source("ffn", "qat", model, torch.zeros(1)), "tflite", precision, path, InputSpec.of(x))
    return TFLiteExporter().details(art, ExportConfig())


def test_hybrid_is_small_and_matches_the_qat_model(ffn_qat, tmp_path):
    data, fp32, qat = ffn_qat
    x = data.test.tensors[0]
    ref = _logits(qat, data)
    f = export_tflite(fp32, x[:1], tmp_path / "f.tflite", "fp32")
    q = export_tflite(qat, x[:1], tmp_path / "q.tflite", "int8")
    h = export_tflite(qat, x[:1], tmp_path / "h.tflite", "hybrid")
    ratio = h.stat().st_size / f.stat().st_size
    assert ratio < 0.42 and h.stat().st_size < 0.75 * q.stat().st_size  # measured 0.350 and 0.62 (3 seeds)
    y = TFLiteRunner(h).run(x.numpy())
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert np.abs(y - ref).max() < 0.01 * np.abs(ref).max()  # measured 0.002 (3 seeds): the int8 attention weights
    layers = _details(qat, "hybrid", h)["layers"]
    assert layers == {"int8 kernels": QUANTIZED, "int8 weights, float compute": LAYERS - QUANTIZED,
                      "model layers": LAYERS}  # fmt: skip


def test_int8_weights_and_dynamic_int8_come_from_the_qat_model(ffn_qat, tmp_path):
    data, _, qat = ffn_qat
    x = data.test.tensors[0]
    ref = _logits(qat, data)
    for p, form, tol in (("int8_weights", "int8 weights, float compute", 0.01), ("dynamic_int8", "dynamic int8", 0.04)):
        path = export_tflite(qat, x[:1], tmp_path / f"{p}.tflite", p)
        y = TFLiteRunner(path).run(x.numpy())
        assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.97, p
        assert np.abs(y - ref).max() < tol * np.abs(ref).max(), p  # measured 0.002 and 0.003-0.010 (3 seeds)
        assert _details(qat, p, path)["layers"] == {form: LAYERS, "model layers": LAYERS}, p
    fc1 = qat.get_submodule("layers.0.fc1")
    stored = _stored_weight(TFLiteRunner(tmp_path / "int8_weights.tflite"), "fc1")
    assert np.abs(stored - fc1.quant_weight().detach().numpy()).max() < 1e-6  # the QAT grid itself, not re-rounded


def _stored_weight(runner: TFLiteRunner, layer: str) -> np.ndarray:
    """A layer's int8 weight constant in a file, dequantized with its per-channel scales."""
    t = next(d for d in runner.interpreter.get_tensor_details()
             if layer in d["name"] and d["dtype"] == np.int8 and len(d["shape"]) == 2)  # fmt: skip
    scales = t["quantization_parameters"]["scales"]
    return runner.interpreter.get_tensor(t["index"]).astype(np.float32) * scales[:, None]


def test_float_model_refuses_hybrid_and_the_runner_picks_precisions(ffn_qat, tmp_path):
    data, fp32, qat = ffn_qat
    with pytest.raises(ValueError, match=r"'hybrid' needs a quantized \(PTQ or QAT\) model.*'int8_weights'"):
        export_tflite(fp32, data.test.tensors[0][:1], tmp_path / "a.tflite", "hybrid")
    with pytest.raises(ValueError, match="'fp16' needs a float model"):
        export_tflite(qat, data.test.tensors[0][:1], tmp_path / "a.tflite", "fp16")
    cfg = ExportConfig(tflite={"precisions": ["fp32", "fp16", "dynamic_int8", "int8", "hybrid", "int8_weights"]})
    ex = TFLiteExporter()
    assert ex.precisions(Source("fp32", "float", fp32, torch.zeros(1)), cfg) == ["fp32", "fp16", "dynamic_int8",
                                                                                  "int8_weights"]  # fmt: skip
    assert ex.precisions(Source("ffn", "qat", qat, torch.zeros(1)), cfg) == ["int8", "hybrid", "int8_weights"]
    assert ExportConfig().tflite.precisions == ["fp32", "dynamic_int8", "int8"]  # default runs write what they did


def test_stripped_names_give_a_smaller_file_with_the_same_outputs(ffn_qat, tmp_path):
    from ai_edge_litert import schema_py_generated as schema

    data, _, qat = ffn_qat
    x = data.test.tensors[0]
    full = export_tflite(qat, x[:1], tmp_path / "full.tflite", "hybrid")
    bare = export_tflite(qat, x[:1], tmp_path / "bare.tflite", "hybrid", strip_names=True)
    assert bare.stat().st_size < full.stat().st_size - 1000
    np.testing.assert_array_equal(TFLiteRunner(bare).run(x.numpy()), TFLiteRunner(full).run(x.numpy()))
    model = schema.ModelT.InitFromPackedBuf(bare.read_bytes(), 0)
    sg = model.subgraphs[0]
    named = [i for i, t in enumerate(sg.tensors) if t.name]
    assert sorted(named) == sorted(set(sg.inputs) | set(sg.outputs))  # only the graph's inputs and outputs
    assert _details(qat, "hybrid", bare)["layers"] == _details(qat, "hybrid", full)["layers"]
    # the op counts are the file's own: the XNNPACK delegate, which swallows DEQUANTIZE ops, is not applied
    assert "DELEGATE" not in TFLiteRunner(bare).op_names()
