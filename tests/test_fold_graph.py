"""BatchNorm folding found by torch.fx: attribute-style models fold, every BatchNorm left has its reason, and an
untraceable model falls back to the nn.Sequential rule. Folded models compute what the originals did (eval mode)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatkit.transform.fold import FoldReport, fold_batchnorm


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
