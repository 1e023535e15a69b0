"""prepare(): selective quantization, the layer report, state in state_dict, and round trips."""

import pytest
import torch

from qatkit import RecipeError, calibrate, prepare, quant_status, set_fake_quant, unprepare
from qatkit.nn import FakeQuantizer, QuantLinear


def test_ffn_only_quantizes_exactly_the_ffn_linears(tiny_transformer):
    report = prepare(tiny_transformer, {"preset": "ffn-only", "outputs": "rules"})  # (no fc2 output quantizers)
    quantized = {r.name for r in report.quantized}
    assert quantized == {f"layers.{i}.{fc}" for i in range(2) for fc in ("fc1", "fc2")}
    skipped = {r.name for r in report.skipped}
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"layers.{i}.{proj}" in skipped
            assert type(tiny_transformer.get_submodule(f"layers.{i}.{proj}")) is torch.nn.Linear
    assert {"embed", "head"} <= skipped
    assert report.summary().startswith("4 of 14 layers quantized")
    assert quant_status(tiny_transformer) == {"wrappers": 4, "quantizers": 8, "fake_quant_on": 8, "observing": 8}


def test_ffn_only_with_hf_style_names():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.ModuleDict(
                {n: torch.nn.Linear(4, 4) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            )
            self.mlp = torch.nn.ModuleDict({n: torch.nn.Linear(4, 4) for n in ("gate_proj", "up_proj", "down_proj")})

    report = prepare(Block(), "ffn-only")
    assert {r.name for r in report.quantized} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_multihead_attention_out_proj_is_reported_not_swapped():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8))
    model.attn = torch.nn.MultiheadAttention(8, 2)
    report = prepare(model, "int8")
    row = next(r for r in report.rows if r.name == "attn.out_proj")
    assert not row.quantized and "no wrapper" in row.rule


def test_wrapper_shares_parameters_and_converts_back(tiny_mlp):
    w = tiny_mlp.net[1].weight
    prepare(tiny_mlp, {"rules": [{"types": "Linear", "weight": {"bits": 4}}]})
    assert isinstance(tiny_mlp.net[1], QuantLinear) and tiny_mlp.net[1].weight is w
    unprepare(tiny_mlp)
    assert type(tiny_mlp.net[1]) is torch.nn.Linear and tiny_mlp.net[1].weight is w


def test_quantizer_state_is_in_state_dict_and_restores(tiny_mlp):
    import copy

    other = copy.deepcopy(tiny_mlp)
    recipe = {
        "rules": [{"types": "Linear", "weight": {"bits": 4, "learnable": True}, "activation": {"observer": "ema"}}]
    }
    prepare(tiny_mlp, recipe)
    calibrate(tiny_mlp, [torch.rand(8, 1, 8, 8) for _ in range(3)], 3)
    sd = tiny_mlp.state_dict()
    assert int(sd["net.1.input_quant.observed_batches"]) == 3
    assert not bool(sd["net.1.input_quant.observer_on"])
    prepare(other, recipe)
    other.load_state_dict(sd)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(other(x), tiny_mlp(x))
    assert int(other.net[1].input_quant.observed_batches) == 3


def test_fake_quant_switch_really_changes_outputs(tiny_mlp):
    prepare(tiny_mlp, {"rules": [{"types": "Linear", "weight": {"bits": 2}, "activation": {"bits": 8}}]})
    calibrate(tiny_mlp, [torch.rand(16, 1, 8, 8)], 1)
    x = torch.rand(16, 1, 8, 8)
    q = tiny_mlp(x)
    set_fake_quant(tiny_mlp, False)
    assert not torch.allclose(q, tiny_mlp(x))
    assert quant_status(tiny_mlp)["fake_quant_on"] == 0


def test_prepare_twice_and_regex_rules(tiny_mlp):
    report = prepare(
        tiny_mlp, {"rules": [{"match": r"re:net\.[13]", "weight": {"bits": 8}}, {"match": "net.5", "quantize": False}]}
    )
    assert [r.name for r in report.quantized] == ["net.1", "net.3"]
    assert report.rows[-1].rule == "rule 1 (kept float)"
    with pytest.raises(RecipeError, match="already prepared"):
        prepare(tiny_mlp, "int8")


