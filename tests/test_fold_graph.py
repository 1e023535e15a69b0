"""Graph-level transforms. BatchNorm folding found by torch.fx: attribute-style models fold, every BatchNorm left
has its reason, and an untraceable model falls back to the nn.Sequential rule; folded models compute what the
originals did (eval mode). ``outputs: where_needed`` (the default): ReLU6 / Hardtanh absorbed like ReLU, in
fake quantization, unprepare, ONNX and Core ML; ``output: false``; the untraceable fallback."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatkit import RecipeError, calibrate, prepare, set_fake_quant, unprepare
from qatkit.transform.fold import FoldReport, fold_batchnorm
from qatkit.transform.rules import parse_quant


def _with_running_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms on every BatchNorm (a fresh one folds to almost nothing)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
    return model.eval()


def _fold_and_compare(model: nn.Module, x: torch.Tensor) -> FoldReport:
    model = _with_running_stats(model)
    with torch.no_grad():
        ref = model(x)
    keys = set(model.state_dict())
    report = fold_batchnorm(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    for name in report.folded:
        assert isinstance(model.get_submodule(name), nn.Identity)
    # only the folded BatchNorm's entries go; everything else keeps its name (new biases of bias-free convs come)
    gone = {k for k in keys if k.rpartition(".")[0] in report.folded}
    assert keys - gone <= set(model.state_dict())
    return report


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_resnet_style_blocks_fold_every_batchnorm():
    torch.manual_seed(0)
    report = _fold_and_compare(TinyResNet(), torch.randn(4, 3, 16, 16))
    blocks = [f"layer{i}.{j}.bn{k}" for i in (1, 2) for j in (0, 1) for k in (1, 2)]
    assert sorted(report.folded) == sorted(["bn1", *blocks, "layer2.0.downsample.1"])
    assert report.left == [] and report.traced and report.trace_error is None
    assert report.lines() == ["folded 10 of 10 BatchNorm into the preceding Conv/Linear"]


class Sensor1d(nn.Module):
    """A 1D-CNN written with attributes (the old nn.Sequential rule folded none of it), plus a Linear + BN1d."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(6, 8, 5, padding=2), nn.BatchNorm1d(8)
        self.conv2, self.bn2 = nn.Conv1d(8, 16, 3, padding=1, bias=False), nn.BatchNorm1d(16)
        self.conv3, self.bn3 = nn.Conv1d(16, 16, 3, padding=1, groups=4), nn.BatchNorm1d(16)
        self.fc, self.bn_fc = nn.Linear(16, 12), nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x)).relu()
        return self.head(F.relu(self.bn_fc(self.fc(x.mean(-1)))))


def test_custom_conv1d_net_with_batchnorm_attributes():
    torch.manual_seed(0)
    report = _fold_and_compare(Sensor1d(), torch.randn(5, 6, 20))
    assert report.folded == ["bn1", "bn2", "bn3", "bn_fc"] and report.left == []


def test_qatkit_models_fold_as_before():
    from qatkit.components.models import CNN1d, CNN2d

    torch.manual_seed(0)
    assert _fold_and_compare(CNN1d((6, 20), 4), torch.randn(3, 6, 20)).folded == ["features.1", "features.4"]
    assert _fold_and_compare(CNN2d((1, 8, 8), 10), torch.randn(3, 1, 8, 8)).folded == ["features.1", "features.4"]


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y  # the conv output also feeds the add: folding would change it
        return self.bn2(self.conv2(z))


class AfterPooling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.bn = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4)
        self.bn_f = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_f(F.avg_pool2d(self.bn(self.pool(self.conv(x))), 2))


