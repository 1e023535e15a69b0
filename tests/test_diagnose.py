"""Diagnose: each quantized layer's output in the exported ONNX file (run by ONNX Runtime) against the PyTorch
model, in output quantization steps; a file altered in one layer is traced to that layer first."""

import onnx
import pytest
import torch
from onnx import numpy_helper

import qatkit
from qatkit.base.batch import InputSpec
from qatkit.export.diagnose import LAYER_MAP_KEY, compare_layers, first_over_one_step, read_layer_outputs
from qatkit.export.onnx import export_onnx
from small_models import quantized_cnn


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, x = quantized_cnn(128)
    path = export_onnx(model, x[:2], tmp_path_factory.mktemp("diag") / "m.onnx")
    return model, x, path


def altered(path, tmp_path, layer: str, factor: float):
    """A copy of the file with one output channel of ``layer``'s weight scale multiplied by ``factor``."""
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith(layer + "."))
    scale = numpy_helper.to_array(inits[node.input[1]]).copy()
    scale[1] *= factor
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(scale, node.input[1]))
    out = tmp_path / f"altered_{layer}.onnx"
    onnx.save(proto, str(out))
    return out


def test_the_file_records_each_quantized_layer_in_graph_order(exported):
    _, _, path = exported
    layers = read_layer_outputs(onnx.load(str(path)))
    assert list(layers) == ["features.0", "features.3", "head"] and layers["head"]["output"] == "logits"


def test_an_unaltered_export_stays_within_one_step(exported):
    model, x, path = exported
    diffs = compare_layers(model, path, InputSpec.of(x), {"input": x}).layers
    assert [d.name for d in diffs] == ["features.0", "features.3", "head"]
    assert first_over_one_step(diffs) is None
    assert all(d.max_steps <= 1.001 and d.cosine > 0.999 for d in diffs)
    assert all(d.plain_max_steps is not None and d.plain_max_steps <= 1.001 for d in diffs)  # unfused too


@pytest.mark.parametrize("layer", ["features.0", "features.3", "head"])
def test_an_altered_scale_is_named_first_with_its_cause(exported, tmp_path, layer):
    model, x, path = exported
    diffs = compare_layers(model, altered(path, tmp_path, layer, 1.5), InputSpec.of(x), {"input": x}).layers
    first = first_over_one_step(diffs)
    assert first is not None and first.name == layer
    assert "weight scale differs" in first.cause and "50%" in first.cause
    before = diffs[: [d.name for d in diffs].index(layer)]
    assert all(d.max_steps <= 1.001 for d in before)  # the layers before it still agree
    assert first.plain_max_steps > 1.001  # the file itself differs: unfused too
    assert first.own_max_steps > 1.001  # fed the runtime's own input, the altered layer alone still differs
    after = diffs[[d.name for d in diffs].index(layer) + 1 :]
    assert all(d.own_max_steps <= 1.001 for d in after)  # the layers after it only inherit the difference


def test_a_file_without_the_layer_map_is_refused(exported, tmp_path):
    model, x, path = exported
    proto = onnx.load(str(path))
    for p in list(proto.metadata_props):
        if p.key == LAYER_MAP_KEY:
            proto.metadata_props.remove(p)
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match="no qatkit layer map"):
        compare_layers(model, bare, InputSpec.of(x), {"input": x})


def test_an_in_place_activation_after_a_layer_does_not_change_its_captured_output(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU6(inplace=True),
                                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 10))  # fmt: skip
    qatkit.prepare(model, "int8")
    x = torch.randn(64, 1, 8, 8) * 3
    qatkit.calibrate(model, [x], 1)
    path = export_onnx(model.eval(), x[:2], tmp_path / "relu6.onnx")
    diffs = compare_layers(model, path, InputSpec.of(x), {"input": x}).layers
    assert diffs[0].name == "0" and diffs[0].cosine > 0.9999  # the conv's own output, before the in-place ReLU6
    assert first_over_one_step(diffs) is None


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.after = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.after(h + self.body(h)).mean(dim=(-2, -1))


def test_the_layer_map_finds_the_residual_add_in_front_of_a_layer(tmp_path):
    model = Residual()
    qatkit.prepare(model, "int8")
    x = torch.randn(32, 1, 8, 8)
    qatkit.calibrate(model, [x], 1)
    proto = onnx.load(str(export_onnx(model.eval(), x[:2], tmp_path / "res.onnx")))
    layers = read_layer_outputs(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    assert producers[layers["after"]["input"]].op_type == "Add"  # the value its input quantizer reads
    assert layers["stem"]["input"] == "input" and "input" not in producers  # the graph input