def test_calibrate_requires_quantizers(tiny_mlp):
    with pytest.raises(ValueError, match="no quantizers"):
        calibrate(tiny_mlp, [torch.rand(2, 1, 8, 8)], 1)


def test_group_granularity_wrapper(tiny_mlp):
    prepare(tiny_mlp, {"rules": [{"types": "Linear", "weight": {"bits": 4, "granularity": "group", "group_size": 8}}]})
    fq = tiny_mlp.net[1].weight_quant
    assert isinstance(fq, FakeQuantizer) and fq.scale.numel() == 32 * 64 // 8
    out = tiny_mlp(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_failed_prepare_leaves_the_model_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(RecipeError, match=r"layer '2' \(rule 0\): input size 8 is not a multiple of group_size 16"):
        prepare(model, {"rules": [{"weight": {"granularity": "group", "group_size": 16}}]})
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]


def test_ffn_only_on_torch_transformer_encoder_layer():
    layer = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2)
    report = prepare(layer, "ffn-only")
    assert {r.name for r in report.quantized} == {f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert all(not r.quantized for r in report.rows if "self_attn" in r.name)


def test_learnable_scale_trains_without_calibration_and_skips_weight_decay(tiny_mlp):
    from qatkit.train.loop import param_groups

    prepare(tiny_mlp, {"rules": [{"types": "Linear", "weight": {"bits": 4, "learnable": True}}]})
    fq = tiny_mlp.net[1].weight_quant
    opt = torch.optim.AdamW(param_groups(tiny_mlp, 0.1), lr=1e-2)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        opt.step()
    assert not bool(fq.observer_on)
    init = fq.scale.detach().clone()
    torch.nn.functional.cross_entropy(tiny_mlp(x), y).backward()
    opt.step()
    assert not torch.equal(init, fq.scale.detach())  # the learned scale moved and was not re-observed
    groups = opt.param_groups
    assert groups[1]["weight_decay"] == 0.0 and any(p is fq.scale for p in groups[1]["params"])


def test_outputs_where_needed_quantizes_outputs_that_feed_float(tmp_path):
    """Layers feeding pooling or the model output get an output quantizer; layers feeding (through ReLU) another
    quantized layer do not; every layer then runs as an ONNX Runtime integer kernel."""
    from qatkit import calibrate
    from qatkit.components.datasets import load_basic_motions
    from qatkit.components.models import CNN1d
    from qatkit.export import verify
    from qatkit.export.onnx import export_onnx
    from qatkit.train import make_loader
    from qatkit.transform.fold import fold_batchnorm

    data = load_basic_motions(0.0, 0)
    model = CNN1d(data.input_shape, 4).eval()
    fold_batchnorm(model)  # (unfolded, a BatchNorm after each conv would be a float consumer)
    x = data.test.tensors[0]
    reference = model(x)
    report = prepare(model, {"preset": "int8", "outputs": "where_needed"})
    outputs = {r.name: r.output for r in report.rows if r.quantized}
    assert outputs == {"features.0": "float", "features.3": "uint8 tensor after ReLU", "head": "uint8 tensor"}
    assert "where_needed" in next(r.rule for r in report.rows if r.name == "head")
    # the ReLU after the last conv now runs inside it, before the output quantizer: same function in float
    assert report.fused_relus == {"features.3": "features.5"} and isinstance(model.features[5], torch.nn.Identity)
    set_fake_quant(model, False)
    assert torch.allclose(model(x), reference, atol=1e-6)
    set_fake_quant(model, True)
    calibrate(model, make_loader(data.train, 8, True), 2)
    path = export_onnx(model, data.test.tensors[0][:2], tmp_path / "m.onnx")
    assert verify.fused_int8_ops(path) == {"QLinearConv": 2, "QGemm": 1}
    assert "Relu" not in verify.optimized_op_counts(path)  # fused into the QLinearConv
    unprepare(model)
    assert isinstance(model.features[5], torch.nn.ReLU) and torch.allclose(model(x), reference, atol=1e-6)


def test_outputs_where_needed_keeps_explicit_outputs_and_falls_back_on_an_untraceable_model():
    from torch import nn

    from qatkit.components.models import MLP

    model = MLP((1, 8, 8), 10, hidden=[16])
    report = prepare(model, {"preset": "int8", "outputs": "where_needed",
                             "rules": [{"match": "net.3", "activation": {}, "output": {"bits": 6}}]})  # fmt: skip
    assert {r.name: r.output for r in report.rows} == {"net.1": "float", "net.3": "uint6 tensor"}

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it

    report = prepare(Branchy(), {"preset": "int8", "outputs": "where_needed"})  # the rules' outputs, and a note
    assert {r.name: r.output for r in report.rows} == {"fc": "float"}
    assert len(report.notes) == 1 and report.notes[0].startswith("outputs: where_needed fell back to the rules'")
    assert "torch.fx cannot trace the model (" in report.notes[0] and report.to_dict()["notes"] == report.notes


def test_outputs_where_needed_edge_cases():
    """A layer called twice absorbs no ReLU (that would change its other call); a layer feeding a weight-only
    layer still gets its output quantized (nothing else would quantize it)."""
    from torch import nn

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.head = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.act(self.fc(self.fc(x))) + x)

    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(8, 4)
    reference = model(x)
    report = prepare(model, {"preset": "int8", "outputs": "where_needed"})
    assert report.fused_relus == {} and isinstance(model.act, nn.ReLU)
    set_fake_quant(model, False)
    assert torch.allclose(model(x), reference, atol=1e-6)

    weight_only_head = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    report = prepare(weight_only_head, {"outputs": "where_needed", "rules": [
        {"match": "0", "activation": {}}, {"match": "1", "activation": None}]})  # fmt: skip
    assert {r.name: r.output for r in report.rows} == {"0": "uint8 tensor", "1": "uint8 tensor"}


