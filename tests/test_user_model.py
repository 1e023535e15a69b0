"""The user's own model, data and task through `qatkit run`: import targets, .npz data with keyword inputs,
binary and regression tasks, every export format on multi-input models, and the errors of bad targets."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
import yaml

from qatkit.base.config import RecipeError
from qatkit.recipe import load_recipe
from qatkit.runner.pipeline import run

TWO_INPUT_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    class PixelNet(nn.Module):
        def __init__(self, hidden: int = 16, outputs: int = 1):
            super().__init__()
            self.xz_dense1 = nn.Linear(6, hidden)
            self.yl_dense1 = nn.Linear(4, hidden)
            self.merged = nn.Linear(2 * hidden, hidden)
            self.output_dense = nn.Linear(hidden, outputs)

        def forward(self, xz, yl):
            h = torch.cat([torch.relu(self.xz_dense1(xz)), torch.relu(self.yl_dense1(yl))], dim=1)
            return self.output_dense(torch.relu(self.merged(h)))
    """
)


def _pixels(path, n=240, regression=False, seed=0):
    g = np.random.default_rng(seed)
    xz, yl = g.normal(size=(n, 6)).astype(np.float32), g.normal(size=(n, 4)).astype(np.float32)
    signal = xz[:, 0] * yl[:, 1] + xz[:, 2] - 0.5 * yl[:, 0]
    y = signal.astype(np.float32) if regression else (signal > 0).astype(np.int64)
    np.savez(path, x_xz=xz, x_yl=yl, y=y)


def _recipe(folder, task, formats, monitor):
    r = {
        "name": f"pixels_{task}",
        "task": task,
        "data": {"path": "pixels.npz", "batch_size": 32, "val_fraction": 0.2, "test_fraction": 0.25},
        "model": {"target": "pixel_model:PixelNet", "args": {"hidden": 16}},
        "fp32": {"train": {"epochs": 4, "lr": 0.01, "monitor": monitor}},
        "variants": [{"name": "w8a8", "quant": "int8", "ptq": {"calib_batches": 2}, "qat": {"epochs": 1, "lr": 1e-3}}],
        "export": {"formats": formats, "latency_batches": [1, 8], "latency_seconds": 0.02,
                   "tflite": {"precisions": ["fp32", "int8"]}, "allow_parity_failure": True},
    }  # fmt: skip
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _pixel_net(folder):
    """The user's PixelNet class, imported from their folder as `qatkit run` would."""
    from qatkit.components.imports import import_target

    return import_target("pixel_model:PixelNet", folder)


@pytest.fixture()
def user_folder(tmp_path):
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "pixel_model.py").write_text(TWO_INPUT_MODEL)
    return folder


