"""LiteRT, Core ML and packed exports of a tiny MLP and a tiny 1D-CNN, each checked in its runtime (LiteRT's
interpreter, PyTorch for packed files) against the fake-quant model, or structurally (Core ML, no runtime here)."""

import copy
import sys

import numpy as np
import pytest
import torch

from qatkit import calibrate, prepare
from qatkit.components.datasets import load_basic_motions, load_digits
from qatkit.components.models import MLP, CNN1d
from qatkit.export.packed import apply_packed, load_packed_state, save_packed
from qatkit.io.checkpoint import CheckpointError, save_weights
from qatkit.train import TrainConfig, fit, make_loader, predict
from qatkit.transform.fold import fold_batchnorm

pytest.importorskip("litert_torch")
pytest.importorskip("coremltools")

from qatkit.export.coreml import export_coreml, inspect_mlpackage, match_weights  # noqa: E402
from qatkit.export.tflite import TFLiteRunner, export_tflite  # noqa: E402

MLP_INT8 = {"preset": "int8", "rules": [{"match": "net.3", "activation": {}, "output": {}}]}
CNN_INT8 = {"preset": "int8", "rules": [{"match": "head", "activation": {}, "output": {}}]}


def _trained(kind: str):
    """(data, float model, QAT model with logits quantized): a couple of epochs, enough for real scales."""
    torch.manual_seed(0)
    if kind == "mlp":
        data = load_digits(0.15, 0)
        model, recipe, bs = MLP(data.input_shape, 10, hidden=[128]), MLP_INT8, 64
    else:
        data = load_basic_motions(0.0, 0)
        model, recipe, bs = CNN1d(data.input_shape, 4, channels=[8, 16]), CNN_INT8, 8
    fit(model, data.train, None, TrainConfig(epochs=3, lr=3e-3), num_classes=data.num_classes, batch_size=bs,
        progress=False)  # fmt: skip
    model.eval()
    fold_batchnorm(model)
    qat = copy.deepcopy(model)
    prepare(qat, recipe)
    calibrate(qat, make_loader(data.train, bs, True), 4)
    fit(qat, data.train, None, TrainConfig(epochs=1, lr=1e-4), num_classes=data.num_classes, batch_size=bs,
        progress=False)  # fmt: skip
    return data, model.eval(), qat.eval()


@pytest.fixture(scope="module", params=["mlp", "cnn1d"])
def trained(request):
    return request.param, *_trained(request.param)


def _logits(model, data):
    return predict(model, make_loader(data.test, 256, False))[0].numpy()


def test_tflite_int8_uses_the_qat_scales_and_matches_the_fake_quant_model(trained, tmp_path):
    kind, data, _, qat = trained
    x = data.test.tensors[0].numpy()
    ref = _logits(qat, data)
    out_scale = float(qat.get_submodule("net.3" if kind == "mlp" else "head").output_quant.scale)
    for io in ("float", "int8"):
        r = TFLiteRunner(export_tflite(qat, data.test.tensors[0][:1], tmp_path / f"{io}.tflite", "int8", io))
        assert r.io_dtype == ("float32" if io == "float" else "int8")
        if io == "int8":  # the file's input/output quantization is the model's own (not re-calibrated)
            assert r.output["quantization"][0] == pytest.approx(out_scale, rel=1e-6)
        y = r.run(x)
        assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.99
        assert np.abs(y - ref).max() <= 2.01 * out_scale  # within two steps of the int8 output grid
        ops = r.op_names()
        assert ops.count("FULLY_CONNECTED") + ops.count("CONV_2D") >= 2
        int8_weights = [t for t in r.interpreter.get_tensor_details() if t["dtype"] == np.int8 and len(t["shape"]) >= 2
                        and t["quantization_parameters"]["scales"].size > 1]  # fmt: skip
        assert len(int8_weights) >= 2  # per-channel int8 weights, not float


def test_tflite_float_precisions_run_and_shrink(trained, tmp_path):
    kind, data, fp32, _ = trained
    x = data.test.tensors[0]
    ref = _logits(fp32, data)
    sizes = {}
    for p in ("fp32", "fp16", "dynamic_int8"):
        path = export_tflite(fp32, x[:1], tmp_path / f"{p}.tflite", p)
        y = TFLiteRunner(path).run(x.numpy())
        sizes[p] = path.stat().st_size
        tol = {"fp32": 1e-4, "fp16": 1e-2, "dynamic_int8": 0.15}[p] * max(1.0, np.abs(ref).max())
        assert np.abs(y - ref).max() < tol, p
        assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.97
    if kind == "mlp":  # the 1D-CNN has ~1k weights: the file's fixed overhead dominates its size
        assert sizes["fp16"] < 0.7 * sizes["fp32"] and sizes["dynamic_int8"] < 0.5 * sizes["fp32"]


