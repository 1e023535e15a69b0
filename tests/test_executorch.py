"""ExecuTorch export (.pte, XNNPACK delegate), each file run in ExecuTorch's own runtime against the PyTorch
model it came from: float files to float rounding, int8 files on the model's own scales to one output step,
what the delegate took (and a layer that falls out of it), dynamic batch, multi-input models, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("executorch", reason="the executorch extra is not installed: pip install 'qatkit[executorch]'")

from qatkit import calibrate, prepare  # noqa: E402
from qatkit.components.models import MLP, CNN1d  # noqa: E402
from qatkit.export.executorch import ExecuTorchRunner, export_executorch  # noqa: E402
from qatkit.transform.fold import fold_batchnorm  # noqa: E402


def _ptq(model: nn.Module, x: torch.Tensor, recipe="int8") -> nn.Module:
    prepare(model, recipe)
    calibrate(model, [x], 1)
    return model.eval()


def _output_step(model: nn.Module) -> float:
    """The scale of the last quantized layer's output quantizer: one step of the int8 output grid."""
    last = [m for m in model.modules() if getattr(m, "output_quant", None) is not None][-1]
    return float(last.output_quant.scale.reshape(-1)[0])


def test_mlp_fp32_and_int8_files_match_their_models(tmp_path):
    torch.manual_seed(0)
    model, x = MLP((1, 8, 8), 10, hidden=[64]).eval(), torch.randn(200, 1, 8, 8)
    info = export_executorch(model, x[:2], tmp_path / "fp32.pte")
    assert info["batch"] == "dynamic" and set(info["layers"].values()) == {"float"}
    y = ExecuTorchRunner(tmp_path / "fp32.pte").run({"input": x.numpy()})
    np.testing.assert_allclose(y, model(x).detach().numpy(), atol=1e-5)

    _ptq(model, x)
    info = export_executorch(model, x[:2], tmp_path / "int8.pte", "int8")
    assert info["layers"] == {"net.1": "int8", "net.3": "int8"}  # both quantized layers as integer kernels
    assert all("quantize" not in o["op"] for o in info["outside"])
    runner = ExecuTorchRunner(tmp_path / "int8.pte")
    y, ref = runner.run({"input": x.numpy()}), model(x).detach().numpy()
    assert np.abs(y - ref).max() <= 1.01 * _output_step(model)  # rounding ties differ by at most one step
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert runner.info == info
    assert (tmp_path / "int8.pte").stat().st_size < 0.5 * (tmp_path / "fp32.pte").stat().st_size


def test_conv_model_takes_any_batch_up_to_the_maximum(tmp_path):
    """A convolution narrows a small traced batch; the exporter traces 16 rows so batches 1..max all run."""
    torch.manual_seed(0)
    model, x = CNN1d((3, 32), 4, channels=[4, 8]).eval(), torch.randn(40, 3, 32)
    fold_batchnorm(model)
    _ptq(model, x)
    info = export_executorch(model, x[:2], tmp_path / "cnn.pte", "int8", max_batch=64)
    assert set(info["layers"].values()) == {"int8"} and len(info["layers"]) == 3
    runner = ExecuTorchRunner(tmp_path / "cnn.pte")
    ref = model(x).detach().numpy()
    for b in (1, 17, 40):
        y = runner.call(runner.tensors(x[:b].numpy()))
        assert y.shape == (b, 4) and np.abs(y - ref[:b]).max() <= 1.01 * _output_step(model)


def test_a_layer_outside_the_delegate_is_named(tmp_path):
    """A last layer without an output quantizer has no integer pattern: XNNPACK leaves it (and its weight
    dequantize) to ExecuTorch's portable kernels, and the file says which layer."""
    torch.manual_seed(0)
    model, x = MLP((1, 8, 8), 10, hidden=[16]).eval(), torch.randn(32, 1, 8, 8)
    recipe = {"rules": [{"match": ["net.3"], "weight": {"bits": 8}, "activation": {"bits": 8}, "output": False},
                        {"types": ["Linear"], "weight": {"bits": 8}, "activation": {"bits": 8}}]}  # fmt: skip
    _ptq(model, x, recipe)
    info = export_executorch(model, x[:2], tmp_path / "m.pte", "int8")
    assert info["layers"]["net.1"] == "int8" and info["layers"]["net.3"] != "int8"
    assert any(o["layer"] == "net.3" for o in info["outside"])
    y = ExecuTorchRunner(tmp_path / "m.pte").run({"input": x.numpy()})
    np.testing.assert_allclose(y, model(x).detach().numpy(), atol=1e-4)  # still right, just not in int8


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(4, 8), nn.Linear(16, 3)

    def forward(self, xz, yl):
        return self.out(torch.cat([torch.relu(self.a(xz)), torch.relu(self.b(yl))], dim=1))


