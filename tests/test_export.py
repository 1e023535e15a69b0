"""ONNX export: runs in ONNX Runtime, agrees with the QAT model, stores int8 weights, fuses int8 kernels."""

import copy

import numpy as np
import onnx
import pytest
import torch

from qatkit import calibrate, prepare
from qatkit.components.datasets import load_basic_motions, load_digits
from qatkit.components.models import MLP, CNN1d
from qatkit.export import verify
from qatkit.export.onnx import export_onnx
from qatkit.train import TrainConfig, fit, make_loader, predict
from qatkit.transform.fold import fold_batchnorm


@pytest.fixture(scope="module")
def digits():
    return load_digits(0.15, 0)


@pytest.fixture(scope="module")
def qat_mlp(digits):
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[256, 128])
    fit(model, digits.train, None, TrainConfig(epochs=3, lr=2e-3), num_classes=10, batch_size=64, progress=False)
    float_model = copy.deepcopy(model)
    prepare(model, {"preset": "int8", "outputs": "rules"})  # the logits layer without an output quantizer
    calibrate(model, make_loader(digits.train, 64, True), 4)
    fit(model, digits.train, None, TrainConfig(epochs=1, lr=1e-4), num_classes=10, batch_size=64, progress=False)
    return float_model, model


def test_int8_export_agrees_with_qat_model_and_is_small(qat_mlp, digits, tmp_path):
    float_model, qat = qat_mlp
    x = digits.test.tensors[0]
    fpath = export_onnx(float_model, x[:2], tmp_path / "f.onnx")
    qpath = export_onnx(qat, x[:2], tmp_path / "q.onnx")
    logits = verify.run(verify.session(qpath), x.numpy())
    ref, _ = predict(qat, make_loader(digits.test, 256, False))
    agree = (logits.argmax(1) == ref.numpy().argmax(1)).mean()
    assert agree >= 0.99
    assert np.abs(logits - ref.numpy()).max() < 0.05
    assert verify.file_size(qpath) <= 0.3 * verify.file_size(fpath)
    weights = [i for i in onnx.load(str(qpath)).graph.initializer if "codes" in i.name]
    assert len(weights) == 3 and all(i.data_type == onnx.TensorProto.INT8 for i in weights)


def test_ort_fuses_int8_kernels_and_batch_is_dynamic(qat_mlp, digits, tmp_path):
    _, qat = qat_mlp
    qpath = export_onnx(qat, digits.test.tensors[0][:2], tmp_path / "q.onnx")
    fused = verify.fused_int8_ops(qpath)
    assert fused.get("QGemm", 0) + fused.get("QLinearMatMul", 0) >= 2
    sess = verify.session(qpath)
    for b in (1, 7, 64):
        assert verify.run(sess, digits.test.tensors[0][:b].numpy()).shape == (b, 10)


def test_conv1d_with_folded_batchnorm_exports_to_qlinearconv(tmp_path):
    data = load_basic_motions(0.0, 0)
    torch.manual_seed(0)
    model = CNN1d(data.input_shape, 4)
    fit(model, data.train, None, TrainConfig(epochs=2, lr=3e-3), num_classes=4, batch_size=8, progress=False)
    model.eval()
    x = data.test.tensors[0]
    before = model(x)
    assert fold_batchnorm(model).folded == ["features.1", "features.4"]
    assert torch.allclose(model(x), before, atol=1e-4)
    plain, with_output = copy.deepcopy(model), model
    # conv 1 feeds conv 2's input quantizer and fuses; conv 2 feeds global pooling (no Q after it) and
    # stays DQ -> Conv in float unless its output is quantized too.
    prepare(plain, {"preset": "int8", "outputs": "rules"})
    prepare(with_output, {"preset": "int8", "outputs": "rules",
                          "rules": [{"match": "features.3", "activation": {}, "output": {}}]})  # fmt: skip
    for i, m in enumerate((plain, with_output)):
        calibrate(m, make_loader(data.train, 8, True), 5)
        path = export_onnx(m, x[:2], tmp_path / f"c{i}.onnx")
        assert verify.fused_int8_ops(path).get("QLinearConv", 0) == i + 1
    qpath = path
    logits = verify.run(verify.session(qpath), x.numpy())
    ref = model(x).detach().numpy()
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_low_bit_and_group_weights_export_exactly(tmp_path, digits):
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[64])
    recipe = {
        "rules": [
            {
                "match": "net.1",
                "weight": {"bits": 4, "granularity": "group", "group_size": 16},
                "activation": {"bits": 4},
            },
            {"match": "net.3", "weight": {"bits": 2, "learnable": True}, "activation": {"bits": 8}},
        ]
    }
    prepare(model, recipe)
    calibrate(model, make_loader(digits.train, 64, True), 2)
    x = digits.test.tensors[0]
    path = export_onnx(model, x[:2], tmp_path / "g.onnx")
    logits = verify.run(verify.session(path), x.numpy())
    ref = model(x).detach().numpy()
    # ORT rounds x / scale, PyTorch x * (1 / scale): a rare input lands one step apart, nothing more.
    assert np.abs(logits - ref).max() < 0.02
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.99
    codes = [i for i in onnx.load(str(path)).graph.initializer if "codes" in i.name]
    q = onnx.numpy_helper.to_array(codes[1])
    assert q.dtype == np.int8 and q.min() >= -2 and q.max() <= 1


