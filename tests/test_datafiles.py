"""load_file: a user's .npz / .csv / .parquet read into splits, and one-line errors for bad files."""

import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from qatkit.components.datafiles import load_file
from qatkit.components.splits import ArrayDataset, DataError

RNG = np.random.default_rng(0)


def npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def xy(n=40, classes=4, f=3):
    return RNG.normal(size=(n, f)), np.arange(n) % classes


def test_npz_x_positional(tmp_path):
    x, y = xy()
    d = load_file(npz(tmp_path, x=x, y=y), task="classification")
    assert isinstance(d.train, ArrayDataset) and not d.train.spec.keyword
    inputs, target = d.train[0]
    assert isinstance(inputs, torch.Tensor) and inputs.dtype == torch.float32 and inputs.shape == (3,)
    assert target.dtype == torch.int64
    assert (d.num_classes, d.class_names, d.input_shape) == (4, ["0", "1", "2", "3"], (3,))
    i = d.info
    assert i["source"].endswith("d.npz") and i["inputs"] == {"input": "(3,) float32"} and i["keyword"] is False
    assert i["split"] == "stratified random" and i["train"] + i["val"] + i["test"] == 40 and i["test"] == 8
    assert set(i["class_counts"]) == {"train", "val", "test"} and "groups" not in i
    assert sum(i["class_counts"]["test"].values()) == 8


def test_npz_keyword_inputs(tmp_path):
    n = 30
    ids, feat = RNG.integers(0, 50, size=(n, 5)).astype(np.int32), RNG.normal(size=(n, 2))
    d = load_file(npz(tmp_path, x_ids=ids, x_feat=feat, y=np.arange(n) % 2), task="binary", val_fraction=0)
    inputs, _ = d.train[0]
    assert isinstance(inputs, dict) and list(inputs) == ["ids", "feat"]
    assert inputs["ids"].dtype == torch.int64 and inputs["feat"].dtype == torch.float32
    assert d.info["keyword"] is True and d.info["inputs"] == {"ids": "(5,) int64", "feat": "(2,) float32"}
    assert d.input_shape == (5,) and d.val is None and d.info["val"] == 0


def test_ready_made_splits(tmp_path):
    x, y = xy(30, 3)
    p = npz(tmp_path, x_train=x[:20], y_train=y[:20], x_val=x[20:24], y_val=y[20:24], x_test=x[24:], y_test=y[24:])
    d = load_file(p, task="classification")
    assert (d.info["split"], d.info["train"], d.info["val"], d.info["test"]) == ("from file", 20, 4, 6)
    assert torch.equal(d.test.inputs["input"], torch.as_tensor(x[24:], dtype=torch.float32))
    # no val in the file: split off train, and recorded
    d = load_file(
        npz(tmp_path, "b.npz", x_train=x[:20], y_train=y[:20], x_test=x[24:], y_test=y[24:]), task="classification"
    )
    assert d.info["val_split"] == "stratified random" and d.info["train"] + d.info["val"] == 20
    d = load_file(tmp_path / "b.npz", task="classification", val_fraction=0)
    assert d.val is None and d.info["train"] == 20


def test_ready_made_keyword_with_groups(tmp_path):
    a, b = RNG.normal(size=(12, 2)), RNG.integers(0, 9, size=(12, 4))
    y, g = np.arange(12) % 2, np.arange(12) // 2
    p = npz(tmp_path, x_a_train=a[:8], x_b_train=b[:8], y_train=y[:8], groups_train=g[:8],
            x_a_test=a[8:], x_b_test=b[8:], y_test=y[8:], groups_test=g[8:])  # fmt: skip
    d = load_file(p, task="regression", val_fraction=0)
    inputs, target = d.test[0]
    assert list(inputs) == ["a", "b"] and target.dtype == torch.float32
    assert d.info["groups"] == {"train": ["0", "1", "2", "3"], "val": [], "test": ["4", "5"]}


def test_split_array_and_column(tmp_path):
    x, y = xy(20, 2)
    split = np.array(["train"] * 12 + ["val"] * 3 + ["test"] * 5)
    d = load_file(npz(tmp_path, x=x, y=y, split=split), task="classification")
    assert (d.info["split"], d.info["train"], d.info["val"], d.info["test"]) == ("from file", 12, 3, 5)
    df = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y, "split": split})
    df.to_csv(tmp_path / "t.csv", index=False)
    d = load_file(tmp_path / "t.csv", task="classification", label="y")
    assert (d.info["train"], d.info["val"], d.info["test"]) == (12, 3, 5) and d.info["inputs"][
        "input"
    ] == "(2,) float32"


def test_groups_never_shared(tmp_path):
    x, y = xy(60, 2)
    groups = np.array([f"subject{i // 4}" for i in range(60)])  # 15 groups of 4 rows
    d = load_file(npz(tmp_path, x=x, y=y, groups=groups), task="classification", seed=3)
    g = d.info["groups"]
    assert d.info["split"] == "by group" and all(g[s] for s in g)
    assert (
        not set(g["train"]) & set(g["val"])
        and not set(g["train"]) & set(g["test"])
        and not set(g["val"]) & set(g["test"])
    )
    assert len(g["test"]) == 3 and len(g["train"]) + len(g["val"]) + len(g["test"]) == 15


