"""Train / validation / test splits of a data set, whatever its source (bundled, a file, the user's loader).

Items are ``(inputs, target)`` with inputs of any structure (see ``base/batch.py``). ``DataSplits.info`` is
what the report's data section shows: where the data came from, the shape of each input, split sizes and
class counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qatkit.base.batch import Inputs, InputSpec, split_batch


class DataError(ValueError):
    """Data that cannot be used: the message names the file (or loader) and the problem."""


class ArrayDataset(Dataset):
    """Rows of named input tensors and targets. An item's inputs are a tensor (one positional input), a tuple
    (several positional inputs) or a dict (``keyword``: passed to ``forward`` by name)."""

    def __init__(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor, keyword: bool = False):
        n = {len(v) for v in inputs.values()} | {len(targets)}
        if len(n) != 1:
            raise DataError(f"inputs and targets have different lengths: {sorted(n)}")
        self.inputs, self.targets = inputs, targets
        self.spec = InputSpec(tuple(inputs), keyword)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.spec.structured({k: v[i] for k, v in self.inputs.items()}), self.targets[i]

    def subset(self, index) -> ArrayDataset:
        index = torch.as_tensor(index, dtype=torch.long)
        return ArrayDataset({k: v[index] for k, v in self.inputs.items()}, self.targets[index], self.spec.keyword)


@dataclass
class DataSplits:
    """Train / validation / test sets plus what model builders and tasks need to know."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    """Classes for classification and binary tasks (0 when the targets are continuous)."""
    class_names: list[str]
    input_shape: tuple[int, ...]
    """Shape of one example's first input (what bundled model builders take)."""
    info: dict = field(default_factory=dict)
    groups: dict[str, np.ndarray] | None = None
    """The group (subject, signer) of each row of ``train``, ``val`` and ``test``, in order, when the data has
    groups: what leave-one-group-out folds are made from."""


def targets_of(ds: Dataset) -> torch.Tensor:
    """All targets of a data set (read from ``ArrayDataset``/``TensorDataset`` directly, else by iterating)."""
    if isinstance(ds, ArrayDataset):
        return ds.targets
    tensors = getattr(ds, "tensors", None)
    if tensors is not None:
        return tensors[-1]
    return torch.cat([torch.as_tensor(split_batch(b)[1]) for b in _in_order(ds, 512)])


def all_inputs(ds: Dataset, batch_size: int = 512) -> tuple[InputSpec, dict[str, torch.Tensor]]:
    """Every input of a data set as named tensors (what exported files are run on), and the input spec."""
    if isinstance(ds, ArrayDataset):
        return ds.spec, ds.inputs
    spec, parts = None, []
    for batch in _in_order(ds, batch_size):
        inputs, _ = split_batch(batch)
        spec = spec or InputSpec.of(inputs)
        parts.append(spec.named(inputs))
    if spec is None:
        raise DataError("the test set is empty")
    return spec, {k: torch.cat([p[k] for p in parts]) for k in spec.names}


def first_inputs(ds: Dataset, n: int = 2) -> Inputs:
    """The inputs of the first ``n`` examples, batched as the model takes them (for checking a model early)."""
    batch = next(iter(_in_order(ds, n)), None)
    if batch is None:
        raise DataError("the test set is empty")
    return split_batch(batch)[0]


def _in_order(ds: Dataset, batch_size: int) -> DataLoader:
    """Batches in order, with a private generator: reading data must not move the global RNG (model init)."""
    return DataLoader(ds, batch_size=batch_size, generator=torch.Generator().manual_seed(0))


def describe(ds: Dataset) -> dict:
    """Shapes and dtypes of one example's inputs, for the report."""
    inputs, target = split_batch(ds[0])
    spec = InputSpec.of(inputs)
    out = {n: f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for n, t in spec.named(inputs).items()}
    return {"inputs": out, "keyword": spec.keyword, "target": str(torch.as_tensor(target).dtype).removeprefix("torch.")}


def class_counts(targets: torch.Tensor, names: list[str]) -> dict[str, int]:
    counts = np.bincount(targets.long().numpy().reshape(-1), minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts, strict=False)}
