"""Safety against careless or hostile input: strict recipes, the output folder's ownership and lock, model
arguments checked before training, and checkpoints verified by content hash, dtype and finiteness."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

import qatkit
from qatkit.base.config import RecipeError
from qatkit.io.checkpoint import CheckpointError, check_state_fits, load_weights, save_weights
from qatkit.recipe import load_recipe, parse_recipe
from qatkit.runner.outdir import LOCK, MARKER, OutputError, inside, run_lock

BASE = {"name": "s", "variants": [{"name": "a", "quant": "int8"}]}
QUICK = {
    "name": "quick",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "fp32": {"train": {"epochs": 1, "max_steps": 2, "validation": False, "logging": {"tensorboard": False}}},
    "variants": [{"name": "a", "quant": "int8", "ptq": {"calib_batches": 1}, "qat": None}],
    "export": {"formats": []},
}


def recipe_error(patch: dict) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe({**BASE, **patch})
    return str(e.value)


@pytest.mark.parametrize(
    "patch, where, what",
    [
        ({"fp32": {"train": {"lr": "1e3"}}}, "fp32.train.lr", "valid number"),
        ({"data": {"batch_size": True}}, "data.batch_size", "valid integer"),
        ({"data": {"batch_size": 2.0}}, "data.batch_size", "valid integer"),
        ({"fp32": {"fold_batchnorm": 1}}, "fp32.fold_batchnorm", "valid boolean"),
        ({"export": {"latency_batches": [-1000000000]}}, "export.latency_batches[0]", "greater than or equal to 1"),
        ({"export": {"latency_batches": [1] * 9}}, "export.latency_batches", "at most 8"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"fp32": {"train": {"lr": float("nan")}}}, "fp32.train.lr", "finite number"),
        ({"fp32": {"train": {"epochs": 10**9}}}, "fp32.train.epochs", "less than or equal to"),
        ({"data": {"batch_size": 10**7}}, "data.batch_size", "less than or equal to"),
        ({"model": {"name": "transformer", "args": {"heads": 0}}}, "args.heads", "greater than or equal to 1"),
        ({"model": {"name": "transformer", "args": {"heads": 7}}}, "args", "heads (7) must divide dim (32)"),
        ({"model": {"name": "cnn1d", "args": {"channels": []}}}, "args.channels", "at least 1 item"),
        ({"model": {"name": "mlp", "args": {"hidden": [10**9]}}}, "args.hidden[0]", "less than or equal to"),
        ({"model": {"name": "mlp", "args": {"hidden": [8] * 10000}}}, "args.hidden", "at most 64"),
        ({"model": {"name": "mlp", "args": {"width": 3}}}, "args.width", "unknown key"),
    ],
)
def test_no_coercion_and_bounds_name_the_field(patch, where, what):
    msg = recipe_error(patch)
    assert where in msg and what in msg, msg


def test_yaml_scientific_numbers_are_numbers_and_quoted_ones_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: s\nvariants: [{name: a, quant: int8}]\nfp32: {train: {lr: 3e-4, end_lr: 1.5E-6}}\n")
    r = load_recipe(path)
    assert r.fp32.train.lr == pytest.approx(3e-4) and r.fp32.train.end_lr == pytest.approx(1.5e-6)
    path.write_text("name: s\nvariants: [{name: a, quant: int8}]\nfp32: {train: {lr: '1e3'}}\n")
    with pytest.raises(RecipeError, match=r"fp32.train.lr: Input should be a valid number \(got '1e3'\)"):
        load_recipe(path)


def test_non_utf8_deep_and_alias_bomb_files_are_refused_quickly(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="latin1.yaml: not UTF-8"):
        load_recipe(bad)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(RecipeError, match="deep.yaml: nested deeper than 32 levels"):
        load_recipe(deep)
    bomb = tmp_path / "bomb.yaml"
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 12)]
    bomb.write_text("\n".join(lines) + "\nname: s\n")
    t = time.perf_counter()
    with pytest.raises(RecipeError, match="unknown key") as e:
        load_recipe(bomb)
    assert time.perf_counter() - t < 5 and "more problem" in str(e.value)


def qatkit_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qatkit", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_user_model_args_are_checked_before_training(tmp_path):
    (tmp_path / "wide.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=8, heads=2):\n"
        "        super().__init__()\n"
        "        self.heads, self.a, self.b = heads, nn.Linear(64, width), nn.Linear(width, 10)\n"
        "    def forward(self, x):\n"
        "        y = self.b(self.a(x.flatten(1)))\n"
        "        return y.view(x.shape[0], self.heads, -1).sum(1)\n"
    )
    for args, expect in [
        ({"width": 10**10}, "GiB available"),  # sized on the meta device: nothing allocated
        ({"heads": 7}, "the model fails on a batch of the data (RuntimeError: shape"),
    ]:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**BASE, "model": {"target": "wide:Net", "args": args}}))
        for cmd in (["layers", "r.yaml"], ["run", "r.yaml", "--out", "out"]):
            r = qatkit_cli(*cmd, cwd=tmp_path)
            assert r.returncode == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.stderr
            assert not (tmp_path / "out" / "fp32_train.csv").exists()


def test_fresh_run_refuses_foreign_files_and_overwrite_never_replaces_them(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "model.bin").write_text("my weights")
    with pytest.raises(OutputError, match=r"holds files qatkit did not write \(checkpoints, notes.txt\)"):
        qatkit.run(QUICK, out)
    with pytest.raises(OutputError, match="checkpoints was not written by qatkit"):
        qatkit.run(QUICK, out, overwrite=True)  # a run would replace it: refused even with overwrite
    (out / "checkpoints" / "model.bin").unlink()
    (out / "checkpoints").rmdir()
    qatkit.run(QUICK, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "report.json").is_file()
    assert (out / MARKER).is_file() and not (out / LOCK).exists()
    qatkit.run(QUICK, out, overwrite=True)  # its own run folder: qatkit replaces its files, keeps the notes
    assert (out / "notes.txt").read_text() == "my notes"
    with pytest.raises(OutputError, match="notes.txt"):
        qatkit.run(QUICK, out)


def test_second_run_into_a_locked_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(OutputError, match=f"another qatkit run \\(PID {os.getpid()}"):
            qatkit.run(QUICK, out)
    assert not (out / LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    qatkit.run(QUICK, out)  # the lock's process is gone: taken over, released at the end
    assert (out / "report.json").is_file() and not (out / LOCK).exists()


def test_paths_outside_the_output_folder_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert inside(out, out / "onnx" / "a.onnx") == out / "onnx" / "a.onnx"
    for bad in (out / ".." / "escape.onnx", tmp_path / "elsewhere", out / "onnx" / ".." / ".." / "x"):
        with pytest.raises(OutputError, match="outside the output folder"):
            inside(out, bad)
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="outside the output folder"):
        inside(out, out / "link" / "x.safetensors")


def test_checkpoint_body_bit_flip_nan_and_dtype_are_refused(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", {"w": torch.ones(64), "n": torch.arange(4)}, {"stage": "fp32"})
    assert torch.equal(load_weights(path)["w"], torch.ones(64))
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01  # one bit inside the tensor bytes; the header still parses
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="w.safetensors: content hash mismatch"):
        load_weights(path)
    nan = save_weights(tmp_path / "nan.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match=r"nan.safetensors: tensor 'w' holds 1 NaN or inf value\(s\) of 2"):
        load_weights(nan)
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([float("inf")])}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'w' holds 1 NaN or inf"):
        load_weights(tmp_path / "foreign.safetensors", allow_foreign=True)
    with pytest.raises(CheckpointError, match="n has dtype torch.int64, the model has torch.float32"):
        check_state_fits("x", {"n": torch.zeros(4)}, {"n": torch.arange(4)})


@pytest.mark.parametrize(
    "content, what",
    [
        (b"", "malformed JSON"),
        (b"[1, 2]", "got a JSON list"),
        (b'{"recipe": []}', "no 'recipe' mapping"),
        (b'{"recipe": {"name": "x"}, "rows": {"a": 1}}', "malformed qatkit report"),
        (b"\xa1\xa2", "not UTF-8"),
    ],
)
def test_malformed_report_is_one_line_naming_it(tmp_path, content, what):
    (tmp_path / "report.json").write_bytes(content)
    r = qatkit_cli("export", str(tmp_path))
    assert r.returncode == 2 and "report.json" in r.stderr and what in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_special_files_where_data_or_configs_belong_are_refused(tmp_path):
    from qatkit.components.datafiles import load_file
    from qatkit.components.hf import load_hf_classifier
    from qatkit.components.splits import DataError

    os.mkfifo(tmp_path / "data.npz")
    with pytest.raises(DataError, match="data.npz: not a regular file"):
        load_file(tmp_path / "data.npz", task="classification")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{bad")
    with pytest.raises(RecipeError, match="config.json: malformed JSON"):
        load_hf_classifier(tmp_path / "hf")


def _packed_file(tmp_path, tiny_mlp, meta):
    import copy

    from qatkit.export.packed import save_packed

    model = copy.deepcopy(tiny_mlp)
    qatkit.prepare(model, "w4a8")
    qatkit.calibrate(model, [torch.randn(8, 1, 8, 8)], 1)
    return save_packed(model, tmp_path / "m.packed.safetensors", meta) and tmp_path / "m.packed.safetensors"


def test_a_packed_file_naming_code_is_not_imported_without_trust(tmp_path, tiny_mlp, monkeypatch):
    from qatkit.runner.rebuild import load_packed_model

    monkeypatch.chdir(tmp_path)
    hostile = {"model_config": {"target": "os:system", "args": {"command": "touch PWNED"}}, "base_dir": None,
               "input_shape": [1, 8, 8], "num_outputs": 10, "folded": False, "quant": {"preset": "w4a8"}}  # fmt: skip
    path = _packed_file(tmp_path, tiny_mlp, hostile)
    with pytest.raises(CheckpointError, match=r"names model code to import \('os:system'"):
        load_packed_model(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "field, value, what",
    [
        ("input_shape", [1, -8, 8], "input_shape must be"),
        ("num_outputs", "10", "num_outputs must be"),
        ("model_config", {"name": "mlp", "args": {"hidden": "x"}}, "model_config"),
        ("folded", 1, "folded must be"),
    ],
)
def test_packed_build_fields_are_checked(tmp_path, tiny_mlp, field, value, what):
    from qatkit.runner.rebuild import load_packed_model

    meta = {"model_config": {"name": "mlp", "args": {"hidden": [32, 16]}}, "base_dir": None,
            "input_shape": [1, 8, 8], "num_outputs": 10, "folded": False, "quant": {"preset": "w4a8"}}  # fmt: skip
    good = _packed_file(tmp_path, tiny_mlp, meta)
    assert load_packed_model(good) is not None
    path = _packed_file(tmp_path, tiny_mlp, {**meta, field: value})
    with pytest.raises(CheckpointError, match=what):
        load_packed_model(path)


def test_packed_layer_metadata_is_checked(tmp_path, tiny_mlp):
    from qatkit.export.packed import load_packed_state
    from qatkit.io.checkpoint import read_metadata

    path = _packed_file(tmp_path, tiny_mlp, {})
    meta = read_metadata(path)
    tensors = load_weights(path)
    first = next(iter(meta["packed_layers"]))
    for change, what in [({"code_bits": 3}, "not a packed grid"), ({"shape": [16, 999]}, "codes do not fit"),
                         ({"ch_axis": 5}, "out of range"), ({"qmin": "0"}, "expected int")]:  # fmt: skip
        layers = dict(meta["packed_layers"], **{first: {**meta["packed_layers"][first], **change}})
        extra = {k: v for k, v in meta.items() if k not in ("format", "sha256", "packed_layers")}
        bad = save_weights(tmp_path / "bad.safetensors", tensors, {**extra, "packed_layers": layers})
        with pytest.raises(CheckpointError, match=what):
            load_packed_state(bad)
