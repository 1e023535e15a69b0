"""The command line, run as a user would: a tiny recipe end to end, and errors as one readable line."""

import json
import subprocess
import sys

import yaml

from qatkit.recipe import FORMATS

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "args": {"hidden": [32]}},
    "fp32": {"train": {"epochs": 2, "lr": 0.003}},
    "variants": [
        {"name": "w4a8", "quant": {"preset": "w4a8"}, "ptq": {"calib_batches": 2}, "qat": {"epochs": 1, "lr": 0.0005}}
    ],
    "export": {"latency_seconds": 0.05},
}


def qatkit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qatkit", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_run_tiny_recipe_writes_report_and_every_format(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY, export={"formats": list(FORMATS), "latency_seconds": 0.05})))
    out = tmp_path / "out"
    r = qatkit("run", str(recipe), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {(row["variant"], row["stage"], row["format"], row["precision"]): row for row in report["rows"]}
    sources = [("fp32", "fp32"), ("w4a8", "ptq"), ("w4a8", "qat")]
    assert {k[:2] for k in rows if k[2] == "pytorch"} == set(sources)
    assert {k[3] for k in rows if k[2] == "tflite"} == {"fp32", "dynamic_int8", "int8"}  # the default precisions
    for fmt, float_prec, quant_prec in [("onnx", "fp32", "int8"), ("tflite", "fp32", "int8"),
                                        ("coreml", "fp16", "int8"), ("executorch", "fp32", "int8"),
                                        ("packed", None, "packed-int4")]:  # fmt: skip
        expected = [("fp32", "fp32", float_prec)] if float_prec else []
        expected += [("w4a8", s, quant_prec) for s in ("ptq", "qat")]
        for v, s, p in expected:
            row = rows[v, s, fmt, p]
            assert (out / row["file"]).exists() and row["size_bytes"] > 0
            if fmt == "coreml":
                assert row["metrics"] is None and row["parity"] == "structure ok (not run)"
            else:
                assert row["parity"] == "ok" and row["agreement"] >= 0.99, row
    qat_onnx = rows["w4a8", "qat", "onnx", "int8"]
    assert qat_onnx["details"]["integer_kernels"] and set(qat_onnx["latency_ms"]) == {"1", "64"}
    assert set(rows["w4a8", "qat", "tflite", "int8"]["latency_ms"]) == {"1", "64"}
    qat_pte = rows["w4a8", "qat", "executorch", "int8"]
    assert set(qat_pte["details"]["layers"]) == {"int8"} and qat_pte["float_layers"] == []
    for name in ("fp32.safetensors", "w4a8_qat.safetensors", "report.md", "fp32_train.csv"):
        assert (out / name).is_file()
    md = (out / "report.md").read_text()
    assert "| w4a8 qat | litert | tflite | int8 |" in md and "## Layers: w4a8" in md and "not run" in md
    assert report["warm_start"]["w4a8"]["mismatched"] == []

    # the packed file alone rebuilds the QAT model: same test accuracy as the run's PyTorch row
    from qatkit.components.datasets import load_dataset
    from qatkit.runner.rebuild import load_packed_model
    from qatkit.train import classification_metrics, make_loader, predict

    data = load_dataset("digits", 0.15, 0)
    model = load_packed_model(out / rows["w4a8", "qat", "packed", "packed-int4"]["file"])
    logits, targets = predict(model, make_loader(data.test, 512, False))
    qat_acc = rows["w4a8", "qat", "pytorch", None]["metrics"]["accuracy"]
    assert classification_metrics(logits, targets, 10)["accuracy"] == qat_acc

    # re-export one format from the checkpoints: its rows are replaced, the others kept
    before = (out / "packed" / "w4a8_qat.packed.safetensors").stat().st_mtime_ns
    r = qatkit("export", str(out), "--format", "packed")
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "report.json").read_text())
    assert len(again["rows"]) == len(report["rows"])
    assert (out / "packed" / "w4a8_qat.packed.safetensors").stat().st_mtime_ns > before
    r = qatkit("export", str(out), "--format", "zip")
    assert r.returncode == 2 and "unknown export format 'zip'" in r.stderr and "Traceback" not in r.stderr

    # diagnose the QAT model's ONNX file layer by layer: a table, its numbers and a plot under diagnose/
    r = qatkit("diagnose", str(out), "--variant", "w4a8")
    assert r.returncode == 0, r.stderr
    layers = json.loads((out / "diagnose" / "w4a8_qat_onnx.json").read_text())["layers"]
    assert [d["name"] for d in layers] == ["net.1", "net.3"] and "# Diagnose: w4a8_qat.onnx" in r.stdout
    assert (out / "diagnose" / "w4a8_qat_onnx.png").read_bytes()[:4] == b"\x89PNG"
    r = qatkit("diagnose", str(out), "--format", "tflite")  # LiteRT: layers found by the tensor names
    assert r.returncode == 0, r.stderr
    assert "# Diagnose: w4a8_qat.tflite" in r.stdout and "| net.3 |" in r.stdout
    r = qatkit("diagnose", str(out), "--format", "coreml")
    assert r.returncode == 2 and "diagnose reads onnx, tflite files" in r.stderr and "Traceback" not in r.stderr