def test_tflite_refuses_what_it_cannot_build(trained, tmp_path):
    kind, data, fp32, _ = trained
    x = data.test.tensors[0][:1]
    with pytest.raises(ValueError, match="needs a quantized"):
        export_tflite(fp32, x, tmp_path / "a.tflite", "int8")
    with pytest.raises(ValueError, match="not one of"):
        export_tflite(fp32, x, tmp_path / "a.tflite", "int4")
    plain = copy.deepcopy(fp32)
    prepare(
        plain, {"preset": "int8", "outputs": "rules"}
    )  # logits float: int8 outputs impossible, error says what to add
    calibrate(plain, make_loader(data.train, 8, True), 1)
    with pytest.raises(ValueError, match="add `output: {}` to a rule matching layer"):
        export_tflite(plain, x, tmp_path / "b.tflite", "int8", io="int8")


def test_coreml_int8_stores_the_qat_weights_and_fp16_is_float(trained, tmp_path):
    kind, data, fp32, qat = trained
    x = data.test.tensors[0][:1]
    f = inspect_mlpackage(export_coreml(fp32, x, tmp_path / "f.mlpackage", "fp16"))
    q = inspect_mlpackage(export_coreml(qat, x, tmp_path / "q.mlpackage", "int8"))
    n_layers = sum(1 for m in qat.modules() if hasattr(m, "weight_quant"))
    assert q["ops"].get("constexpr_blockwise_shift_scale") == n_layers and not f["weights"]
    assert all(w["data_dtype"] == "int8" for w in q["weights"].values())
    check = match_weights(q, qat, "int8")
    assert check["layers"] == check["expected"] == n_layers
    assert check["max_rel_diff"] < 2e-3  # FP16 storage of the scales; the integer codes are the model's

    def weight_bytes(name):
        return next((tmp_path / name).rglob("weight.bin")).stat().st_size

    if kind == "mlp":  # (the 1D-CNN's ~1k weights are dominated by per-blob alignment)
        assert weight_bytes("q.mlpackage") < 0.6 * weight_bytes("f.mlpackage")


def test_coreml_palettizes_a_causal_lm_with_its_own_tables(tiny_lm_dir, tmp_path):
    from qatkit.lm.coreml import export_lm_coreml
    from qatkit.lm.hf import load_causal_lm
    from qatkit.lm.rules import LMQuantConfig, lut_layers, prepare_lm

    model, _ = load_causal_lm(tiny_lm_dir)
    prepare_lm(model, LMQuantConfig(preset="Q2_A4"))
    with torch.no_grad():  # tables that k-means would not produce: re-clustering would change them
        for m in lut_layers(model).values():
            m.lut.mul_(1.0 + 0.05 * torch.randn_like(m.lut))
    r = export_lm_coreml(model, tmp_path / "lm.mlpackage", seq_len=8)
    n = len(lut_layers(model))
    assert r["ops"]["constexpr_lut_to_dense"] == n and r["layers"] == r["expected"] == n
    assert r["luts_equal"] and r["max_rel_diff"] == 0.0
    stored = inspect_mlpackage(tmp_path / "lm.mlpackage")["weights"]
    first = next(iter(lut_layers(model).values()))
    lut = next(w["lut"] for name, w in stored.items() if "layers_0_self_attn_q_proj" in name)
    assert np.array_equal(lut.reshape(lut.shape[0], -1), first.lut.detach().half().float().numpy())


@pytest.mark.parametrize("weight", [{"bits": 2}, {"bits": 3}, {"bits": 4, "granularity": "group", "group_size": 8}])
def test_packed_checkpoint_round_trip_gives_the_same_outputs(weight, tmp_path):
    data = load_digits(0.15, 0)
    torch.manual_seed(0)
    model = MLP(data.input_shape, 10, hidden=[256, 128])
    prepare(model, {"rules": [{"types": ["Linear"], "weight": weight, "activation": {"bits": 8}}]})
    calibrate(model, make_loader(data.train, 64, True), 2)
    with torch.no_grad():  # move weights off their calibration grid, as training does
        for m in model.modules():
            if hasattr(m, "weight_quant"):
                m.weight.mul_(1.1)
    ref = _logits(model, data)
    info = save_packed(model, tmp_path / "m.safetensors", {"note": "test"})
    float_bytes = save_weights(tmp_path / "f.safetensors", model.state_dict()).stat().st_size
    # measured: 2 bits 0.103, 3 bits 0.133 (in the 4-bit slots of earlier versions 0.162)
    assert info["file_bytes"] < {2: 0.11, 3: 0.14, 4: 0.35}[weight["bits"]] * float_bytes
    fresh = MLP(data.input_shape, 10, hidden=[256, 128])
    prepare(fresh, {"rules": [{"types": ["Linear"], "weight": weight, "activation": {"bits": 8}}]})
    loaded = apply_packed(fresh, tmp_path / "m.safetensors")
    np.testing.assert_array_equal(_logits(loaded, data), ref)
    with pytest.raises(CheckpointError, match="not a packed qatkit model"):
        load_packed_state(tmp_path / "f.safetensors")
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_packed_state(tmp_path / "bad.safetensors")