def test_keyword_inputs_are_taken_in_order(tmp_path):
    torch.manual_seed(0)
    model, xz, yl = TwoInputs().eval(), torch.randn(50, 6), torch.randn(50, 4)
    prepare(model, "int8")
    calibrate(model, [{"xz": xz, "yl": yl}], 1)
    model.eval()
    info = export_executorch(model, {"xz": xz[:2], "yl": yl[:2]}, tmp_path / "two.pte", "int8")
    assert set(info["layers"]) == {"a", "b", "out"}  # names as the user's model has them, not the adapter's
    y = ExecuTorchRunner(tmp_path / "two.pte").run({"xz": xz.numpy(), "yl": yl.numpy()})
    ref = model(xz=xz, yl=yl).detach().numpy()
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.98


def test_wrong_source_or_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    model, x = MLP((1, 8, 8), 10, hidden=[8]).eval(), torch.randn(8, 1, 8, 8)
    with pytest.raises(ValueError, match="'int8' needs a quantized"):
        export_executorch(model, x[:2], tmp_path / "a.pte", "int8")
    with pytest.raises(ValueError, match="not one of fp32, int8"):
        export_executorch(model, x[:2], tmp_path / "a.pte", "fp16")
    asym = {"rules": [{"types": ["Linear"], "weight": {"bits": 8, "symmetric": False}, "activation": {"bits": 8}}]}
    _ptq(model, x, asym)
    with pytest.raises(ValueError, match="symmetric weight quantization; layer 'net.1'"):
        export_executorch(model, x[:2], tmp_path / "a.pte", "int8")
    with pytest.raises(ValueError, match="'fp32' needs a float model"):
        export_executorch(model, x[:2], tmp_path / "a.pte", "fp32")
    assert not (tmp_path / "a.pte").exists()


def test_an_int8_file_with_no_integer_layer_fails_parity(tmp_path):
    """A one-layer model whose layer falls out of the delegate is float in effect: its row names the layer and
    fails parity even though its outputs agree with the source."""
    from qatkit.base.batch import InputSpec
    from qatkit.export import Artifact, Source
    from qatkit.export.config import ExportConfig
    from qatkit.runner.artifacts import verify_artifacts
    from qatkit.runner.report import Report
    from qatkit.tasks import TASKS

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(12, 4)).eval(), torch.randn(64, 12)
    _ptq(
        model, x, {"rules": [{"types": ["Linear"], "weight": {"bits": 8}, "activation": {"bits": 8}, "output": False}]}
    )
    export_executorch(model, x[:2], tmp_path / "executorch" / "q.pte", "int8")
    src = Source("w8a8", "ptq", model, model(x).detach())
    art = Artifact(src, "executorch", "int8", tmp_path / "executorch" / "q.pte", InputSpec.of(x))
    cfg = ExportConfig(formats=["executorch"], latency_batches=[1], latency_seconds=0.01)
    report = Report(recipe={}, data={}, class_names=["a", "b", "c", "d"])
    task = TASKS["classification"](4, ["a", "b", "c", "d"])
    (row,) = verify_artifacts([art], art.spec, {"input": x}, src.outputs.argmax(1), task, cfg, report)
    assert row.agreement == 1.0 and row.float_layers == ["0 (not delegated)"]
    assert row.parity.startswith("failed") and "float in effect" in row.parity


class PinnedBatch(nn.Module):
    """A model that only runs at batch 2 (a constant broadcast against its input): no dynamic batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("row_gain", torch.tensor([[1.0], [2.0]]))

    def forward(self, x):
        return self.lin(x) * self.row_gain


def test_a_model_that_pins_its_batch_gets_a_fixed_batch_file(tmp_path):
    model, x = PinnedBatch().eval(), torch.randn(7, 5)
    info = export_executorch(model, x[:2], tmp_path / "p.pte")
    assert info["batch"] == 2
    y = ExecuTorchRunner(tmp_path / "p.pte").run(x.numpy())  # chunks of 2, the last one padded
    x8 = torch.cat([x, x[-1:]])
    ref = torch.cat([model(c) for c in x8.split(2)])[:7].detach().numpy()
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_a_damaged_or_foreign_file_is_refused_by_name(tmp_path):
    model, x = MLP((1, 8, 8), 10, hidden=[8]).eval(), torch.randn(4, 1, 8, 8)
    export_executorch(model, x[:2], tmp_path / "m.pte")
    (tmp_path / "cut.pte").write_bytes((tmp_path / "m.pte").read_bytes()[:3000])
    (tmp_path / "foreign.pte").write_bytes(b"not an ExecuTorch program")
    for name in ("cut.pte", "foreign.pte"):
        with pytest.raises(ValueError, match=f"{name}: not an ExecuTorch program written by qatkit, or a damaged"):
            ExecuTorchRunner(tmp_path / name)
