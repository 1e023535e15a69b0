"""A user's own data file (``data: {path: FILE}`` in a recipe) read into train / validation / test splits.

``.npz`` holds named arrays: ``x`` (one positional input) or ``x_<name>`` (keyword inputs), ``y``, optional
``groups`` and ``split``; or ready-made splits (``x_train``/``y_train``, ``x_val``/``y_val``, ``x_test``/``y_test``).
``.csv`` and ``.parquet`` tables name a ``label`` column; the other numeric columns are one (N, F) input.
Every problem is a one-line :class:`DataError` naming the file, so a bad file fails before any training.
"""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qatkit.components.splits import ArrayDataset, DataError, DataSplits, class_counts, describe

TASKS = ("classification", "binary", "regression")
SUFFIXES = (".npz", ".csv", ".parquet")
SPLITS = ("train", "val", "test")
_READY = re.compile(r"(x(?:_\w+?)?|y|groups)_(train|val|test)")
_FLAT_EXPECTED = "x or x_<name>..., y, optional groups, split, class_names"
_READY_EXPECTED = "x_train/y_train, x_test/y_test (or x_<name>_train ...), optional x_val/y_val, groups_<split>"


@dataclass
class _Raw:
    """Arrays as read from the file, before dtype conversion and splitting."""

    inputs: dict[str, np.ndarray]
    keyword: bool
    y: np.ndarray
    groups: np.ndarray | None = None
    split: np.ndarray | None = None
    keys: dict[str, str] | None = None
    """What the file calls each input and ``y`` (for messages), when not the input's own name."""
    class_names: np.ndarray | None = None
    """Names of class ids 0..C-1 (``class_names`` in an .npz), when ``y`` holds ids."""

    def key(self, name: str) -> str:
        return (self.keys or {}).get(name, name)