def test_conv2d_model_exports_with_int8_convs(tmp_path, digits):
    from qatkit.components.models import CNN2d

    torch.manual_seed(0)
    model = CNN2d(digits.input_shape, 10, channels=[8, 16]).eval()
    fold_batchnorm(model)
    prepare(model, {"preset": "int8", "rules": [{"match": "features.3", "activation": {}, "output": {}}]})
    calibrate(model, make_loader(digits.train, 64, True), 2)
    x = digits.test.tensors[0]
    path = export_onnx(model, x[:2], tmp_path / "c2.onnx")
    assert verify.fused_int8_ops(path).get("QLinearConv", 0) == 2
    logits = verify.run(verify.session(path), x.numpy())
    assert (logits.argmax(1) == model(x).detach().numpy().argmax(1)).mean() >= 0.99


def test_layers_without_a_following_quantize_are_rewritten_to_int8_matmul(tmp_path):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    prepare(block, {"preset": "int8", "outputs": "rules"})
    calibrate(block, [torch.randn(64, 32) for _ in range(4)], 4)
    path = export_onnx(block, torch.randn(2, 32), tmp_path / "b.onnx")
    graph = onnx.load(str(path)).graph
    assert not [n for n in graph.node if n.op_type == "Gemm"]
    assert verify.fused_int8_ops(path) == {"MatMulIntegerToFloat": 2}
    x = torch.randn(50, 32)
    ours = verify.run(verify.session(path), x.numpy())
    assert np.abs(ours - block(x).detach().numpy()).max() < 1e-2


def test_mlp_layers_fuse_to_qgemm_and_the_logits_layer_to_integer_matmul(qat_mlp, digits, tmp_path):
    _, qat = qat_mlp
    path = export_onnx(qat, digits.test.tensors[0][:2], tmp_path / "q.onnx")
    assert verify.fused_int8_ops(path) == {"QGemm": 2, "MatMulIntegerToFloat": 1}


@pytest.mark.parametrize(
    "rule",
    [
        {"weight": {"granularity": "tensor"}, "activation": {}},
        {"weight": {"signed": False, "symmetric": False}, "activation": {}},
        {"weight": {"symmetric": False, "learnable": True}, "activation": {"signed": True, "symmetric": True}},
        {"weight": None, "activation": {"bits": 6}},
    ],
    ids=["per-tensor", "unsigned-weights", "lsq-signed-acts", "activation-only"],
)
def test_weight_and_activation_layouts_export_and_match(rule, tmp_path, digits):
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[32, 16])
    prepare(model, {"rules": [dict(rule, types=["Linear"])]})
    calibrate(model, make_loader(digits.train, 64, True), 2)
    x = digits.test.tensors[0]
    path = export_onnx(model, x[:2], tmp_path / "m.onnx")
    ours, ref = verify.run(verify.session(path), x.numpy()), model(x).detach().numpy()
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.99 and np.abs(ours - ref).max() < 0.05
    if rule["weight"] is not None:  # every quantized Linear runs as an integer kernel, none as a float Gemm
        ops = verify.optimized_op_counts(path)
        assert sum(verify.fused_int8_ops(path).values()) == 3 and not ops.get("Gemm") and not ops.get("FusedGemm")


def test_export_right_after_an_optimizer_step_uses_current_weights(tmp_path, digits):
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[32])
    prepare(model, "int8")
    calibrate(model, make_loader(digits.train, 64, True), 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    x, y = digits.train.tensors
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
        opt.step()
    path = export_onnx(model, x[:2], tmp_path / "m.onnx")  # no forward since the last step
    ours, ref = verify.run(verify.session(path), x[:200].numpy()), model.eval()(x[:200]).detach().numpy()
    assert np.abs(ours - ref).max() < 0.05