def test_packed_file_from_before_exact_widths_still_loads(tmp_path):
    """Earlier versions stored 3-bit codes in 4-bit slots; such a file (rewritten here from a current one, with
    its codes repacked at 4 bits) loads to the same weights, and the current file is the smaller one."""
    from qatkit.io.checkpoint import load_weights, read_metadata
    from qatkit.quant.packing import pack_bits, unpack_bits

    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=[32])
    prepare(model, {"rules": [{"types": ["Linear"], "weight": {"bits": 3}, "activation": {"bits": 8}}]})
    calibrate(model, [torch.randn(16, 1, 8, 8)], 1)
    save_packed(model, tmp_path / "new.safetensors")
    meta, tensors = read_metadata(tmp_path / "new.safetensors"), load_weights(tmp_path / "new.safetensors")
    layers = {}
    for name, info in meta["packed_layers"].items():
        assert info["code_bits"] == 3
        codes = unpack_bits(tensors[f"{name}.weight_codes"], 3, tuple(info["shape"]))
        tensors[f"{name}.weight_codes"] = pack_bits(codes, 4)
        layers[name] = {**info, "code_bits": 4}
    extra = {k: v for k, v in meta.items() if k not in ("format", "sha256", "packed_layers")}
    save_weights(tmp_path / "old.safetensors", tensors, {**extra, "packed_layers": layers})
    new, _ = load_packed_state(tmp_path / "new.safetensors")
    old, _ = load_packed_state(tmp_path / "old.safetensors")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    assert (tmp_path / "new.safetensors").stat().st_size < (tmp_path / "old.safetensors").stat().st_size


def test_missing_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    monkeypatch.setitem(sys.modules, "coremltools", None)
    model = MLP((1, 8, 8), 10, hidden=[8])
    with pytest.raises(ImportError, match=r'pip install "qatkit\[tflite\]"'):
        export_tflite(model, torch.zeros(1, 1, 8, 8), tmp_path / "a.tflite")
    with pytest.raises(ImportError, match=r'pip install "qatkit\[coreml\]"'):
        export_coreml(model, torch.zeros(1, 1, 8, 8), tmp_path / "a.mlpackage")
    # a run asking for the format is refused before any training
    from qatkit.recipe import ExportConfig
    from qatkit.runner.artifacts import check_extras

    check_extras(ExportConfig(formats=["onnx", "packed"]))
    with pytest.raises(ImportError, match=r"TFLite export .*qatkit\[tflite\]"):
        check_extras(ExportConfig(formats=["onnx", "tflite"]))
    monkeypatch.setitem(sys.modules, "executorch", None)
    from qatkit.export.executorch import export_executorch

    with pytest.raises(ImportError, match=r'pip install "qatkit\[executorch\]"'):
        export_executorch(model, torch.zeros(1, 1, 8, 8), tmp_path / "a.pte")
    with pytest.raises(ImportError, match=r"ExecuTorch export .*qatkit\[executorch\]"):
        check_extras(ExportConfig(formats=["executorch"]))
    assert not (tmp_path / "a.pte").exists()


def test_coreml_int8_transformer_with_float_attention(tmp_path):
    """Seed 000's layout (only FFN layers quantized) converts too (through torch.export: the TorchScript
    frontend cannot convert nn.MultiheadAttention here)."""
    from qatkit.components.models import build_model

    data = load_basic_motions(0.0, 0)
    torch.manual_seed(0)
    model = build_model("transformer", data.input_shape, 4, dim=16, heads=2, ffn=32, layers=1).eval()
    prepare(model, "ffn-only")
    calibrate(model, make_loader(data.train, 8, True), 2)
    info = inspect_mlpackage(export_coreml(model.eval(), data.test.tensors[0][:1], tmp_path / "t.mlpackage", "int8"))
    check = match_weights(info, model, "int8")
    assert info["ops"]["constexpr_blockwise_shift_scale"] == check["layers"] == check["expected"] == 2
    assert check["max_rel_diff"] < 2e-3


def test_int8_io_is_checked_on_the_written_file_and_sequential_weights_match(tmp_path):
    """A model whose output layer leaves its output float cannot give int8 outputs: refused after conversion,
    whatever the registration order says; Core ML weights of a top-level nn.Sequential are matched too."""
    from torch import nn

    data = load_digits(0.15, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    prepare(model, {"rules": [{"match": "3", "activation": {}, "output": {}}, {"match": "1", "activation": {}}]})
    calibrate(model, make_loader(data.train, 64, True), 2)
    x = data.test.tensors[0][:1]
    export_tflite(model, x, tmp_path / "ok.tflite", "int8", io="int8")  # logits quantized: fine
    float_head = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    prepare(float_head, {"rules": [{"match": "1", "activation": {}, "output": {}}]})  # the logits stay float
    calibrate(float_head, make_loader(data.train, 64, True), 2)
    with pytest.raises(ValueError, match="gave int8 inputs and float32 outputs"):
        export_tflite(float_head, x, tmp_path / "bad.tflite", "int8", io="int8")
    assert not (tmp_path / "bad.tflite").exists()
    info = inspect_mlpackage(export_coreml(model, x, tmp_path / "s.mlpackage", "int8"))
    check = match_weights(info, model, "int8")
    assert check["layers"] == check["expected"] == 2