def test_low_bit_weights_default_to_learned_scales_from_an_mse_start():
    from qatkit.transform.rules import WeightQuant

    assert (WeightQuant().learnable, WeightQuant().observer) == (False, "minmax")  # 8 bits: min-max
    three = WeightQuant.model_validate({"bits": 3})
    assert (three.learnable, three.observer) == (True, "mse")
    four = WeightQuant.model_validate({"bits": 4})
    assert (four.learnable, four.observer) == (False, "minmax")  # measured no better at 4 bits
    fixed = WeightQuant.model_validate({"bits": 2, "learnable": False})
    assert (fixed.learnable, fixed.observer) == (False, "minmax")  # what the user said is kept
    start = WeightQuant.model_validate({"bits": 3, "observer": "percentile"})
    assert (start.learnable, start.observer) == (True, "percentile")
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    prepare(model, {"rules": [{"weight": {"bits": 2}, "activation": {}}]})
    assert isinstance(model[0].weight_quant.scale, torch.nn.Parameter)  # trained, at quant_lr
    assert not isinstance(model[0].input_quant.scale, torch.nn.Parameter)  # activations keep their calibration


def test_weight_errors_are_bounded_by_half_a_step_and_observe_nothing(tiny_mlp):
    import copy

    from qatkit.transform.prepare import weight_errors

    two = copy.deepcopy(tiny_mlp)
    prepare(tiny_mlp, "int8")
    prepare(two, {"rules": [{"match": "*", "weight": {"bits": 2}}]})
    for m in (tiny_mlp, two):
        calibrate(m, [torch.randn(16, 1, 8, 8)], 1)
    before = {k: v.clone() for k, v in two.state_dict().items()}
    e8, e2 = weight_errors(tiny_mlp), weight_errors(two)
    assert all(torch.equal(before[k], v) for k, v in two.state_dict().items())  # nothing observed or changed
    assert set(e8) == set(e2) == {"net.1", "net.3", "net.5"}
    for name in e8:
        layer = dict(tiny_mlp.named_modules())[name]
        rms = float(layer.weight.detach().pow(2).mean().sqrt())
        assert e8[name] <= float(layer.weight_quant.scale.max()) / 2 / rms + 1e-6  # rounding: at most half a step
        assert e2[name] > 5 * e8[name]