def test_parity_failure_exits_nonzero_unless_allowed(tmp_path):
    # int8 inputs/outputs need quantized logits; `outputs: rules` leaves them float, so that export fails
    export = {"formats": ["tflite"], "tflite": {"precisions": ["int8"], "io": "int8"}, "latency_batches": [1]}
    variant = dict(TINY["variants"][0], quant={"preset": "w4a8", "outputs": "rules"})
    recipe = dict(TINY, export=export, variants=[variant])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(recipe))
    r = qatkit("run", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "failed parity" in r.stderr and "add `output: {}` to a rule matching layer 'net.3'" in r.stderr
    assert (tmp_path / "o" / "report.md").is_file()  # the report is written before the run fails
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(dict(recipe, export=dict(export, allow_parity_failure=True))))
    r = qatkit("run", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "a"), "--no-progress")
    assert r.returncode == 0 and "allowed by the recipe" in r.stdout


def test_layers_command_prints_report():
    r = qatkit("layers", "digits_mlp")
    assert r.returncode == 0, r.stderr
    assert "3 of 3 layers quantized" in r.stdout and "int2 channel" in r.stdout


def test_bad_recipe_is_one_line_without_traceback(tmp_path):
    bad = dict(TINY, variants=[{"name": "a", "quant": {"preset": "int8"}, "qat": {"epochs": 1, "lr": -1}}])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(bad))
    r = qatkit("run", str(recipe))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "variants[0].qat.lr" in r.stderr and "greater than 0" in r.stderr
    r = qatkit("--debug", "run", str(recipe))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_error_with_brackets_is_printed_as_text(tmp_path):
    """A message holding what rich would read as markup (a path like ``[/x]``, gloo's ``[/pair.cc:553]``) is
    still one line naming it, not a MarkupError traceback."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY, data={"path": "missing[/x].npz", "batch_size": 64})))
    r = qatkit("run", str(recipe), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing[/x].npz: file not found" in r.stderr


def test_missing_recipe_names_bundled_ones():
    r = qatkit("run", "no_such_recipe")
    assert r.returncode == 2 and "bundled: basic_motions_cnn, digits_mlp" in r.stderr


def test_usage_errors_have_no_traceback():
    r = qatkit("run", "--bogus")
    assert r.returncode == 2 and "No such option" in r.stderr and "Traceback" not in r.stderr


def test_fp32_checkpoint_with_folded_batchnorm_reloads(tmp_path):
    first = {
        "name": "bm",
        "data": {"name": "basic_motions", "batch_size": 8},
        "model": {"name": "cnn1d", "args": {"channels": [8]}},
        "fp32": {"train": {"epochs": 2, "lr": 0.003}},
        "variants": [{"name": "w8", "quant": {"preset": "w8"}, "qat": None}],
        "export": {"formats": []},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(first))
    assert qatkit("run", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "a"), "--no-progress").returncode == 0
    second = dict(first, fp32={"checkpoint": str(tmp_path / "a" / "fp32.safetensors")})
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(second))
    r = qatkit("run", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "b"), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = {(x["stage"], x["runtime"]): x for x in json.loads((tmp_path / "b" / "report.json").read_text())["rows"]}
    first_rows = {
        (x["stage"], x["runtime"]): x for x in json.loads((tmp_path / "a" / "report.json").read_text())["rows"]
    }
    assert rows["fp32", "pytorch"]["metrics"] == first_rows["fp32", "pytorch"]["metrics"]


def test_stages_run_in_order_with_their_own_settings(tmp_path):
    recipe = dict(
        TINY,
        variants=[
            {
                "name": "w8a8",
                "quant": {"preset": "int8"},
                "qat": [
                    {"name": "stabilise", "epochs": 1, "lr": 5e-6, "validation": False},
                    {"name": "finetune", "epochs": 2, "lr": 1e-4, "schedule": "plateau", "plateau_patience": 1},
                ],
            }
        ],
        export={"formats": []},
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(recipe))
    r = qatkit("run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert list(report["training"]) == ["fp32", "w8a8_qat-stabilise", "w8a8_qat-finetune"]
    stabilise = (tmp_path / "o" / "w8a8_qat-stabilise_train.csv").read_text().splitlines()
    assert len(stabilise) == 2 and stabilise[1].split(",")[7] == ""  # one epoch, no validation
    finetune = (tmp_path / "o" / "w8a8_qat-finetune_train.csv").read_text().splitlines()
    assert len(finetune) == 1 + 1 + 2 and finetune[1].startswith("0,")  # baseline row, then 2 epochs
    assert json.loads((tmp_path / "o" / "progress.json").read_text())["done"].keys() == {
        "fp32",
        "w8a8_qat-stabilise",
        "w8a8_qat-finetune",
    }


def test_bundled_transformer_recipe_quantizes_only_the_ffn():
    r = qatkit("layers", "motions_transformer_ffn")
    assert r.returncode == 0, r.stderr
    assert "4 of 14 layers quantized" in r.stdout
    for line in r.stdout.splitlines():
        if "_proj" in line:
            assert "│ no " in line or " no " in line
