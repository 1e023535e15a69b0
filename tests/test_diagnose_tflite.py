"""Diagnose for LiteRT files: each quantized layer's output captured in LiteRT's builtin kernels against the
PyTorch model, found by the module scopes in tensor names; an altered weight scale is traced to its layer."""

import pytest

from qatkit.base.batch import InputSpec
from qatkit.export.diagnose import first_over_one_step
from small_models import quantized_cnn

pytest.importorskip("litert_torch")

from ai_edge_litert import schema_py_generated as schema  # noqa: E402

from qatkit.export.diagnose_tflite import compare_layers_tflite, layer_scopes  # noqa: E402
from qatkit.export.tflite import export_tflite, strip_tensor_names  # noqa: E402
from qatkit.io.checkpoint import atomic_write_bytes  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, x = quantized_cnn(64)
    path = export_tflite(model, x[:1], tmp_path_factory.mktemp("diag") / "m.tflite", "int8")
    return model, x, path


def altered(path, tmp_path, layer_scope: str, factor: float):
    """A copy of the file with output channel 1 of the weight scale of the op producing ``layer_scope``'s output
    multiplied by ``factor`` (the int8 weights stay: the layer now computes with a different scale)."""
    import flatbuffers

    m = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    g = m.subgraphs[0]
    for op in g.operators:
        name = g.tensors[op.outputs[0]].name.decode()
        if layer_scope in name.split(";") and len(op.inputs) > 1:
            q = g.tensors[op.inputs[1]].quantization
            q.scale = [float(v) for v in q.scale]
            q.scale[1] *= factor
            break
    else:
        raise AssertionError(f"no op produces {layer_scope}")
    b = flatbuffers.Builder(0)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    out = tmp_path / "altered.tflite"
    atomic_write_bytes(out, bytes(b.Output()))
    return out


def test_every_quantized_layer_is_found_and_agrees_within_one_step(exported):
    model, x, path = exported
    diag = compare_layers_tflite(model, path, InputSpec.of(x), {"input": x})
    assert [d.name for d in diag.layers] == ["features.0", "features.3", "head"]
    assert first_over_one_step(diag.layers) is None
    assert all(d.cosine > 0.999 for d in diag.layers)
    assert any("XNNPACK" in n for n in diag.notes)


@pytest.mark.parametrize("layer", ["features.0", "features.3", "head"])
def test_an_altered_scale_is_named_first_with_its_cause(exported, tmp_path, layer):
    model, x, path = exported
    scope = layer_scopes(model, InputSpec.of(x))[layer]
    diag = compare_layers_tflite(model, altered(path, tmp_path, scope, 1.5), InputSpec.of(x), {"input": x})
    first = first_over_one_step(diag.layers)
    assert first is not None and first.name == layer
    assert "weight scale differs" in first.cause and "50%" in first.cause
    assert first.own_max_steps > 1.001  # fed the runtime's own input, the altered layer alone still differs
    after = diag.layers[[d.name for d in diag.layers].index(layer) + 1 :]
    assert all(d.own_max_steps <= 1.001 for d in after)  # the layers after it only inherit the difference


def test_a_file_without_tensor_names_is_refused(exported, tmp_path):
    model, x, path = exported
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(path.read_bytes())
    strip_tensor_names(bare)
    with pytest.raises(ValueError, match="no layer found by its tensor names"):
        compare_layers_tflite(model, bare, InputSpec.of(x), {"input": x})
