"""Model inputs of any structure: one tensor, several positional tensors, or keyword tensors.

A data set item is ``(inputs, target)``; ``inputs`` is a Tensor (``model(x)``), a tuple (``model(*xs)``) or a
dict (``model(**xs)``). Exporters and runtimes see the same inputs as named arrays, in order (``InputSpec``):
ONNX graph inputs, LiteRT and Core ML signatures all carry one input per model input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Inputs = torch.Tensor | tuple | list | dict


def call(model: nn.Module, inputs: Inputs):
    """Run ``model`` on inputs of any structure."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensor(out) -> torch.Tensor:
    """The prediction tensor of a model's output: a tensor, the first of a tuple, ``.logits``, or a dict's
    ``"logits"`` (else its first value)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("logits", next(iter(out.values()), None)), torch.Tensor):
        return out.get("logits", next(iter(out.values())))
    raise TypeError(f"the model returned {type(out).__name__}; qatkit needs a tensor (or an object with .logits)")


def to_device(inputs: Inputs, device: str | torch.device) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(v.to(device, non_blocking=True) for v in inputs)
    return inputs.to(device, non_blocking=True)


def split_batch(batch) -> tuple[Inputs, torch.Tensor]:
    """``(inputs, target)`` of one batch; a batch is a pair, as data sets yield it."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            "a data set item must be a pair (inputs, target), where inputs is a tensor, a tuple of tensors or a "
            f"dict of tensors; got {type(batch).__name__}"
            + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
        )
    return batch[0], batch[1]


@dataclass(frozen=True)
class InputSpec:
    """Names and calling convention of a model's inputs (``keyword``: passed as ``model(**inputs)``)."""

    names: tuple[str, ...]
    keyword: bool = False

    @classmethod
    def of(cls, inputs: Inputs) -> InputSpec:
        """The spec of one example's (or batch's) inputs: "input" for a lone tensor, "input0".. for a tuple."""
        if isinstance(inputs, dict):
            return cls(tuple(inputs), True)
        if isinstance(inputs, (tuple, list)):
            return cls(tuple(f"input{i}" for i in range(len(inputs))), False)
        return cls(("input",), False)

    def named(self, inputs: Inputs) -> dict[str, torch.Tensor]:
        """Inputs as an ordered name -> tensor dict."""
        if isinstance(inputs, dict):
            return {n: inputs[n] for n in self.names}
        if isinstance(inputs, (tuple, list)):
            return dict(zip(self.names, inputs, strict=True))
        return {self.names[0]: inputs}

    def structured(self, named: dict) -> Inputs:
        """The inverse of :meth:`named`: what the model is called with."""
        if self.keyword:
            return {n: named[n] for n in self.names}
        values = tuple(named[n] for n in self.names)
        return values[0] if len(values) == 1 else values


class Positional(nn.Module):
    """``model`` called with its inputs as positional tensors in ``spec`` order (what exporters trace)."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self.train(model.training)

    def forward(self, *tensors: torch.Tensor):
        return call(self.model, self.spec.structured(dict(zip(self.spec.names, tensors, strict=True))))


def adapt(model: nn.Module, spec: InputSpec) -> nn.Module:
    """The model itself when it takes one positional tensor, else a :class:`Positional` wrapper."""
    return model if spec == InputSpec(("input",), False) else Positional(model, spec)


def rows(named: dict[str, np.ndarray | torch.Tensor], start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every input."""
    return {k: v[start:stop] for k, v in named.items()}


def num_rows(named: dict) -> int:
    return len(next(iter(named.values())))


def repeat_rows(named: dict[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    """``b`` rows of every input, made by repeating the given rows (dtypes kept)."""
    out = {}
    for k, v in named.items():
        reps = int(np.ceil(b / len(v)))
        out[k] = np.concatenate([v] * reps)[:b]
    return out
