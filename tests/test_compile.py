"""Quantized models under torch.compile and torch.export: one graph with no break, the same numbers as eager
(PyTorch's fake-quantize ops are the reference), and ``compile: true`` in a training stage."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from qatkit import calibrate, prepare
from qatkit.components.datasets import load_digits
from qatkit.components.imports import import_target
from qatkit.components.models import MLP, CNN1d, CNN2d, TinyTransformer
from qatkit.nn.fake_quantizer import FakeQuantizer
from qatkit.quant.affine import VECTOR_MIN_NUMEL, fake_quantize
from qatkit.quant.ops import lsq_fake_quantize_op
from qatkit.train import TrainConfig, fit, make_loader

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INT8_ALL = {"rules": [{"types": ["Linear", "Conv1d", "Conv2d"], "weight": {"bits": 8, "granularity": "channel"},
                       "activation": {"bits": 8}}], "outputs": "where_needed"}  # fmt: skip


def resnet() -> nn.Module:
    """The ResNet-18 layout (4 stages of 2 blocks) from examples/, at tiny widths."""
    return import_target("model:TinyResNet", EXAMPLES / "resnet_cnn")(3, 5, widths=(4, 8, 8, 16), blocks=(2, 2, 2, 2))


def vit() -> nn.Module:
    return import_target("model:TinyViT", EXAMPLES / "tiny_vit")(16, 4, 3, 5, dim=16, depth=2, heads=2)


MODELS = {  # name: (build, one input batch)
    "mlp": (lambda: MLP((1, 8, 8), 10, hidden=[32, 16]), (6, 1, 8, 8)),
    "cnn1d": (lambda: CNN1d((6, 32), 4), (6, 6, 32)),
    "cnn2d": (lambda: CNN2d((1, 8, 8), 10), (6, 1, 8, 8)),
    "transformer": (lambda: TinyTransformer((6, 32), 4), (6, 6, 32)),
    "resnet18-layout": (resnet, (6, 3, 16, 16)),
    "vit": (vit, (6, 3, 16, 16)),
}


def prepared(name: str, recipe=INT8_ALL) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = build()
    prepare(model, recipe)
    x = torch.randn(shape)
    calibrate(model, [x], 1)
    return model.train(), x


def explain(model: nn.Module, x: torch.Tensor):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(copy.deepcopy(model))(x)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", list(MODELS))
def test_training_forward_is_one_graph_with_no_break(name):
    model, x = prepared(name)
    e = explain(model, x)  # QAT: weight ranges tracked every step, activation ranges frozen after calibration
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason)[:200] for b in e.break_reasons]
    for q in model.modules():  # calibrating: every range observed (running min-max: the batch counter is read)
        if isinstance(q, FakeQuantizer):
            q.set_observer(True)
    e = explain(model, x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason)[:200] for b in e.break_reasons]


LOW_BIT = {  # recipes whose quantizers take the other paths: EMA ranges, learned scales (LSQ, LSQ+), groups
    "ema-asym": {"weight": {"bits": 4, "granularity": "channel"}, "activation": {"bits": 8, "observer": "ema"}},
    "lsq": {"weight": {"bits": 4, "learnable": True}, "activation": {"bits": 8, "learnable": True}},
    "lsq-plus": {"weight": {"bits": 3, "learnable": True, "granularity": "tensor"},
                 "activation": {"bits": 8, "learnable": True, "symmetric": False}},
    "groups": {"weight": {"bits": 4, "granularity": "group", "group_size": 16}, "activation": {"bits": 8}},
}  # fmt: skip


@pytest.mark.parametrize("kind", list(LOW_BIT))
def test_compiled_training_steps_equal_eager_bit_for_bit(kind):
    """Three SGD steps through Dynamo + AOTAutograd (the graphs inductor would compile, run by PyTorch's kernels)
    give the eager run's outputs, gradients, weights and quantizer buffers exactly."""
    recipe = {"rules": [{"types": ["Linear"], **LOW_BIT[kind]}], "outputs": "rules"}
    torch.manual_seed(0)
    eager = MLP((64,), 10, hidden=[32, 16])
    prepare(eager, recipe)
    traced = copy.deepcopy(eager)
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    for step in range(3):
        x = torch.randn(8, 64) * (step + 1)
        outs = []
        for model, call in ((eager, eager), (traced, compiled)):
            y = call(x)
            y.square().mean().backward()
            outs.append(y)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
        assert torch.equal(outs[0], outs[1]), (kind, step)
        for (name, a), b in zip(eager.state_dict().items(), traced.state_dict().values(), strict=True):
            assert torch.equal(a, b), (kind, step, name)
    torch._dynamo.reset()


def ties_and_edges(shape, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Values spread past the grid on both sides, with a third exactly halfway between two grid points."""
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(qmin - 20, qmax + 20, shape, generator=g).float() - zp
    x = steps * scale + torch.randn(shape, generator=g) * scale * 0.3
    halfway = torch.rand(shape, generator=g) < 0.3
    return torch.where(halfway, (steps + 0.5) * scale, x).requires_grad_()


@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255), (-8, 7), (0, 3)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_vectorised_fake_quantize_equals_pytorch_ops(qrange, per_channel):
    """Large tensors take qatkit's vectorised ops (eager) — values and gradients equal to PyTorch's fused ops."""
    qmin, qmax = qrange
    shape = (16, 4, 16, 16)  # a conv-sized tensor past the size where the vectorised path starts
    assert torch.Size(shape).numel() >= VECTOR_MIN_NUMEL
    g = torch.Generator().manual_seed(2)
    if per_channel:
        scale = torch.rand(16, generator=g) * 0.05 + 1e-3
        zp = torch.randint(qmin, qmax + 1, (16,), generator=g, dtype=torch.int32)
        x = ties_and_edges(shape, scale.view(-1, 1, 1, 1), zp.view(-1, 1, 1, 1).float(), qmin, qmax)
        ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, qmin, qmax)
        got = fake_quantize(x, scale, zp, qmin, qmax, ch_axis=0)
    else:
        scale, zp = torch.tensor([0.013]), torch.tensor([(qmin + qmax) // 3], dtype=torch.int32)
        x = ties_and_edges(shape, scale, zp.float(), qmin, qmax)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        got = fake_quantize(x, scale, zp, qmin, qmax)
    assert got.grad_fn is not None and "Vector" in type(got.grad_fn).__name__
    assert torch.equal(ref, got)
    upstream = torch.randn(shape, generator=g)
    assert torch.equal(*(torch.autograd.grad(y, x, upstream)[0] for y in (ref, got)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_bf16_input_is_quantized_in_float32(per_channel):
    """A bfloat16 tensor (an activation under ``precision: bf16``) lands on the float32 grid: PyTorch's op on the
    float32 copy, cast back, in value and gradient, small tensors and large (eager vectorised path) alike."""
    qmin, qmax = -128, 127
    for shape in ((6, 10), (16, 4, 16, 16)):
        scale, zp = torch.rand(shape[0]) * 0.05 + 1e-3, torch.zeros(shape[0], dtype=torch.int32)
        x32 = ties_and_edges(shape, scale.view(-1, *[1] * (len(shape) - 1)), 0.0, qmin, qmax).detach()
        x = x32.bfloat16().requires_grad_()
        x_ref = x.detach().float().requires_grad_()
        if per_channel:
            ref = torch.fake_quantize_per_channel_affine(x_ref, scale, zp, 0, qmin, qmax).bfloat16()
            got = fake_quantize(x, scale, zp, qmin, qmax, ch_axis=0)
        else:
            ref = torch.fake_quantize_per_tensor_affine(x_ref, scale[:1], zp[:1], qmin, qmax).bfloat16()
            got = fake_quantize(x, scale[:1], zp[:1], qmin, qmax)
        assert got.dtype == torch.bfloat16 and torch.equal(ref, got)
        upstream = torch.randn(shape).bfloat16()
        (g_ref,), (g_got,) = torch.autograd.grad(ref, x_ref, upstream), torch.autograd.grad(got, x, upstream)
        assert torch.equal(g_ref.bfloat16(), g_got)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_compiled_bf16_autocast_step_equals_eager(name):
    """``precision: bf16`` (CPU autocast): the traced training step gives the eager outputs and gradients exactly."""
    model, x = prepared(name)
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    results = []
    for m, call in ((model, model), (twin, compiled)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = call(x)
        y.float().square().mean().backward()
        results.append((y, [p.grad for p in m.parameters()]))
    torch._dynamo.reset()
    (y0, g0), (y1, g1) = results
    assert y0.dtype == torch.bfloat16 and torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_custom_op_passes_pytorch_opcheck(per_channel):
    """The LSQ op's fake kernel, autograd registration and schema, as torch.library checks them."""
    x = torch.randn(4, 8, requires_grad=True)
    n = 4 if per_channel else 1
    scale = (torch.rand(n) * 0.1 + 0.01).requires_grad_()
    zp = torch.zeros(n, requires_grad=True)
    torch.library.opcheck(lsq_fake_quantize_op, (x, scale, zp, 0 if per_channel else -1, -8, 7, 0.5))


def test_torch_export_of_a_prepared_model_matches_eager():
    model, x = prepared("resnet18-layout")
    model.eval()
    for q in model.modules():
        if isinstance(q, FakeQuantizer):
            q.set_observer(False)
    want = model(x)
    program = torch.export.export(model, (x,))
    assert torch.equal(program.module()(x), want)


@pytest.fixture(scope="module")
def digits():
    return load_digits(0.15, 0)


def qat_mlp(digits) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[32])
    prepare(model, "int8")
    calibrate(model, make_loader(digits.train, 64, True), 2)
    return model


def test_compile_true_trains_and_reports_the_compilation(digits):
    cfg = TrainConfig(epochs=2, lr=2e-3, compile=True, logging={"tensorboard": False})
    eager = fit(qat_mlp(digits), digits.train, digits.val, cfg.model_copy(update={"compile": False}), num_classes=10,
                batch_size=64, progress=False)  # fmt: skip
    model = qat_mlp(digits)
    result = fit(model, digits.train, digits.val, cfg, num_classes=10, batch_size=64, progress=False)
    info = result.summary()["compile"]
    assert info["fallback"] is None and info["graph_breaks"] == 0 and info["graphs"] >= 1 and info["first_call_s"] > 0
    assert eager.summary()["compile"] is None
    assert result.best_metrics["accuracy"] == pytest.approx(eager.best_metrics["accuracy"], abs=0.02)
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_compile_failure_falls_back_to_eager_with_a_message(digits, monkeypatch, capsys):
    def broken(model, **kwargs):
        def call(*args, **kw):
            raise torch._dynamo.exc.InternalTorchDynamoError("the backend cannot lower this op")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    cfg = TrainConfig(epochs=1, lr=2e-3, compile=True, logging={"tensorboard": False})
    result = fit(qat_mlp(digits), digits.train, digits.val, cfg, num_classes=10, batch_size=64, progress=False)
    info = result.summary()["compile"]
    assert "cannot lower this op" in info["fallback"]
    assert result.steps > 0 and result.best_metrics["accuracy"] > result.history[0]["val_accuracy"]  # it trained
    assert "trained eagerly" in capsys.readouterr().err


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="compile_mode"):
        TrainConfig(compile=True, compile_mode="fastest")