def load_file(
    path: str | Path,
    *,
    task: str,
    label: str | None = None,
    features: list[str] | None = None,
    groups: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplits:
    """Read ``path`` (.npz / .csv / .parquet) into splits for ``task`` ("classification", "binary", "regression").

    ``label``, ``features`` and ``groups`` name table columns. Without a split in the file, ``test_fraction`` of the
    rows go to test and ``val_fraction`` of the rest to validation, by group when there are groups, else stratified
    by class (classification) or random (regression).
    """
    path = Path(path)
    if task not in TASKS:
        raise DataError(f"{path}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"{path}: val_fraction must be in [0, 1); got {val_fraction}")
    if not path.is_file():  # a FIFO would block the reader; a folder is not a data file
        raise DataError(f"{path}: {'file not found' if not path.exists() else 'not a regular file'}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use {', '.join(SUFFIXES)}")
    if suffix == ".npz":
        if label is not None or features is not None or groups is not None:
            raise DataError(f"{path}: label/features/groups name table columns; an .npz file uses keys y and groups")
        raw = _read_npz(path)
    else:
        raw = _read_table(path, suffix, label, features, groups)

    _check_lengths(path, {**{raw.key(n): v for n, v in raw.inputs.items()}, "y": raw.y, "groups": raw.groups})
    inputs = {n: _input_tensor(path, raw.key(n), v) for n, v in raw.inputs.items()}
    targets, names = _targets(path, raw.y, raw.key("y"), task, raw.class_names)
    classes = targets.numpy() if task != "regression" else None
    part, info = _assign(path, raw, classes, val_fraction, test_fraction, seed)

    full = ArrayDataset(inputs, targets, raw.keyword)
    sets = {s: full.subset(np.flatnonzero(part == i)) for i, s in enumerate(SPLITS)}
    if classes is not None:
        absent = [n for n, c in class_counts(sets["train"].targets, names).items() if c == 0]
        if absent:
            which = f"class {absent[0]!r} has" if len(absent) == 1 else f"classes {', '.join(map(repr, absent))} have"
            raise DataError(f"{path}: {which} no rows in the train split")
    val = sets["val"] if len(sets["val"]) else None
    shown = describe(sets["train"])
    info = {"source": str(path), "inputs": shown["inputs"], "keyword": shown["keyword"], **info}
    info.update({s: len(sets[s]) for s in SPLITS})
    if classes is not None:
        info["class_counts"] = {s: class_counts(sets[s].targets, names) if len(sets[s]) else {} for s in SPLITS}
    if raw.groups is not None:
        info["groups"] = {s: [str(g) for g in np.unique(raw.groups[part == i])] for i, s in enumerate(SPLITS)}
    first = next(iter(inputs.values()))
    groups = None if raw.groups is None else {s: raw.groups[part == i] for i, s in enumerate(SPLITS)}
    return DataSplits(sets["train"], val, sets["test"], len(names), names, tuple(first.shape[1:]), info, groups)


# --- reading ---------------------------------------------------------------------------------------------------


def _read_npz(path: Path) -> _Raw:
    """The arrays of an .npz file, in one of its two layouts (one set of rows, or ready-made splits)."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive (save it with numpy.savez)")
    with np.load(path, allow_pickle=False) as d:
        keys = list(d.files)
        arrays = {}
        for k in keys:
            try:
                arrays[k] = d[k]
            except ValueError:
                raise DataError(
                    f"{path}: array {k!r} holds Python objects, which are not loaded; save numbers or strings "
                    "(e.g. np.asarray(values, dtype=str))"
                ) from None
    for k, v in arrays.items():
        if v.ndim == 0:
            raise DataError(f"{path}: array {k!r} is a scalar; every array needs one row per example")
    ready = [k for k in keys if _READY.fullmatch(k)]
    if ready and len(ready) == len([k for k in keys if k != "class_names"]):
        return _ready_splits(path, arrays, ready)
    if ready:
        raise DataError(
            f"{path}: mixed layout: keys {keys}; expected either {_FLAT_EXPECTED} or ready-made splits {_READY_EXPECTED}"
        )
    return _flat(path, arrays, keys)


def _flat(path: Path, arrays: dict[str, np.ndarray], keys: list[str]) -> _Raw:
    """``x`` or ``x_<name>``..., ``y``, optional ``groups`` and ``split``."""
    unknown = [k for k in keys if k not in ("x", "y", "groups", "split", "class_names") and not k.startswith("x_")]
    named = [k for k in keys if k.startswith("x_")]
    if unknown:
        raise DataError(f"{path}: unexpected keys {unknown}; keys found: {keys}; expected {_FLAT_EXPECTED}")
    if "x" in keys and named:
        raise DataError(f"{path}: ambiguous inputs: both 'x' and {named}; use x alone or one x_<name> per input")
    if "y" not in keys:
        raise DataError(f"{path}: no 'y' (targets); keys found: {keys}; expected {_FLAT_EXPECTED}")
    if "x" in keys:
        inputs, keyword = {"input": arrays["x"]}, False
    elif named:
        inputs, keyword = {_input_name(path, k[2:]): arrays[k] for k in named}, True
    else:
        raise DataError(f"{path}: no 'x' or 'x_<name>' (inputs); keys found: {keys}")
    split = arrays.get("split")
    names = {n: ("x" if not keyword else f"x_{n}") for n in inputs}
    split = None if split is None else _strings(split)
    return _Raw(inputs, keyword, arrays["y"], arrays.get("groups"), split, names, _class_names(path, arrays))


def _ready_splits(path: Path, arrays: dict[str, np.ndarray], keys: list[str]) -> _Raw:
    """``x_<split>``/``x_<name>_<split>``, ``y_<split>``, optional ``groups_<split>``: rows concatenated, with a
    split label per row, so ready-made splits take the same checks as a ``split`` array."""
    present = [s for s in SPLITS if any(_READY.fullmatch(k).group(2) == s for k in keys)]
    for s in ("train", "test"):
        if f"y_{s}" not in keys:
            raise DataError(f"{path}: no 'y_{s}'; keys found: {keys}; expected {_READY_EXPECTED}")
    per_split = {s: [_READY.fullmatch(k).group(1) for k in keys if _READY.fullmatch(k).group(2) == s] for s in present}
    stems = [k for k in per_split["train"] if k.startswith("x")]
    if not stems or ("x" in stems and len(stems) > 1):
        raise DataError(f"{path}: the train split needs 'x_train' or 'x_<name>_train'; keys found: {keys}")
    for s in present:
        if sorted(per_split[s]) != sorted(per_split["train"]):
            want = [f"{k}_{s}" for k in per_split["train"]]
            raise DataError(f"{path}: split {s!r} has keys {[f'{k}_{s}' for k in per_split[s]]}; expected {want}")
        _check_lengths(path, {f"{k}_{s}": arrays[f"{k}_{s}"] for k in per_split[s]})
    cat = {}
    for k in per_split["train"]:
        parts = [arrays[f"{k}_{s}"] for s in present]
        if len({p.shape[1:] for p in parts}) > 1:
            shapes = ", ".join(f"{k}_{s} {p.shape}" for s, p in zip(present, parts, strict=True))
            raise DataError(f"{path}: the splits' rows differ in shape: {shapes}")
        try:
            cat[k] = np.concatenate(parts)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: cannot join {k}_train/_test: {e}") from None
    split = np.concatenate([np.full(len(arrays[f"y_{s}"]), s) for s in present])
    keyword = stems != ["x"]
    inputs = {"input": cat["x"]} if not keyword else {_input_name(path, k[2:]): cat[k] for k in stems}
    names = {n: f"{k}_{'/'.join(present)}" for n, k in zip(inputs, stems, strict=True)}
    names = {**names, "y": f"y_{'/'.join(present)}"}
    return _Raw(inputs, keyword, cat["y"], cat.get("groups"), split, names, _class_names(path, arrays))


def _input_name(path: Path, name: str) -> str:
    if not name.isidentifier():
        raise DataError(f"{path}: input name {name!r} (from 'x_{name}') is not a valid Python argument name")
    return name


def _read_table(path: Path, suffix: str, label: str | None, features: list[str] | None, groups: str | None) -> _Raw:
    """A .csv or .parquet table: ``label`` the target column, ``features`` (default: the rest) one (N, F) input."""
    import pandas as pd

    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as e:  # any parser failure means a bad file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read as {suffix}: {why}") from None
    cols = [str(c) for c in df.columns]
    df.columns = cols
    if label is None:
        raise DataError(f"{path}: name the target column with label; columns: {cols}")
    wanted = [label] + ([groups] if groups else []) + list(features or [])
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; columns: {cols}")
    if features is None:
        features = [c for c in cols if c not in (label, groups, "split")]
    if label in features or (groups and groups in features):
        raise DataError(f"{path}: the label or groups column is also listed in features: {features}")
    if not features:
        raise DataError(f"{path}: no feature columns besides {label!r}; columns: {cols}")
    text = [c for c in features if not pd.api.types.is_numeric_dtype(df[c])]
    if text:
        raise DataError(f"{path}: feature columns {text} are not numeric; encode them as numbers first")
    x = df[features].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        where = [c for c, b in zip(features, bad.any(0), strict=True) if b]
        raise DataError(f"{path}: NaN or inf in feature columns {where} ({int(bad.any(1).sum())} rows)")
    cells = {"groups": groups, "split": "split" if "split" in cols else None}
    for what, col in cells.items():
        if col and df[col].isna().any():
            raise DataError(f"{path}: column {col!r} ({what}) has {int(df[col].isna().sum())} empty rows")
    y = df[label]
    if y.isna().any():
        raise DataError(f"{path}: NaN in the label column {label!r} ({int(y.isna().sum())} rows)")
    y = y.to_numpy() if pd.api.types.is_numeric_dtype(y) else y.astype(str).to_numpy(dtype=str)
    g = None if not groups else df[groups].to_numpy()
    split = None if not cells["split"] else _strings(df["split"].to_numpy())
    g = g if g is None or g.dtype != object else g.astype(str)
    return _Raw({"input": x}, False, y, g, split, {"input": f"feature columns {features}", "y": f"column {label!r}"})


def _strings(values: np.ndarray) -> np.ndarray:
    return np.char.lower(np.char.strip(np.asarray(values).astype(str)))


# --- arrays ----------------------------------------------------------------------------------------------------


def _check_lengths(path: Path, arrays: dict[str, np.ndarray | None]) -> None:
    lengths = {k: len(v) for k, v in arrays.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: arrays differ in length: {', '.join(f'{k} {n}' for k, n in lengths.items())}")
    if not next(iter(lengths.values())):
        raise DataError(f"{path}: no rows")


def _float32(path: Path, name: str, a: np.ndarray) -> np.ndarray:
    """``a`` as float32, refusing NaN, inf and values too large for float32 (counted in rows)."""
    for problem, b in (("NaN or inf", a), ("values beyond the float32 range", None)):
        if b is None:
            with np.errstate(over="ignore"):
                a = b = a.astype(np.float32)
        bad = ~np.isfinite(b.reshape(len(b), -1)).all(1)
        if bad.any():
            raise DataError(f"{path}: {problem} in {name} ({int(bad.sum())} rows)")
    return a


def _input_tensor(path: Path, name: str, a: np.ndarray) -> torch.Tensor:
    """Float inputs as float32; integer and bool inputs (token ids, masks) as int64."""
    if a.dtype.kind == "f":
        return torch.from_numpy(_float32(path, name, a))
    if a.dtype.kind in "iub":
        return torch.from_numpy(a.astype(np.int64))
    raise DataError(f"{path}: input {name!r} has dtype {a.dtype}; inputs must be numbers")


def _class_names(path: Path, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    names = arrays.get("class_names")
    if names is not None and (names.ndim != 1 or names.dtype.kind not in "US" or len(set(names.tolist())) < len(names)):
        raise DataError(
            f"{path}: class_names must be distinct strings, one per class id; got {names.dtype} {names.shape}"
        )
    return names


def _targets(
    path: Path, y: np.ndarray, name: str, task: str, class_names: np.ndarray | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Class ids (int64) and class names, or float32 regression targets and no names."""
    if task == "regression":
        if y.dtype.kind not in "fiub" or y.ndim > 2:
            raise DataError(
                f"{path}: regression targets must be numbers of shape (N,) or (N, k); got {y.dtype} {y.shape}"
            )
        return torch.from_numpy(_float32(path, name, y.astype(np.float64))), []
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: class labels must be one per row (shape (N,)); got {y.shape}")
    if y.dtype.kind == "f":
        _float32(path, name, y)
        if (y != np.round(y)).any():
            raise DataError(f"{path}: labels must be integers or strings; for continuous targets use task: regression")
        y = y.astype(np.int64)
    elif y.dtype.kind == "S":
        y = y.astype(str)
    elif y.dtype.kind not in "iubU":
        raise DataError(f"{path}: labels have dtype {y.dtype}; labels must be integers or strings")
    if class_names is not None:
        n = len(class_names)
        if y.dtype.kind not in "iub" or y.min() < 0 or y.max() >= n:
            bad = y if y.dtype.kind not in "iub" else y[(y < 0) | (y >= n)]
            raise DataError(f"{path}: labels out of range: class_names names ids 0..{n - 1}; found {bad[:5].tolist()}")
        if task == "binary" and n != 2:
            raise DataError(f"{path}: binary task needs exactly 2 class_names; found {n}")
        return torch.from_numpy(y.astype(np.int64).reshape(-1)), [str(v) for v in class_names.astype(str)]
    values, ids = np.unique(y, return_inverse=True)
    if task == "binary" and len(values) != 2:
        shown = [str(v) for v in values[:10]]
        raise DataError(f"{path}: binary task needs exactly 2 distinct labels; found {len(values)}: {shown}")
    if len(values) < 2:
        raise DataError(f"{path}: only one class ({values[0]!s}) in y; classification needs at least 2")
    if y.dtype.kind in "iub" and values[0] == 0 and values[-1] == len(values) - 1:
        ids = y  # already ids 0..C-1
    return torch.from_numpy(np.array(ids, dtype=np.int64).reshape(-1)), [str(v) for v in values]


# --- splitting -------------------------------------------------------------------------------------------------


def _assign(path: Path, raw: _Raw, classes, val_fraction: float, test_fraction: float, seed: int):
    """Each row's split (0 train, 1 val, 2 test) and how it was made, for ``info``."""
    n = len(raw.y)
    if raw.split is not None:
        unknown = sorted(set(raw.split.tolist()) - set(SPLITS))
        if unknown:
            raise DataError(f"{path}: unknown split values {unknown[:10]}; expected {', '.join(SPLITS)}")
        part = np.select([raw.split == "val", raw.split == "test"], [1, 2], 0)
        info = {"split": "from file"}
    else:
        if not 0 < test_fraction < 1:
            raise DataError(f"{path}: the file has no split, so test_fraction must be in (0, 1); got {test_fraction}")
        part = np.zeros(n, dtype=np.int64)
        test, how = _carve(path, np.arange(n), classes, raw.groups, test_fraction, seed, "test")
        part[test] = 2
        info = {"split": how}
    for i, s in ((0, "train"), (2, "test")):
        if not (part == i).any():
            raise DataError(f"{path}: the {s} split is empty")
    if val_fraction > 0 and not (part == 1).any():
        val, how = _carve(path, np.flatnonzero(part == 0), classes, raw.groups, val_fraction, seed, "val")
        part[val] = 1
        if raw.split is not None:
            info["val_split"] = how  # the file had no val rows: split off its train rows
    return part, info


def _carve(path: Path, idx: np.ndarray, classes, groups, fraction: float, seed: int, what: str):
    """Rows of ``idx`` taken for a ``what`` split of ``fraction``: whole groups when there are groups, else
    stratified by class where each class has enough rows, else random."""
    if groups is not None:
        ids = np.unique(groups[idx])
        take = math.ceil(fraction * len(ids))
        if take >= len(ids):
            raise DataError(f"{path}: only {len(ids)} group(s) left; too few to split off a {what} split by group")
        chosen = ids[np.random.default_rng(seed).permutation(len(ids))[:take]]
        return idx[np.isin(groups[idx], chosen)], "by group"
    from sklearn.model_selection import train_test_split

    if classes is not None:
        try:
            taken = train_test_split(idx, test_size=fraction, stratify=classes[idx], random_state=seed)[1]
            return taken, "stratified random"
        except ValueError:
            pass  # a class with one row, or fewer rows to take than classes: fall back to random
    try:
        return train_test_split(idx, test_size=fraction, random_state=seed)[1], "random"
    except ValueError:
        raise DataError(f"{path}: too few rows ({len(idx)}) to split off a {what} split of {fraction}") from None
