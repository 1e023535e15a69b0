"""The recipe's data: bundled real data sets that work offline (``data.name``), the user's file (``data.path``)
or the user's loader (``data.target``), all as :class:`DataSplits`.

BasicMotions (smartwatch accelerometer + gyroscope, 4 activities) ships in ``basic_motions.npz``; its source
and licence are in ``DATA_SOURCES.md`` beside this file. digits and breast_cancer come from scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from qatkit.components.imports import call_target
from qatkit.components.splits import DataError, DataSplits, class_counts, describe, targets_of


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple:
    """Stratified split; ``fraction`` of the rows go to the second part."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)


def _finish(xtr, ytr, xte, yte, names, val_fraction, seed, info) -> DataSplits:
    val = None
    if val_fraction > 0:
        xtr, xva, ytr, yva = _split(xtr, ytr, val_fraction, seed)
        val = _tensors(xva, yva)
    info = dict(info, train=len(ytr), val=0 if val is None else len(val), test=len(yte))
    return DataSplits(_tensors(xtr, ytr), val, _tensors(xte, yte), len(names), list(names), tuple(xtr.shape[1:]), info)


def load_digits(val_fraction: float = 0.15, seed: int = 0) -> DataSplits:
    """sklearn's 8x8 digits as (1, 8, 8) images scaled to [0, 1]; 1200 train / 597 test (stratified, seed 0)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = _split(x, d.target, 597, 0)
    return _finish(xtr, ytr, xte, yte, [str(i) for i in range(10)], val_fraction, seed, {"source": "sklearn digits"})


def load_basic_motions(val_fraction: float = 0.15, seed: int = 0) -> DataSplits:
    """BasicMotions (UEA archive): 6 channels x 100 steps, standardised per channel with train statistics."""
    with resources.files(__package__).joinpath("data", "basic_motions.npz").open("rb") as f:
        d = np.load(f, allow_pickle=False)
        xtr, ytr, xte, yte = d["X_train"], d["y_train"], d["X_test"], d["y_test"]
        names = [str(n) for n in d["class_names"]]
    mean = xtr.mean(axis=(0, 2), keepdims=True)
    std = xtr.std(axis=(0, 2), keepdims=True) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return _finish(xtr, ytr, xte, yte, names, val_fraction, seed, {"source": "UEA BasicMotions (bundled)"})


def load_breast_cancer(val_fraction: float = 0.15, seed: int = 0) -> DataSplits:
    """sklearn's breast-cancer table (binary), standardised; 30% held out for test (stratified, seed 0)."""
    from sklearn.datasets import load_breast_cancer as sk_bc

    d = sk_bc()
    xtr, xte, ytr, yte = _split(d.data.astype(np.float32), d.target, 0.3, 0)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    names = [str(n) for n in d.target_names]
    return _finish((xtr - mean) / std, ytr, (xte - mean) / std, yte, names, val_fraction, seed, {"source": "sklearn"})


DATASETS: dict[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "basic_motions": load_basic_motions,
    "breast_cancer": load_breast_cancer,
}


def load_dataset(name: str, val_fraction: float = 0.15, seed: int = 0) -> DataSplits:
    """Load a registered data set by name."""
    return DATASETS[name](val_fraction=val_fraction, seed=seed)


def load_data(cfg, task: str, seed: int = 0, base_dir: Path | None = None) -> DataSplits:
    """The data a recipe's ``data`` section (a ``DataConfig``) names, for ``task``; ``info`` says what was loaded."""
    if cfg.name is not None:
        data = load_dataset(cfg.name, cfg.val_fraction, seed)
    elif cfg.path is not None:
        from qatkit.components.datafiles import load_file

        path = Path(cfg.path).expanduser()
        path = path if path.is_absolute() or base_dir is None else base_dir / path
        data = load_file(path, task=task, label=cfg.label, features=cfg.features, groups=cfg.groups,
                         val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed)  # fmt: skip
    else:
        data = _from_target(cfg, task, base_dir)
    data.info = {**describe(data.train), **data.info}
    data.info.setdefault("train", len(data.train))
    data.info.setdefault("val", 0 if data.val is None else len(data.val))
    data.info.setdefault("test", len(data.test))
    return data


def _from_target(cfg, task: str, base_dir: Path | None) -> DataSplits:
    """The user's loader: returns (train, test), (train, val, test), a {"train", "val", "test"} dict, or DataSplits."""
    out = call_target(cfg.target, cfg.args, base_dir, "data.target")
    return from_datasets(out, task, cfg.val_fraction, f"data.target {cfg.target!r}", cfg.target)


def from_datasets(out, task: str, val_fraction: float, where: str, source: str = "Python data") -> DataSplits:
    """DataSplits from a loader's result: (train, test), (train, val, test), a {"train", "val", "test"} dict, or
    DataSplits; a validation set is split off train when none is given."""
    if isinstance(out, DataSplits):
        return out
    if isinstance(out, dict):
        parts = (out.get("train"), out.get("val"), out.get("test"))
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        parts = (out[0], None, out[1]) if len(out) == 2 else tuple(out)
    else:
        raise DataError(f"{where} returned {type(out).__name__}; expected (train, test), (train, val, test) or a dict "
                        "with train/val/test data sets")  # fmt: skip
    train, val, test = parts
    for name, ds in (("train", train), ("test", test)):
        if not isinstance(ds, Dataset) or len(ds) == 0:
            raise DataError(f"{where}: the {name} set is missing or empty")
    if val is None and val_fraction > 0:
        train, val = _split_off(train, val_fraction, task)
    targets = targets_of(train)
    names: list[str] = []
    if task != "regression":
        if targets.is_floating_point() and not bool((targets == targets.round()).all()):
            raise DataError(f"{where}: targets must be integer class ids for task {task!r}")
        n = int(targets.max()) + 1 if task == "classification" else 2
        names = [str(i) for i in range(n)]
    info = {"source": source, "split": "from loader" if parts[1] is not None or val is None else "random"}
    if names:
        info["class_counts"] = {"train": class_counts(targets, names), "test": class_counts(targets_of(test), names)}
    first = train[0][0]
    shape = tuple((first if isinstance(first, torch.Tensor) else next(iter(_values(first)))).shape)
    return DataSplits(train, val, test, len(names), names, shape, info)


def _values(inputs):
    return inputs.values() if isinstance(inputs, dict) else inputs


def _split_off(ds: Dataset, fraction: float, task: str) -> tuple[Dataset, Dataset]:
    """A validation set split off a training set (stratified for classes), as index subsets."""
    from sklearn.model_selection import train_test_split
    from torch.utils.data import Subset

    targets = targets_of(ds).numpy()
    stratify = targets if task != "regression" and targets.ndim == 1 else None
    tr, va = train_test_split(np.arange(len(ds)), test_size=fraction, stratify=stratify, random_state=0)
    return Subset(ds, tr.tolist()), Subset(ds, va.tolist())
