"""Progressive bit-lowering: stages at wider weight grids before the rules' own, scales re-initialised by MSE
search at each change, exact across a resume that reloads finished stages; a stage's own batch size."""

import csv
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import qatkit
from qatkit.quant.affine import fake_quantize, qparams_from_range
from qatkit.recipe import RecipeError, parse_recipe
from qatkit.runner.export_run import load_run
from qatkit.transform.bits import set_weight_bits


def test_set_weight_bits_regrids_with_an_mse_scale_and_restores(tiny_mlp):
    qatkit.prepare(tiny_mlp, {"rules": [{"match": "*", "weight": {"bits": 2}}]})
    qatkit.calibrate(tiny_mlp, [torch.randn(16, 1, 8, 8)], 1)
    layer = tiny_mlp.net[1]
    fq, w = layer.weight_quant, layer.weight.detach()
    assert set_weight_bits(tiny_mlp, 4) == ["net.1", "net.3", "net.5"] and fq.spec.bits == 4
    assert set_weight_bits(tiny_mlp, 4) == []  # same width: nothing re-initialised
    q = fake_quantize(w, fq.scale.detach(), fq.zero_point, fq.spec.qmin, fq.spec.qmax, 0)
    assert max(len(torch.unique(row)) for row in q) <= 16  # a 4-bit grid
    lo, hi = w.amin(1), w.amax(1)  # the MSE-searched range does no worse than min-max, per channel
    s, z = qparams_from_range(lo, hi, fq.spec.qmin, fq.spec.qmax, True)
    minmax_err = (fake_quantize(w, s, z, fq.spec.qmin, fq.spec.qmax, 0) - w).pow(2).mean(1)
    assert bool(((q - w).pow(2).mean(1) <= minmax_err + 1e-9).all())
    set_weight_bits(tiny_mlp, None)
    assert fq.spec == fq.base_spec and fq.spec.bits == 2


RECIPE = {
    "name": "prog",
    "data": {"name": "digits"},
    "model": {"name": "mlp", "args": {"hidden": [32]}},
    "fp32": {"train": {"epochs": 3, "lr": 0.01, "logging": {"tensorboard": False}}},
    "variants": [{"name": "w2", "quant": {"rules": [{"match": "*", "weight": {"bits": 2}}]},
                  "ptq": {"calib_batches": 2},
                  "qat": [{"name": "q8", "epochs": 1, "lr": 0.001, "weight_bits": 8},
                          {"name": "q4", "epochs": 1, "lr": 0.001, "weight_bits": 4, "batch_size": 32},
                          {"name": "q2", "epochs": 1, "lr": 0.001}]}],
    "export": {"formats": ["onnx"], "latency_batches": [1], "latency_seconds": 0.02},
}  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_progressive_stages_end_on_the_rules_width_and_resume_exactly(tmp_path):
    report = qatkit.run(RECIPE, tmp_path / "a", progress=False)
    assert [r["weight"] for r in report.layers["w2"]["layers"]] == [
        "int2 channel, lsq"
    ] * 2  # learned scales: the default at <= 4 bits
    assert {"w2_qat-q8", "w2_qat-q4", "w2_qat-q2"} <= set(report.training)
    assert report.find("w2", "qat", "onnxruntime").parity == "ok"  # the file is built at the final 2 bits
    # a stage's own batch size replaces data.batch_size (64) for that stage only
    n = len(load_run(tmp_path / "a")[1].train)
    steps = {s: _steps_after_epoch_1(tmp_path / "a" / f"w2_qat-{s}_train.csv") for s in ("q8", "q4", "q2")}
    assert steps == {"q8": math.ceil(n / 64), "q4": math.ceil(n / 32), "q2": math.ceil(n / 64)}
    # a resume that reloads the finished 8- and 4-bit stages and reruns the 2-bit one gives the same tensors
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    progress = json.loads((tmp_path / "b" / "progress.json").read_text())
    del progress["done"]["w2_qat-q2"]
    (tmp_path / "b" / "progress.json").write_text(json.dumps(progress))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "w2_qat-q2")
    qatkit.run(RECIPE, tmp_path / "b", progress=False, resume="auto")
    a, b = load_file(tmp_path / "a" / "w2_qat.safetensors"), load_file(tmp_path / "b" / "w2_qat.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps_after_epoch_1(csv_path) -> int:
    rows = list(csv.DictReader(csv_path.open()))
    return int(next(r for r in rows if r["epoch"] == "1")["step"])


def test_weight_bits_only_on_earlier_qat_stages():
    bad_last = {**RECIPE, "variants": [{**RECIPE["variants"][0], "qat": {"epochs": 1, "weight_bits": 4}}]}
    with pytest.raises(RecipeError, match="the last QAT stage trains at the rules' own width"):
        parse_recipe(bad_last)
    with pytest.raises(RecipeError, match=r"fp32.train.weight_bits: the float stage has no quantized weights"):
        parse_recipe({**RECIPE, "fp32": {"train": {"epochs": 1, "weight_bits": 4}}})
