"""Cross-validation folds: how rows are split (checked against the groups and classes), the aggregate report
(checked against the folds' own reports), criteria, resume after kill -9 and parallel folds."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from browser import load_page
from qatkit.components.datafiles import load_file as load_data_file
from qatkit.components.folds import make_folds
from qatkit.components.splits import DataError, targets_of
from qatkit.recipe import CVConfig, RecipeError, parse_recipe

GROUPS = ["s1", "s2", "s3", "s4"]


def make_npz(path, n=240, seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat(GROUPS, n // len(GROUPS))
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, 8)) + y[:, None] * 0.8).astype(np.float32)
    np.savez(path, x=x, y=y, groups=g)
    return x, y, g


def rows_of(ds) -> set[tuple]:
    """The rows of a data set as hashable tuples (to check partitions against the file's rows)."""
    return {tuple(np.round(ds[i][0].numpy(), 5)) for i in range(len(ds))}


def test_leave_one_group_out_holds_out_each_group_once(tmp_path):
    x, y, g = make_npz(tmp_path / "d.npz")
    data = load_data_file(tmp_path / "d.npz", task="classification")
    folds = make_folds(data, CVConfig(by="group"), 0.2, "classification", 0)
    assert [f.name for f in folds] == [f"group-{s}" for s in GROUPS]
    by_row = {tuple(np.round(r, 5)): grp for r, grp in zip(x, g, strict=True)}
    for fold, held in zip(folds, GROUPS, strict=True):
        test, train, val = rows_of(fold.data.test), rows_of(fold.data.train), rows_of(fold.data.val)
        assert {by_row[r] for r in test} == {held} and len(test) == (g == held).sum()
        assert held not in {by_row[r] for r in train | val}
        assert not (train & val) and len(train) + len(val) + len(test) == len(x)
        assert abs(len(val) - 0.2 * (len(x) - len(test))) <= 1
    folds = make_folds(data, CVConfig(by="group", val="group"), 0.2, "classification", 0)
    for fold in folds:
        val_groups = set(fold.data.groups["val"])
        assert len(val_groups) == 1 and not val_groups & set(fold.data.groups["train"])


def test_k_fold_partitions_rows_stratified_and_seeded(tmp_path):
    x, y, _ = make_npz(tmp_path / "d.npz")
    data = load_data_file(tmp_path / "d.npz", task="classification")
    folds = make_folds(data, CVConfig(k=5), 0.15, "classification", 3)
    tests = [rows_of(f.data.test) for f in folds]
    assert sum(len(t) for t in tests) == len(x) and len(set().union(*tests)) == len(x)
    share = np.bincount(y) / len(y)
    for f in folds:
        counts = np.bincount(targets_of(f.data.test).numpy(), minlength=3)
        assert np.abs(counts / counts.sum() - share).max() < 0.05  # stratified
    again = make_folds(data, CVConfig(k=5, folds=["fold2"]), 0.15, "classification", 3)
    assert [f.name for f in again] == ["fold2"] and rows_of(again[0].data.test) == tests[2]


def test_fold_errors_name_the_problem(tmp_path):
    make_npz(tmp_path / "d.npz")
    data = load_data_file(tmp_path / "d.npz", task="classification")
    with pytest.raises(DataError, match="unknown fold"):
        make_folds(data, CVConfig(by="group", folds=["group-s9"]), 0.2, "classification", 0)
    data.groups = None
    with pytest.raises(DataError, match="needs data with groups"):
        make_folds(data, CVConfig(by="group"), 0.2, "classification", 0)
    base = {"name": "x", "variants": [{"name": "a", "quant": "int8"}]}
    with pytest.raises(RecipeError, match="give one of by: group"):
        parse_recipe({**base, "cv": {"by": "group", "k": 3}})
    with pytest.raises(RecipeError, match="val: group needs by: group"):
        parse_recipe({**base, "cv": {"k": 3, "val": "group"}})


RECIPE = {
    "name": "cvt",
    "data": {"path": "d.npz", "batch_size": 32},
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "fp32": {"train": {"epochs": 3, "lr": 0.01, "logging": {"tensorboard": False}}},
    "variants": [{"name": "w8", "quant": "int8", "ptq": {"calib_batches": 2},
                  "qat": {"epochs": 2, "lr": 0.001, "logging": {"tensorboard": False}}}],
    "export": {"formats": ["onnx"], "latency_batches": [1], "latency_seconds": 0.02},
    "cv": {"by": "group"},
    "criteria": {"max_qat_drop": 5, "max_export_drop": 2, "no_collapse": True},
}  # fmt: skip


def qatkit_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "qatkit", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def write_recipe(tmp_path, **changes):
    make_npz(tmp_path / "d.npz")
    (tmp_path / "cv.yaml").write_text(yaml.safe_dump({**RECIPE, **changes}))


def test_aggregate_report_matches_the_folds_reports(tmp_path):
    write_recipe(tmp_path)
    r = qatkit_cli("run", "cv.yaml", "--out", "out", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    top = json.loads((tmp_path / "out" / "report.json").read_text())
    per = {}
    for g in GROUPS:
        rows = json.loads((tmp_path / "out" / "folds" / f"group-{g}" / "report.json").read_text())["rows"]
        per[g] = {(x["variant"], x["stage"], x["format"]): x for x in rows}
    for key, label in [(("w8", "qat", "pytorch"), "w8 qat"), (("w8", "qat", "onnx"), "w8 qat onnx int8")]:
        accs = [per[g][key]["metrics"]["accuracy"] for g in GROUPS]
        agg = top["aggregate"][label]["metrics"]["accuracy"]
        assert agg["mean"] == pytest.approx(np.mean(accs)) and agg["std"] == pytest.approx(np.std(accs, ddof=1))
        assert agg["worst"] == min(accs) and agg["worst_fold"] == f"group-{GROUPS[int(np.argmin(accs))]}"
    assert top["aggregate"]["w8 qat onnx int8"]["parity_ok"] == 4
    verdicts = top["criteria"]
    assert {v["fold"] for v in verdicts} == {f"group-{g}" for g in GROUPS} and all(v["passed"] for v in verdicts)
    qat_drop = [v for v in verdicts if v["criterion"] == "max_qat_drop" and v["fold"] == "group-s2"][0]
    fp32 = per["s2"][("fp32", "fp32", "pytorch")]["metrics"]["accuracy"]
    assert qat_drop["value"] == pytest.approx(100 * (fp32 - per["s2"][("w8", "qat", "pytorch")]["metrics"]["accuracy"]))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Aggregate" in md and "| group-s3 | group s3 |" in md and "## Criteria" in md
    # report.html across the folds: self-contained, every plot present, and it loads in headless Chromium
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.index("Verdict") < page.index("Aggregate") < page.index("Plots") and "passed parity" in page
    plots = set(re.findall(r"data-plot='([^']+)'", page))
    assert plots == {"metric-by-fold", "metric-vs-size", "per-class-recall", "confusion"}
    assert not re.search(r"(src|href)=['\"]https?:", page) and "href='folds/group-s1/report.html'" in page
    assert (tmp_path / "out" / "folds" / "group-s1" / "report.html").is_file()
    attrs = load_page(tmp_path / "out" / "report.html")
    assert attrs.get("loaded") == "yes" and attrs["plots"] == "4" and attrs["broken"] == ""

    # a criterion missed on any fold: the report is written, the exit status is 1, the line names the fold
    write_recipe(tmp_path, criteria={"max_size_ratio": 0.01}, cv={"by": "group", "folds": ["group-s1", "group-s2"]})
    r = qatkit_cli("run", "cv.yaml", "--out", "out2", "--no-progress", cwd=tmp_path)
    assert r.returncode == 1 and "criteria missed: fold group-s1: max_size_ratio w8 ptq onnx int8" in r.stderr
    assert "criterion missed" in (tmp_path / "out2" / "report.md").read_text()


def final_tensors(out):
    return {
        (f, k): v for f in GROUPS for k, v in load_file(out / "folds" / f"group-{f}" / "w8_qat.safetensors").items()
    }


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_kill_mid_fold_then_resume_gives_the_uninterrupted_report(tmp_path):
    qat = {**RECIPE["variants"][0]["qat"], "checkpoint": {"every_steps": 1}}  # a step checkpoint to resume from
    write_recipe(tmp_path, variants=[{**RECIPE["variants"][0], "qat": qat}])
    ref = qatkit_cli("run", "cv.yaml", "--out", "ref", "--no-progress", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    cmd = [sys.executable, "-m", "qatkit", "run", "cv.yaml", "--out", "cut", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mark = tmp_path / "cut" / "folds" / "group-s2" / "checkpoints" / "w8_qat"
    deadline = time.time() + 300
    while not (mark.is_dir() and any(mark.glob("step-*.safetensors"))) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "folds" / "group-s2" / "report.json").exists()  # cut inside fold 2's QAT
    done = json.loads((tmp_path / "cut" / "folds.json").read_text())["done"]
    assert done == ["group-s1"]
    before = (tmp_path / "cut" / "folds" / "group-s1" / "report.json").stat().st_mtime_ns
    r = qatkit_cli("run", "cv.yaml", "--out", "cut", "--no-progress", "--resume", "auto", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cut" / "folds" / "group-s1" / "report.json").stat().st_mtime_ns == before  # not rerun
    a = json.loads((tmp_path / "ref" / "report.json").read_text())
    b = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert a["per_fold"] == b["per_fold"] and a["criteria"] == b["criteria"]
    ra, rb = final_tensors(tmp_path / "ref"), final_tensors(tmp_path / "cut")
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


@pytest.mark.slow
def test_parallel_folds_give_the_sequential_numbers(tmp_path):
    write_recipe(tmp_path, variants=[{**RECIPE["variants"][0], "qat": {"epochs": 1, "lr": 0.001}}])
    assert qatkit_cli("run", "cv.yaml", "--out", "seq", "--no-progress", cwd=tmp_path).returncode == 0
    write_recipe(tmp_path, variants=[{**RECIPE["variants"][0], "qat": {"epochs": 1, "lr": 0.001}}],
                 cv={"by": "group", "workers": 2})  # fmt: skip
    r = qatkit_cli("run", "cv.yaml", "--out", "par", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "seq" / "report.json").read_text())
    b = json.loads((tmp_path / "par" / "report.json").read_text())
    assert a["per_fold"] == b["per_fold"]
    assert all(math.isclose(a["aggregate"][k]["metrics"]["accuracy"]["mean"], b["aggregate"][k]["metrics"]["accuracy"]
                            ["mean"]) for k in a["aggregate"])  # fmt: skip
    ra, rb = final_tensors(tmp_path / "seq"), final_tensors(tmp_path / "par")
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_criteria_of_a_single_run_are_judged_and_a_miss_exits_1(tmp_path):
    single = {k: v for k, v in RECIPE.items() if k != "cv"}
    make_npz(tmp_path / "d.npz")
    crit = {"max_qat_drop": 100, "max_size_ratio": 0.01, "precisions": ["int8"]}
    (tmp_path / "cv.yaml").write_text(yaml.safe_dump({**single, "criteria": crit}))
    r = qatkit_cli("run", "cv.yaml", "--out", "one", "--no-progress", cwd=tmp_path)
    assert r.returncode == 1 and "2 criteria missed: max_size_ratio w8 ptq onnx int8 vs onnx fp32" in r.stderr
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    rows = {(x["variant"], x["stage"], x["format"]): x for x in report["rows"]}
    size = [v for v in report["criteria"] if v["criterion"] == "max_size_ratio" and "qat" in v["where"]][0]
    assert size["value"] == pytest.approx(
        rows["w8", "qat", "onnx"]["size_bytes"] / rows["fp32", "fp32", "onnx"]["size_bytes"]
    )
    assert [v["passed"] for v in report["criteria"] if v["criterion"] == "max_qat_drop"] == [True]
    assert "| MISSED |" in (tmp_path / "one" / "report.md").read_text()
