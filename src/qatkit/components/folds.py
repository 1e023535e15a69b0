"""Cross-validation folds of a data set: leave-one-group-out or stratified k-fold, each as a :class:`DataSplits`.

All rows (the data's train, validation and test splits together) form the pool. Each fold holds one part of the
pool out as its test set; validation is taken from the rest (a stratified fraction, or one other group), and
training uses what remains. Folds depend only on the data, the scheme and the seed, so every process that makes
them (parallel fold workers, a resumed run) gets the same ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from qatkit.base.config import NAME_PATTERN
from qatkit.components.splits import ArrayDataset, DataError, DataSplits, class_counts, targets_of


@dataclass
class Fold:
    """One fold: its name (a folder name under ``OUT/folds/``), what it holds out, and its splits."""

    name: str
    held_out: str
    data: DataSplits


def make_folds(data: DataSplits, cv, val_fraction: float, task: str, seed: int) -> list[Fold]:
    """The folds ``cv`` (a ``CVConfig``) describes over all rows of ``data``, in order (``cv.folds``: a subset)."""
    pool, targets, groups = _pool(data)
    classes = targets.numpy() if task != "regression" and targets.dim() == 1 else None
    if cv.by == "group":
        if groups is None:
            raise DataError("cv: by: group needs data with groups (an .npz `groups` array, a table's `groups:` "
                            "column, or a loader returning DataSplits with groups)")  # fmt: skip
        ids = np.unique(groups)
        if len(ids) < 3:
            raise DataError(
                f"cv: by: group needs at least 3 groups (test, validation, training); the data has {len(ids)}"
            )
        tests = [(_fold_name(g, i), f"group {g}", np.flatnonzero(groups == g)) for i, g in enumerate(ids)]
    else:
        tests = [
            (f"fold{i}", f"part {i + 1} of {cv.k}", idx) for i, idx in enumerate(_kfold(targets, classes, cv.k, seed))
        ]
    names = [t[0] for t in tests]
    wanted = cv.folds or names
    unknown = [f for f in wanted if f not in names]
    if unknown:
        raise DataError(f"cv.folds: unknown fold(s) {', '.join(unknown)}; the folds are {', '.join(names)}")
    folds = []
    for name, held, test in tests:
        if name in wanted:
            rest = np.setdiff1d(np.arange(len(targets)), test)
            val = _validation(rest, classes, groups, cv.val, val_fraction, seed)
            train = np.setdiff1d(rest, val)
            folds.append(Fold(name, held, _splits(data, pool, targets, groups, train, val, test, name, held)))
    return folds


def _pool(data: DataSplits) -> tuple[Dataset, torch.Tensor, np.ndarray | None]:
    """Every row of the data as one data set (train, val, test in order), its targets and groups."""
    parts = [p for p in (data.train, data.val, data.test) if p is not None]
    if all(isinstance(p, ArrayDataset) for p in parts):
        names = parts[0].spec.names
        inputs = {n: torch.cat([p.inputs[n] for p in parts]) for n in names}
        pool: Dataset = ArrayDataset(inputs, torch.cat([p.targets for p in parts]), parts[0].spec.keyword)
    else:
        pool = ConcatDataset(parts)
    targets = torch.cat([torch.as_tensor(targets_of(p)) for p in parts])
    groups = None
    if data.groups is not None:
        groups = np.concatenate([data.groups[s] for s, p in (("train", data.train), ("val", data.val),
                                                              ("test", data.test)) if p is not None])  # fmt: skip
    return pool, targets, groups


def _fold_name(group, i: int) -> str:
    """A group value as a fold folder name (``group-<value>``), or its position when the value is not a name."""
    name = f"group-{group}"
    return name if re.fullmatch(NAME_PATTERN, name) else f"group{i}"


def _kfold(targets: torch.Tensor, classes, k: int, seed: int) -> list[np.ndarray]:
    """Test rows of each of ``k`` folds: stratified by class where every class has ``k`` rows, else plain."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(targets)
    if n < k:
        raise DataError(f"cv: k: {k} needs at least {k} rows; the data has {n}")
    if classes is not None and np.bincount(classes).min(initial=k) >= k:
        split = StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), classes)
    else:
        split = KFold(k, shuffle=True, random_state=seed).split(np.zeros(n))
    return [test for _, test in split]


def _validation(rest: np.ndarray, classes, groups, how: str, fraction: float, seed: int) -> np.ndarray:
    """Validation rows from a fold's training part: one other group (seeded), or a stratified fraction."""
    if how == "group":
        ids = np.unique(groups[rest])
        chosen = ids[np.random.default_rng(seed).integers(len(ids))]
        return rest[groups[rest] == chosen]
    if fraction <= 0:
        return rest[:0]
    from sklearn.model_selection import train_test_split

    try:
        strat = classes[rest] if classes is not None else None
        return np.sort(train_test_split(rest, test_size=fraction, stratify=strat, random_state=seed)[1])
    except ValueError:  # a class with one row: random instead
        return np.sort(train_test_split(rest, test_size=fraction, random_state=seed)[1])


def _splits(data, pool, targets, groups, train, val, test, name: str, held: str) -> DataSplits:
    """The fold's DataSplits (index subsets of the pool) with sizes, class counts and groups in ``info``."""
    sets = {s: _subset(pool, idx) for s, idx in (("train", train), ("val", val), ("test", test))}
    info = {**data.info, "split": f"fold {name}: {held} held out for test", "fold": name}
    info.update({s: len(idx) for s, idx in (("train", train), ("val", val), ("test", test))})
    if data.class_names:
        info["class_counts"] = {s: class_counts(targets[idx], data.class_names) for s, idx in
                                (("train", train), ("val", val), ("test", test))}  # fmt: skip
    fold_groups = None
    if groups is not None:
        fold_groups = {"train": groups[train], "val": groups[val], "test": groups[test]}
        info["groups"] = {s: [str(g) for g in np.unique(v)] for s, v in fold_groups.items()}
    val_set = sets["val"] if len(val) else None
    return DataSplits(sets["train"], val_set, sets["test"], data.num_classes, data.class_names, data.input_shape,
                      info, fold_groups)  # fmt: skip


def _subset(pool: Dataset, idx: np.ndarray) -> Dataset:
    return pool.subset(idx) if isinstance(pool, ArrayDataset) else Subset(pool, idx.tolist())