@pytest.mark.slow
def test_two_input_binary_model_runs_end_to_end_with_every_runnable_format(user_folder, tmp_path, monkeypatch):
    """Keyword inputs from x_xz / x_yl, one sigmoid logit; ONNX, LiteRT and packed files run and agree."""
    _pixels(user_folder / "pixels.npz")
    monkeypatch.chdir(tmp_path)  # the recipe's own folder must be what makes pixel_model importable
    recipe = load_recipe(_recipe(user_folder, "binary", ["onnx", "tflite", "executorch", "packed"], "roc_auc"))
    report = run(recipe, tmp_path / "out", progress=False)
    rows = {(r.variant, r.stage, r.format, r.precision): r for r in report.rows}
    fp32 = rows[("fp32", "fp32", "pytorch", None)]
    assert fp32.metrics["roc_auc"] > 0.8 and "pr_auc" in fp32.metrics
    for key in [("fp32", "fp32", "onnx", "fp32"), ("w8a8", "qat", "onnx", "int8"), ("fp32", "fp32", "tflite", "fp32"),
                ("w8a8", "qat", "tflite", "int8"), ("fp32", "fp32", "executorch", "fp32"),
                ("w8a8", "qat", "executorch", "int8"), ("w8a8", "qat", "packed", "packed-int8")]:  # fmt: skip
        row = rows[key]
        assert row.parity == "ok", (key, row.parity)
        assert row.agreement >= 0.97
    assert rows[("w8a8", "qat", "onnx", "int8")].latency_ms.keys() == {"1", "8"}
    assert rows[("w8a8", "qat", "executorch", "int8")].latency_ms.keys() == {"1", "8"}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["data"]["inputs"] == {"xz": "(6,) float32", "yl": "(4,) float32"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "ROC-AUC" in md and "keyword arguments" in md
    import onnx

    graph = onnx.load(str(tmp_path / "out" / "onnx" / "w8a8_qat.onnx")).graph
    assert [i.name for i in graph.input] == ["xz", "yl"]

    # a packed file and `qatkit export` rebuild the user's model from the recorded target and folder
    from qatkit.runner.export_run import export_run
    from qatkit.runner.rebuild import load_packed_model

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    packed = load_packed_model(tmp_path / "out" / "packed" / "w8a8_qat.packed.safetensors", trust_code=True)
    xz, yl = torch.randn(7, 6), torch.randn(7, 4)
    qat_row = rows[("w8a8", "qat", "pytorch", None)]
    again, _ = export_run(tmp_path / "out", ["onnx", "executorch"])
    assert again.find("w8a8", "qat", "onnxruntime").parity == "ok"
    assert again.find("w8a8", "qat", "executorch-xnnpack").parity == "ok"
    assert packed(xz=xz, yl=yl).shape == (7, 1) and qat_row.metrics is not None


@pytest.mark.slow
def test_regression_model_reports_r2_and_relative_error(user_folder, tmp_path):
    _pixels(user_folder / "pixels.npz", regression=True)
    recipe = load_recipe(_recipe(user_folder, "regression", ["onnx"], "r2"))
    report = run(recipe, tmp_path / "out", progress=False)
    fp32 = report.find("fp32", "fp32", "pytorch")
    assert set(fp32.metrics) == {"loss", "mae", "r2"} and fp32.metrics["r2"] > 0.5
    onnx_q = next(r for r in report.rows if r.format == "onnx" and r.variant == "w8a8" and r.stage == "qat")
    assert 0 <= onnx_q.agreement < 0.05 and onnx_q.parity == "ok"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "R²" in md and "rel. error %" in md


def test_exported_onnx_of_a_two_input_model_matches_pytorch(user_folder, tmp_path):
    """ORT outputs of the float graph equal the PyTorch model's on the same two named inputs."""

    from qatkit import export_onnx
    from qatkit.export import verify

    PixelNet = _pixel_net(user_folder)
    torch.manual_seed(0)
    model = PixelNet().eval()
    xz, yl = torch.randn(5, 6), torch.randn(5, 4)
    export_onnx(model, (xz, yl), tmp_path / "m.onnx")
    sess = verify.session(tmp_path / "m.onnx")
    got = verify.run(sess, {"input0": xz.numpy(), "input1": yl.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(xz, yl).detach(), atol=1e-5, rtol=1e-5)


def test_bad_targets_are_one_line_errors(user_folder):
    from qatkit.components.imports import import_target

    with pytest.raises(RecipeError, match="cannot import 'no_such_module'"):
        import_target("no_such_module:Net", user_folder, "model.target")
    with pytest.raises(RecipeError, match="has no 'Nett'.*PixelNet"):
        import_target("pixel_model:Nett", user_folder, "model.target")
    (user_folder / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RecipeError, match="importing 'broken' failed: RuntimeError: boom"):
        import_target("broken:Net", user_folder, "model.target")
    from qatkit.components.models import make_model
    from qatkit.recipe import ModelConfig

    with pytest.raises(RecipeError, match="bad args"):
        make_model(ModelConfig(target="pixel_model:PixelNet", args={"width": 3}), (6,), 1, user_folder)


def test_pickled_checkpoint_is_refused_with_how_to_convert(tmp_path):
    from qatkit.recipe import parse_recipe

    with pytest.raises(RecipeError, match=r"fp32.checkpoint: model.pt is a pickle.*safetensors"):
        parse_recipe({"variants": [{"name": "a", "quant": "int8"}], "fp32": {"checkpoint": "model.pt"}})


def test_monitor_must_be_a_metric_of_the_task():
    from qatkit.recipe import parse_recipe

    with pytest.raises(RecipeError, match="monitor: 'accuracy' is not a metric of task 'regression'"):
        parse_recipe({"task": "regression", "variants": [{"name": "a", "quant": "int8"}],
                      "fp32": {"train": {"monitor": "accuracy"}}})  # fmt: skip
    parse_recipe({"task": "binary", "variants": [{"name": "a", "quant": "int8"}],
                  "fp32": {"train": {"monitor": "roc_auc"}}})  # fmt: skip


class _ConvPool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("outputs", ["rules", "where_needed"])
def test_onnx_names_quantized_layers_that_run_in_float(tmp_path, outputs):
    """A conv that feeds pooling without an output quantizer runs in float in ORT: named. where_needed: none."""
    from qatkit import calibrate, export_onnx, prepare
    from qatkit.export.verify import float_quantized_layers

    torch.manual_seed(0)
    model = _ConvPool()
    prepare(model, {"preset": "int8", "outputs": outputs})
    x = torch.randn(16, 3, 8, 8)
    calibrate(model, [x], 1)
    export_onnx(model, x, tmp_path / "m.onnx")
    slow = float_quantized_layers(tmp_path / "m.onnx", ["conv", "head"])
    assert slow == (["conv"] if outputs == "rules" else [])  # the head is rewritten to MatMulIntegerToFloat


def test_python_api_takes_a_model_object_and_data_sets(tmp_path):
    """qatkit.run with a module and (train, val, test) data sets: nothing importable, nothing registered."""
    import qatkit
    from qatkit.components.splits import ArrayDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    ds = ArrayDataset({"input": x}, y)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    recipe = {"name": "api", "fp32": {"train": {"epochs": 3, "lr": 0.01}},
              "variants": [{"name": "q", "quant": "int8", "qat": None}],
              "export": {"formats": ["onnx"], "latency_batches": [1], "latency_seconds": 0.02}}  # fmt: skip
    report = qatkit.run(recipe, tmp_path / "o", model=model, data=(ds.subset(range(120)), ds.subset(range(120, 160)),
                        ds.subset(range(160, 200))), progress=False)  # fmt: skip
    assert report.find("fp32", "fp32", "pytorch").metrics["accuracy"] > 0.8
    assert report.find("q", "ptq", "onnxruntime").parity == "ok"


@pytest.mark.slow
def test_hugging_face_folder_with_token_inputs(tmp_path):
    """model.hf: a save_pretrained sequence classifier, keyword int64 inputs from x_input_ids/x_attention_mask."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert", safe_serialization=True)
    g = np.random.default_rng(0)
    ids = g.integers(1, 40, size=(160, 8)).astype(np.int64)
    y = (ids[:, 0] > 20).astype(np.int64)  # learnable from the first token
    np.savez(tmp_path / "tokens.npz", x_input_ids=ids, x_attention_mask=np.ones_like(ids), y=y)
    recipe = {"name": "bert", "task": "classification", "base_dir": str(tmp_path),
              "data": {"path": "tokens.npz", "batch_size": 16}, "model": {"hf": "bert"},
              "fp32": {"train": {"epochs": 3, "lr": 0.003}},
              "variants": [{"name": "w8a8", "quant": "int8", "ptq": {"calib_batches": 2}, "qat": None}],
              "export": {"formats": ["onnx"], "latency_batches": [1], "latency_seconds": 0.02,
                         "allow_parity_failure": True}}  # fmt: skip
    import qatkit

    report = qatkit.run(recipe, tmp_path / "out", progress=False)
    # the same folder's weights as the float checkpoint: loaded into the wrapped model, no float training
    again = qatkit.run(dict(recipe, fp32={"checkpoint": "bert", "train": {"epochs": 0}}), tmp_path / "again",
                       progress=False)  # fmt: skip
    assert again.training == {} and again.find("fp32", "fp32", "pytorch").metrics is not None  # strict load held
    onnx_row = report.find("w8a8", "ptq", "onnxruntime")
    assert onnx_row.metrics is not None and onnx_row.agreement >= 0.9, onnx_row.parity
    assert report.data["inputs"] == {"input_ids": "(8,) int64", "attention_mask": "(8,) int64"}


def test_pickled_hf_weights_are_refused(tmp_path):
    from qatkit.components.hf import load_hf_classifier

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(RecipeError, match="pickled"):
        load_hf_classifier(folder)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["csv", "target"])
def test_table_file_and_loader_target_run_with_a_bundled_model(tmp_path, source):
    g = np.random.default_rng(1)
    x = g.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] - x[:, 2] > 0).astype(np.int64)
    if source == "csv":
        import pandas as pd

        frame = pd.DataFrame(x, columns=["a", "b", "c", "d"]).assign(label=np.where(y == 1, "fall", "adl"))
        frame.to_csv(tmp_path / "table.csv", index=False)
        data = {"path": "table.csv", "label": "label"}
    else:
        np.savez(tmp_path / "arrays.npz", x=x, y=y)
        (tmp_path / "my_data.py").write_text(textwrap.dedent('''
            import numpy as np, torch
            from torch.utils.data import TensorDataset

            def load(path, n_test=60):
                d = np.load(path)
                x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
                return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])
            '''))  # fmt: skip
        data = {"target": "my_data:load", "args": {"path": str(tmp_path / "arrays.npz")}}
    recipe = {"name": source, "task": "binary", "base_dir": str(tmp_path), "data": dict(data, batch_size=32),
              "model": {"name": "mlp", "args": {"hidden": [16]}}, "fp32": {"train": {"epochs": 5, "lr": 0.01}},
              "variants": [{"name": "q", "quant": "int8", "qat": None}],
              "export": {"formats": ["onnx"], "latency_batches": [1], "latency_seconds": 0.02}}  # fmt: skip
    import qatkit

    report = qatkit.run(recipe, tmp_path / "out", progress=False)
    fp32 = report.find("fp32", "fp32", "pytorch")
    assert fp32.metrics["accuracy"] > 0.85 and "roc_auc" in fp32.metrics
    assert report.class_names == (["adl", "fall"] if source == "csv" else ["0", "1"])
    assert report.find("q", "ptq", "onnxruntime").parity == "ok"


def test_python_api_verification_is_one_call(user_folder, tmp_path):
    """qatkit.verify: a QAT model from the user's own loop, exported and run; float layers and parity reported."""

    import qatkit
    from qatkit.components.splits import ArrayDataset

    PixelNet = _pixel_net(user_folder)
    torch.manual_seed(0)
    float_model = PixelNet().eval()
    g = torch.Generator().manual_seed(1)
    test = ArrayDataset({"xz": torch.randn(64, 6, generator=g), "yl": torch.randn(64, 4, generator=g)},
                        torch.randint(0, 2, (64,), generator=g), keyword=True)  # fmt: skip
    import copy

    qat = copy.deepcopy(float_model)
    qatkit.prepare(qat, "int8")
    qatkit.calibrate(qat, torch.utils.data.DataLoader(test, batch_size=32), 2)
    report = qatkit.verify(qat, test, tmp_path / "v", ["onnx"], task="binary", float_model=float_model,
                           latency_batches=[1], latency_seconds=0.02)  # fmt: skip
    row = report.find("model", "qat", "onnxruntime")
    assert row.parity == "ok" and row.agreement >= 0.95 and row.float_layers == []
    assert report.float_reference(row) is not None and (tmp_path / "v" / "report.md").is_file()


def test_collapse_guard_follows_the_monitored_metric():
    from qatkit.tasks import BinaryTask, RegressionTask
    from qatkit.train import TrainConfig

    m = {"accuracy": 0.9, "macro_f1": 0.55, "loss": 0.3, "roc_auc": 0.8, "pr_auc": 0.4}
    assert BinaryTask(2, ["adl", "fall"]).objective(TrainConfig(monitor="macro_f1")).collapse_points(
        m
    ) == pytest.approx(55)
    assert BinaryTask(2, ["adl", "fall"]).objective(TrainConfig()).collapse_points(m) == pytest.approx(90)
    reg = RegressionTask().objective(TrainConfig())
    assert reg.monitor == "loss" and reg.collapse_points({"loss": 1.0}) is None and reg.lower_is_better("mae")


def test_core_ml_takes_a_two_input_model(user_folder, tmp_path):
    """One Core ML input per model input; the int8 file stores each layer's weight on the model's own scales."""
    pytest.importorskip("coremltools")

    from qatkit import calibrate, prepare
    from qatkit.export.coreml import export_coreml, inspect_mlpackage, match_weights

    PixelNet = _pixel_net(user_folder)
    torch.manual_seed(0)
    model = PixelNet().eval()
    prepare(model, "int8")
    xz, yl = torch.randn(32, 6), torch.randn(32, 4)
    calibrate(model, [{"xz": xz, "yl": yl}], 1)
    info = inspect_mlpackage(export_coreml(model, {"xz": xz[:1], "yl": yl[:1]}, tmp_path / "m.mlpackage", "int8"))
    assert [name for name, _ in info["inputs"]] == ["xz", "yl"]
    check = match_weights(info, model, "int8")
    assert check["layers"] == check["expected"] == 4 and check["max_rel_diff"] < 1e-2


def test_report_lists_unfolded_batchnorm_and_float_layers():
    from qatkit.runner.report import Report, Row

    report = Report({"name": "r", "task": {"name": "classification"}}, {"source": "x"}, ["a", "b"])
    report.folding = {"folded": ["bn1"], "left": {"bn2": "follows MaxPool2d, not a Conv/Linear"}, "traced": True}
    report.add(Row("q", "qat", "onnxruntime", None, format="onnx", precision="int8", float_layers=["conv3"]))
    warnings = report.warnings()
    assert any("bn2 not folded: follows MaxPool2d" in w for w in warnings)
    assert any("quantized layers that onnxruntime runs in float: conv3;" in w for w in warnings)
    md = report.to_markdown()
    assert "folded 1 into the preceding Conv/Linear: bn1" in md and "left unfolded: bn2" in md


def test_torch_encoder_layer_runs_its_quantized_ffn_in_eval_and_exports(tmp_path):
    """nn.TransformerEncoderLayer's fused eval kernel reads linear1/linear2's float weights: prepare turns it off,
    so the fake-quantized FFN is what eval computes (checked against the layer's own slow path) and it exports."""
    from qatkit import calibrate, export_onnx, prepare
    from qatkit.export import verify

    torch.manual_seed(0)
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
    ).eval()
    x = torch.randn(4, 6, 16)
    report = prepare(model, {"preset": "ffn-only", "rules": [{"match": "*linear*", "weight": {"bits": 2}}]})
    assert any("fused encoder-layer kernel" in n for n in report.notes)
    calibrate(model, [x], 1)
    with torch.no_grad():
        quantized = model(x)
        layer = model.layers[0]
        h = layer.norm1(x + layer._sa_block(x, None, None))
        reference = layer.norm2(h + layer._ff_block(h))  # the slow path: the quantized linear1/linear2 run
    torch.testing.assert_close(quantized, reference)
    export_onnx(model, x, tmp_path / "enc.onnx")
    got = verify.run(verify.session(tmp_path / "enc.onnx"), x.numpy())
    assert np.abs(got - quantized.numpy()).max() < 0.05


def test_names_that_could_leave_the_output_folder_are_refused():
    from qatkit.recipe import parse_recipe

    for where in ("name", "variant", "stage"):
        for bad in ("../escape", "/abs", "a/b", ".hidden", "a\\b"):
            d = {"variants": [{"name": "a", "quant": "int8"}]}
            if where == "name":
                d["name"] = bad
            elif where == "variant":
                d["variants"][0]["name"] = bad
            else:
                d["fp32"] = {"train": [{"name": bad}]}
            with pytest.raises(RecipeError, match="should match pattern"):
                parse_recipe(d)


def test_a_nan_model_never_passes_parity(tmp_path):
    """Two NaN models agree on every row; parity must still fail."""
    from qatkit.components.splits import ArrayDataset
    from qatkit.runner.check import verify_model

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    test = ArrayDataset({"input": torch.randn(16, 3)}, torch.randint(0, 2, (16,)))
    report = verify_model(model, test, tmp_path, ["onnx"], latency_batches=[1], latency_seconds=0.01)
    row = report.find("model", "qat", "onnxruntime")
    assert row.parity.startswith("failed: non-finite outputs")


def test_duplicate_recipe_keys_are_refused_naming_both_lines(tmp_path):
    from qatkit.recipe import load_recipe

    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nfp32:\n  train: {epochs: 1}\nvariants: [{name: q, quant: int8}]\nname: b\n")
    with pytest.raises(RecipeError, match=r"dup.yaml: not valid YAML: .*duplicate key 'name' \(lines 1 and 5\)"):
        load_recipe(path)


def test_a_fifo_where_a_checkpoint_belongs_is_refused_not_waited_on(tmp_path):
    import os

    from qatkit.io.checkpoint import CheckpointError, load_weights, read_metadata

    fifo = tmp_path / "fp32.safetensors"
    os.mkfifo(fifo)
    for reader in (read_metadata, load_weights):
        with pytest.raises(CheckpointError, match="not a regular file"):
            reader(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_metadata(tmp_path)
