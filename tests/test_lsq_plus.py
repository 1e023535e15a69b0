"""LSQ+ (learned offsets for asymmetric activations): forward and gradients against a hand-written reference,
the integer zero point kept in step with the offset, and an exported file that agrees with the trained model."""

import torch

import qatkit
from qatkit.nn import FakeQuantizer
from qatkit.quant.affine import lsq_grad_factor
from qatkit.quant.spec import QuantSpec


def test_learned_offset_matches_the_reference_forward_and_gradients():
    spec = QuantSpec(bits=4, signed=False, symmetric=False, learnable=True)
    fq = FakeQuantizer(spec).train()
    fq(torch.linspace(-1.0, 3.0, 100))  # initialises scale and offset from this range, then trains them
    with torch.no_grad():
        fq.offset.add_(0.3)  # a learned, non-integer offset
        fq.scale.mul_(0.8)  # some inputs now fall outside the grid
    x = torch.randn(257) * 1.5 + 1.0
    upstream = torch.randn(257)
    (fq(x) * upstream).sum().backward()

    s, zp = fq.scale.detach(), fq.offset.detach().round().clamp(0, 15)
    q = torch.round(x / s) + zp
    low, high = q < 0, q > 15
    expected = (q.clamp(0, 15) - zp) * s
    assert torch.allclose(fq(x).detach(), expected, atol=1e-6)
    g = lsq_grad_factor(x.numel(), 15)
    grad_offset = (-s * upstream[low | high]).sum() * g  # clamped values move with the offset, the rest do not
    assert low.any() and high.any()
    assert torch.allclose(fq.offset.grad, grad_offset.reshape(1), rtol=1e-4, atol=1e-6)
    assert int(fq.state_dict()["zero_point"]) == int(zp)  # the integer zero point the exporters read


def test_zero_point_follows_the_offset_after_an_optimiser_step():
    fq = FakeQuantizer(QuantSpec(bits=8, signed=False, symmetric=False, learnable=True)).train()
    fq(torch.rand(64) * 4 - 1)
    before = int(fq.zero_point)
    with torch.no_grad():
        fq.offset.add_(5.6)
    assert int(fq.state_dict()["zero_point"]) == before + 6  # saved without another forward
    symmetric = FakeQuantizer(QuantSpec(bits=4, learnable=True))
    assert not hasattr(symmetric, "offset")  # symmetric grids keep zero point 0


def test_learned_activation_offsets_train_and_export_exactly(tmp_path):
    recipe = {
        "name": "lsqplus", "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "mlp", "args": {"hidden": [32]}},
        "fp32": {"train": {"epochs": 3, "lr": 0.01, "logging": {"tensorboard": False}}},
        "variants": [{"name": "w4a4", "ptq": {"calib_batches": 2},
                      "quant": {"rules": [{"match": "*", "weight": {"bits": 4},
                                           "activation": {"bits": 4, "learnable": True}}]},
                      "qat": {"epochs": 2, "lr": 0.002, "logging": {"tensorboard": False}}}],
        "export": {"formats": ["onnx"], "latency_batches": [1], "latency_seconds": 0.02},
    }  # fmt: skip
    report = qatkit.run(recipe, tmp_path / "out", progress=False)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "out" / "w4a4_qat.safetensors"))
    offsets = {k: v for k, v in state.items() if k.endswith("input_quant.offset")}
    assert offsets and all(torch.equal(state[k[: -len("offset")] + "zero_point"], v.round().int())
                           for k, v in offsets.items())  # fmt: skip
    assert any(not torch.equal(v, v.round()) for v in offsets.values())  # trained off the integers
    onnx = report.find("w4a4", "qat", "onnxruntime")
    assert onnx.parity == "ok" and onnx.agreement == 1.0
