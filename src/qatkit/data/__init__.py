"""Bundled real data sets that work offline, behind a name registry (``data.name`` in a recipe).

BasicMotions (smartwatch accelerometer + gyroscope, 4 activities) ships in ``basic_motions.npz``; its source
and licence are in ``DATA_SOURCES.md`` beside this file. digits and breast_cancer come from scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass
class DataSplits:
    """Train / validation / test tensors plus what a model builder needs to know."""

    train: TensorDataset
    val: TensorDataset | None
    test: TensorDataset
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]
    info: dict = field(default_factory=dict)


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
    with resources.files(__package__).joinpath("basic_motions.npz").open("rb") as f:
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