def test_csv_label_features_groups(tmp_path):
    df = pd.DataFrame({"f1": np.arange(24.0), "f2": np.arange(24) % 5, "note": ["x"] * 24,
                       "who": np.arange(24) // 3, "kind": np.where(np.arange(24) % 2, "dog", "cat")})  # fmt: skip
    df.to_csv(tmp_path / "t.csv", index=False)
    d = load_file(tmp_path / "t.csv", task="classification", label="kind", features=["f1", "f2"], groups="who")
    assert d.class_names == ["cat", "dog"] and d.input_shape == (2,) and d.info["split"] == "by group"
    assert d.train.inputs["input"].dtype == torch.float32
    with pytest.raises(DataError, match=r"t\.csv: feature columns \['note'\] are not numeric"):
        load_file(tmp_path / "t.csv", task="classification", label="kind", groups="who")
    with pytest.raises(DataError, match=r"t\.csv: name the target column with label; columns: \['f1', 'f2'"):
        load_file(tmp_path / "t.csv", task="classification")
    with pytest.raises(DataError, match=r"t\.csv: no column 'y'; columns: \['f1'"):
        load_file(tmp_path / "t.csv", task="classification", label="y")


def test_parquet(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    df = pd.DataFrame(
        {"a": RNG.normal(size=30), "b": RNG.normal(size=30), "g": np.arange(30) % 6, "t": RNG.normal(size=30)}
    )
    df.to_parquet(tmp_path / "t.parquet")
    d = load_file(tmp_path / "t.parquet", task="regression", label="t", features=["b"], groups="g", val_fraction=0)
    assert d.input_shape == (1,) and d.num_classes == 0 and "class_counts" not in d.info
    got = torch.cat([d.train.inputs["input"], d.test.inputs["input"]])[:, 0].sort().values
    assert torch.equal(got, torch.as_tensor(np.sort(df.b.to_numpy()), dtype=torch.float32))
    assert d.info["split"] == "by group" and len(d.info["groups"]["test"]) == 2
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_file(tmp_path / "t.parquet", task="regression", label="t")


def test_class_mapping(tmp_path):
    x, _ = xy(30)
    y = np.array(["b", "a", "c"] * 10)
    d = load_file(npz(tmp_path, x=x, y=y), task="classification")
    assert d.class_names == ["a", "b", "c"]
    full = torch.cat([d.train.targets, d.val.targets, d.test.targets])
    assert sorted(full.tolist()) == sorted([1, 0, 2] * 10)
    d = load_file(npz(tmp_path, "n.npz", x=x, y=np.array([2, 5, 9] * 10)), task="classification")
    assert d.class_names == ["2", "5", "9"] and d.num_classes == 3 and d.train.targets.max() == 2


def test_binary_string_labels(tmp_path):
    x, _ = xy(20)
    d = load_file(npz(tmp_path, x=x, y=np.array(["yes", "no"] * 10)), task="binary", val_fraction=0)
    assert d.class_names == ["no", "yes"] and d.num_classes == 2
    t = torch.cat([d.train.targets, d.test.targets])
    assert t.dtype == torch.int64 and set(t.tolist()) == {0, 1}


@pytest.mark.parametrize("shape", [(30,), (30, 2)])
def test_regression(tmp_path, shape):
    x, _ = xy(30)
    d = load_file(npz(tmp_path, x=x, y=RNG.normal(size=shape)), task="regression")
    assert d.train.targets.dtype == torch.float32 and d.train.targets.shape[1:] == shape[1:]
    assert d.num_classes == 0 and d.class_names == [] and d.info["split"] == "random"


def test_stratified_proportions(tmp_path):
    x, _ = xy(100)
    y = np.array([0] * 80 + [1] * 20)
    d = load_file(npz(tmp_path, x=x, y=y), task="binary", val_fraction=0.25)
    assert d.info["class_counts"]["test"] == {"0": 16, "1": 4}
    assert d.info["class_counts"]["val"] == {"0": 16, "1": 4} and d.info["class_counts"]["train"] == {"0": 48, "1": 12}


def test_deterministic_for_seed(tmp_path):
    x, y = xy(50, 2)
    p = npz(tmp_path, x=x, y=y)
    a, b, c = (load_file(p, task="classification", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.train.inputs["input"], b.train.inputs["input"])
    assert not torch.equal(a.train.inputs["input"], c.train.inputs["input"])


def _errors(tmp_path):
    x, y = xy(20, 2)
    nan = x.copy()
    nan[[1, 4], 0] = np.nan
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=x, y=np.array([1, "a"] * 10, dtype=object))
    (tmp_path / "d.txt").write_text("1,2")
    pd.DataFrame({"a": np.r_[np.nan, x[1:, 0]], "y": y}).to_csv(tmp_path / "nan.csv", index=False)
    split = np.array(["train"] * 15 + ["test"] * 5)
    return [
        (tmp_path / "none.npz", {}, r"none\.npz: file not found"),
        (tmp_path / "d.txt", {}, r"d\.txt: unsupported file type '\.txt'; use \.npz, \.csv, \.parquet"),
        (npz(tmp_path, "a.npz", x=x), {}, r"a\.npz: no 'y' \(targets\); keys found: \['x'\]"),
        (npz(tmp_path, "b.npz", y=y), {}, r"b\.npz: no 'x' or 'x_<name>' \(inputs\); keys found: \['y'\]"),
        (npz(tmp_path, "c.npz", x=x, y=y[:-1]), {}, r"c\.npz: arrays differ in length: x 20, y 19"),
        (npz(tmp_path, "e.npz", x=nan, y=y), {}, r"e\.npz: NaN or inf in x \(2 rows\)"),
        (npz(tmp_path, "big.npz", x=np.full((20, 3), 1e300), y=y), {}, r"big\.npz: values beyond the float32 range in x \(20 rows\)"),
        (npz(tmp_path, "tiny.npz", x=x[:10], y=np.arange(10) % 5), {}, r"tiny\.npz: class(es)? '\d'.* no rows in the train split"),
        (npz(tmp_path, "f.npz", x=x, y=np.r_[np.inf, y[1:]]), {"task": "regression"}, r"f\.npz: NaN or inf in y \(1 rows\)"),
        (tmp_path / "nan.csv", {"label": "y"}, r"nan\.csv: NaN or inf in feature columns \['a'\] \(1 rows\)"),
        (npz(tmp_path, "g.npz", x=x, y=y + 0.5), {}, r"g\.npz: labels must be integers or strings; for continuous"),
        (npz(tmp_path, "h.npz", x=x, y=np.arange(20) % 3), {"task": "binary"}, r"h\.npz: binary task needs exactly 2 distinct labels; found 3"),
        (npz(tmp_path, "i.npz", x_train=x[:10], y_train=y[:10] * 0, x_test=x[10:], y_test=y[10:]), {}, r"i\.npz: class '1' has no rows in the train split"),
        (npz(tmp_path, "j.npz", x=x, y=y, split=np.array(["train", "dev"] * 10)), {}, r"j\.npz: unknown split values \['dev'\]"),
        (npz(tmp_path, "k.npz", x=x, y=y, groups=np.arange(19)), {}, r"k\.npz: arrays differ in length: x 20, y 20, groups 19"),
        (npz(tmp_path, "l.npz", x=x, y=y, split=np.array(["train"] * 20)), {}, r"l\.npz: the test split is empty"),
        (npz(tmp_path, "m.npz", x=x, y=y, groups=np.ones(20)), {}, r"m\.npz: only 1 group\(s\) left; too few to split off a test"),
        (obj, {}, r"obj\.npz: array 'y' holds Python objects"),
        (npz(tmp_path, "n.npz", x=x, y=y, x_test=x), {}, r"n\.npz: mixed layout: keys \['x', 'y', 'x_test'\]; expected"),
        (npz(tmp_path, "o.npz", x=x, x_a=x, y=y), {}, r"o\.npz: ambiguous inputs: both 'x' and \['x_a'\]"),
        (npz(tmp_path, "p.npz", x=x, y=y, labels=y), {}, r"p\.npz: unexpected keys \['labels'\]; keys found"),
        (npz(tmp_path, "q.npz", x=x, y=y, split=split), {"label": "y"}, r"q\.npz: label/features/groups name table columns"),
        (npz(tmp_path, "r.npz", x_train=x, y_train=y, x_test=x[:3]), {}, r"r\.npz: no 'y_test'"),
        (npz(tmp_path, "s.npz", x_train=x, y_train=y, x_test=x[:3, :2], y_test=y[:3]), {}, r"s\.npz: the splits' rows differ in shape"),
    ]  # fmt: skip


def test_errors(tmp_path):
    for path, kwargs, match in _errors(tmp_path):
        kwargs = {"task": "classification", **kwargs}
        with pytest.raises(DataError, match=match) as e:
            load_file(path, **kwargs)
        assert "\n" not in str(e.value) and str(path) in str(e.value), str(e.value)


def test_ready_made_val_needs_x_val(tmp_path):
    x, y = xy(20, 2)
    p = npz(tmp_path, x_train=x, y_train=y, x_test=x, y_test=y, y_val=y[:2])
    with pytest.raises(DataError, match=re.escape("split 'val' has keys ['y_val']; expected ['x_val', 'y_val']")):
        load_file(p, task="classification")


def test_class_names_name_integer_ids_and_out_of_range_labels_are_refused(tmp_path):
    path = tmp_path / "named.npz"
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = np.arange(40) % 3
    np.savez(path, x=x, y=y, class_names=np.array(["walk", "sit", "fall"]))
    data = load_file(path, task="classification", seed=0)
    assert data.class_names == ["walk", "sit", "fall"] and data.num_classes == 3
    np.savez(path, x=x, y=np.where(y == 2, 5, y), class_names=np.array(["walk", "sit", "fall"]))
    with pytest.raises(DataError, match=r"named.npz: labels out of range: class_names names ids 0..2; found \[5"):
        load_file(path, task="classification")
