"""Warm start reports copied and skipped tensors, with shapes, instead of loading partially in silence."""

import pytest
import torch

from qatkit import prepare, warm_start
from qatkit.components.models import MLP
from qatkit.io.checkpoint import save_weights


def test_report_with_one_mismatched_layer(tmp_path):
    torch.manual_seed(0)
    src = MLP((1, 8, 8), 10, hidden=[32, 16])
    dst = MLP((1, 8, 8), 4, hidden=[32, 16])  # same body, a 4-class head: only net.5 differs
    prepare(dst, "int8")
    path = save_weights(tmp_path / "f.safetensors", src.state_dict())
    head_before = dst.net[5].weight.detach().clone()
    report = warm_start(dst, path)
    assert {n for n, _ in report.copied} == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    assert sorted(report.mismatched) == [("net.5.bias", (10,), (4,)), ("net.5.weight", (10, 16), (4, 16))]
    assert report.missing == [] and report.unused == []
    assert torch.equal(dst.net[1].weight, src.net[1].weight)
    assert torch.equal(dst.net[3].bias, src.net[3].bias)
    assert torch.equal(dst.net[5].weight, head_before)
    assert "copied 4 tensors; skipped 2 with mismatched shapes" in report.summary()
    assert "  shape mismatch net.5.weight: source (10, 16) vs model (4, 16)" in report.lines()
    with pytest.raises(ValueError, match="shape mismatch"):
        warm_start(dst, path, strict=True)


def test_tensors_without_a_source_are_listed():
    src = MLP((1, 8, 8), 10, hidden=[8])
    dst = MLP((1, 8, 8), 10, hidden=[8, 8])
    report = warm_start(dst, src.state_dict())
    assert "net.5.weight" in report.missing and not report.ok


def test_quantizer_state_is_not_reported_missing():
    torch.manual_seed(0)
    src = MLP((1, 8, 8), 10, hidden=[8])
    dst = MLP((1, 8, 8), 10, hidden=[8])
    prepare(dst, "int8")
    report = warm_start(dst, src)
    assert report.ok and len(report.copied) == 4


def test_quantizer_state_in_the_source_is_skipped_and_plain_safetensors_accepted(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = MLP((1, 8, 8), 10, hidden=[8])
    prepare(src, {"rules": [{"types": "Linear", "weight": {"bits": 2}}]})
    dst = MLP((1, 8, 8), 10, hidden=[8])
    prepare(dst, "int8")
    report = warm_start(dst, src.state_dict())
    assert len(report.copied) == 4 and report.quantizer_state and report.ok
    assert int(dst.net[1].weight_quant.spec.bits) == 8 and float(dst.net[1].weight_quant.scale[0]) == 1.0
    plain = MLP((1, 8, 8), 10, hidden=[8])
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "hf.safetensors"))
    report = warm_start(dst, tmp_path / "hf.safetensors")
    assert len(report.copied) == 4 and torch.equal(dst.net[1].weight, plain.net[1].weight)
    assert any(line.startswith("  copied net.1.weight (8, 64)") for line in report.lines())