class Odd(nn.Module):
    """A conv called twice, a BatchNorm without running statistics, a BatchNorm called twice, one never called."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.unused = nn.BatchNorm2d(4)
        self.conv4, self.bn4 = nn.Conv2d(4, 6, 1), nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.bn(self.conv(self.conv(x)))
        x = self.bn2(self.conv2(x))
        x = self.bn3(self.bn3(self.conv3(x)))
        return self.bn4(self.conv4(x).flatten(2))


@pytest.mark.parametrize(
    "model, x, folded, left",
    [
        (SharedOutput, (2, 3, 8, 8), ["bn2"], {"bn": "conv output also used elsewhere"}),
        (AfterPooling, (2, 3, 10, 10), [], {"bn": "follows pool (MaxPool2d) not a Conv/Linear",
                                            "bn_f": "follows avg_pool2d not a Conv/Linear"}),
        (Odd, (2, 4, 5, 5), [], {"bn": "conv called 2 times", "bn2": "no running statistics",
                                 "bn3": "bn3 called 2 times", "unused": "not called in the traced forward",
                                 "bn4": "follows .flatten() not a Conv/Linear"}),
    ],
    ids=["shared-output", "after-pooling", "odd"],
)  # fmt: skip
def test_batchnorm_left_unfolded_with_its_reason(model, x, folded, left):
    torch.manual_seed(0)
    report = _fold_and_compare(model(), torch.randn(*x))
    assert report.folded == folded and report.traced
    reasons = dict(report.left)
    assert set(reasons) == set(left)
    for name, why in left.items():
        assert reasons[name].startswith(why), (name, reasons[name])
    assert len(report.lines()) == 1 + len(left)
    assert all(any(line.startswith(f"  {n} left unfolded: ") for line in report.lines()) for n in left)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:  # data-dependent Python control flow: torch.fx cannot trace it
            x = self.bn2(self.conv2(x))
        return x


def test_untraceable_model_falls_back_to_the_sequential_rule():
    torch.manual_seed(0)
    report = _fold_and_compare(Branchy(), torch.rand(2, 3, 6, 6))
    assert not report.traced and report.trace_error
    assert report.folded == ["features.1"]
    assert [n for n, _ in report.left] == ["bn2"]
    assert report.left[0][1].startswith("model not traceable by torch.fx (")
    lines = report.lines()
    assert lines[0] == "folded 1 of 2 BatchNorm into the preceding Conv/Linear"
    assert "could not trace" in lines[1] and lines[2].startswith("  bn2 left unfolded: model not traceable")
    d = json.loads(json.dumps(report.to_dict()))
    assert d["folded"] == ["features.1"] and list(d["left"]) == ["bn2"] and d["traced"] is False


def test_report_works_where_a_list_of_names_did():
    torch.manual_seed(0)
    model = _with_running_stats(TinyResNet())
    report = fold_batchnorm(model)
    assert report and len(report) == 10 and list(report) == report.folded
    assert ", ".join(report.folded) == ", ".join(report)
    names: list[str] = []
    names += report
    assert names == report.folded
    again = fold_batchnorm(model)  # nothing left to fold: falsy, and no BatchNorm to report
    assert not again and again.folded == [] and again.left == [] and again.lines() == []
    assert json.loads(json.dumps(again.to_dict())) == {"folded": [], "left": {}, "traced": True, "trace_error": None}
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert not fold_batchnorm(plain) and fold_batchnorm(plain).lines() == []


class Clamps(nn.Module):
    """Each kind of clamp after a layer whose output feeds float, and a ReLU6 between two quantized layers."""

    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()
        self.c2, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Hardtanh(-1.5, 2.0)
        self.c3 = nn.Conv2d(8, 16, 1)
        self.fc1, self.a4 = nn.Linear(16, 16), nn.ReLU6()
        self.fc2, self.a5 = nn.Linear(16, 16), nn.Hardtanh(0.5, 2.0)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.avg_pool2d(self.a1(self.c1(x)), 2)  # c1 absorbs the ReLU6 module
        x = F.max_pool2d(self.a2(self.c2(x)), 2)  # c2 absorbs the Hardtanh module
        x = F.relu6(self.c3(x)).mean((2, 3))  # c3 applies the relu6 call before its output quantizer too
        x = self.a4(self.fc1(x))  # fc1 feeds fc2's input quantizer through the ReLU6: no output quantizer
        return self.head(self.a5(self.fc2(x)))  # a clamp that excludes 0 is not absorbed: fc2 quantizes before it


def _clamps():
    torch.manual_seed(0)
    model, x = Clamps().eval(), 10 * torch.randn(64, 3, 8, 8)  # ranges large enough to saturate every clamp
    return model, x, model(x).detach()


def test_relu6_and_hardtanh_are_absorbed_like_relu(tmp_path):
    from qatkit.export import verify
    from qatkit.export.onnx import export_onnx
    from qatkit.export.qdq import to_qdq

    model, x, reference = _clamps()
    report = prepare(model, "int8")  # outputs: where_needed is the default
    assert {r.name: r.output for r in report.rows} == {
        "c1": "uint8 tensor after ReLU6", "c2": "uint8 tensor after Hardtanh", "c3": "uint8 tensor after relu6()",
        "fc1": "float", "fc2": "uint8 tensor", "head": "uint8 tensor"}  # fmt: skip
    assert report.fused_relus == {"c1": "a1", "c2": "a2"}
    assert report.fused_bounds == {"c1": (0.0, 6.0), "c2": (-1.5, 2.0), "c3": (0.0, 6.0)}
    assert isinstance(model.a1, nn.Identity) and isinstance(model.a2, nn.Identity)
    assert type(model.a4) is nn.ReLU6 and type(model.a5) is nn.Hardtanh
    assert (model.c2.fused_relu, model.c2.fused_bounds) == ("a2", (-1.5, 2.0)) and model.c3.fused_relu is None
    set_fake_quant(model, False)  # the same function in float: each clamp now runs inside its layer
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    set_fake_quant(model, True)
    calibrate(model, [x], 1)
    twin = copy.deepcopy(model)
    assert (twin.c2.fused_relu, twin.c2.fused_bounds) == ("a2", (-1.5, 2.0))
    assert torch.equal(twin(x), model(x))

    path = export_onnx(model, x[:2], tmp_path / "m.onnx")
    fused = verify.fused_int8_ops(path)
    assert fused["QLinearConv"] == 3 and sum(fused.values()) == 6  # every layer runs as an integer kernel
    step = float(model.head.output_quant.scale)
    assert np.abs(verify.run(verify.session(path), x.numpy()) - model(x).detach().numpy()).max() <= 2.01 * step

    # the calibrated output grids end within half a step of the clamps: a Clip would change nothing, so the Q/DQ
    # form leaves it out; a grid that reaches further keeps it
    assert to_qdq(model).c2.bounds is None and to_qdq(model).c1.bounds is None
    model.c2.output_quant.update_range(torch.tensor([-4.0, 4.0]))
    qdq = to_qdq(model)
    assert qdq.c2.bounds == (-1.5, 2.0)
    with torch.no_grad():
        torch.testing.assert_close(qdq(x), model(x), atol=2.01 * step, rtol=0)

    unprepare(model)
    assert type(model.a1) is nn.ReLU6 and type(model.a2) is nn.Hardtanh
    assert (model.a2.min_val, model.a2.max_val) == (-1.5, 2.0)
    assert not hasattr(model.c2, "fused_bounds")
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


def test_coreml_layers_keep_the_absorbed_clamp():
    pytest.importorskip("coremltools")
    from qatkit.export.coreml import for_coreml

    model, x, _ = _clamps()
    prepare(model, {"preset": "int8", "rules": [{"match": "c2", "weight": None, "activation": {}}]})
    calibrate(model, [x], 1)
    plain = for_coreml(model, "int8")
    assert [type(m) for m in plain.c1] == [nn.Conv2d, nn.ReLU6]
    assert [type(m) for m in plain.c2] == [nn.Conv2d, nn.Hardtanh] and plain.c2[1].min_val == -1.5  # float weight
    assert [type(m) for m in plain.c3] == [nn.Conv2d, nn.ReLU6] and isinstance(plain.fc1, nn.Linear)
    for m in model.modules():  # Core ML int8: quantized weights, float activations
        for q in (getattr(m, "input_quant", None), getattr(m, "output_quant", None)):
            if q is not None:
                q.set_fake_quant(False)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-4, rtol=1e-4)


class DropClamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop1, self.act1 = nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU6()
        self.fc2, self.drop2, self.act2 = nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        a = self.act1(self.drop1(self.fc1(x)))  # a clamp before a training-mode Dropout would not bound its output
        b = self.act2(self.drop2(self.fc2(x)))  # a ReLU commutes with Dropout's scaling
        return self.head(a + b)


def test_default_outputs_where_needed_and_output_false():
    from qatkit.components.models import MLP

    assert parse_quant("int8").outputs == "where_needed"
    report = prepare(MLP((1, 8, 8), 10, hidden=[16]), "int8")
    assert {r.name: r.output for r in report.rows} == {"net.1": "float", "net.3": "uint8 tensor"}
    assert report.notes == [] and report.to_dict()["notes"] == []
    report = prepare(MLP((1, 8, 8), 10, hidden=[16]), {"preset": "int8", "outputs": "rules"})
    assert {r.name: r.output for r in report.rows} == {"net.1": "float", "net.3": "float"}

    model = MLP((1, 8, 8), 10, hidden=[16])
    report = prepare(model, {"preset": "int8", "rules": [{"match": "net.3", "activation": {}, "output": False}]})
    assert {r.name: (r.quantized, r.output, r.rule) for r in report.rows} == {
        "net.1": (True, "float", "preset int8[0]"), "net.3": (True, "float", "rule 0")}  # fmt: skip
    assert model.net[3].output_quant is None and model.net[3].input_quant is not None
    report = prepare(MLP((1, 8, 8), 10, hidden=[16]), {"preset": "int8", "rules": [
        {"match": "net.3", "weight": None, "output": False}]})  # fmt: skip
    assert report.rows[-1].rule == "rule 0 (kept float)" and not report.rows[-1].quantized

    recipe = parse_quant({"preset": "int8", "rules": [{"match": "net.3", "output": False}]})
    assert recipe.rules[0].output is False and parse_quant(recipe.model_dump(mode="json")) == recipe
    with pytest.raises(RecipeError, match="or false for never"):
        parse_quant({"preset": "int8", "rules": [{"output": True}]})

    report = prepare(DropClamp(), "int8")
    assert report.fused_relus == {"fc2": "act2"}
    assert {r.name: r.output for r in report.rows} == {
        "fc1": "uint8 tensor", "fc2": "uint8 tensor after ReLU", "head": "uint8 tensor"}  # fmt: skip

    report = prepare(Branchy(), "int8")  # untraceable: the rules' outputs, and a note, not an error
    assert all(r.output == "float" for r in report.rows) and len(report.notes) == 1
    assert report.notes[0].startswith("outputs: where_needed fell back to the rules' outputs: torch.fx cannot trace")
    assert report.notes[0].endswith("will run in float in ONNX Runtime")
