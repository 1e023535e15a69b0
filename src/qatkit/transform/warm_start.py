"""Warm start (seed 003): copy float weights into a (prepared) model by name, and say what was copied."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qatkit.nn.fake_quantizer import FakeQuantizer
from qatkit.nn.modules import QUANTIZER_ATTRS


@dataclass
class WarmStartReport:
    copied: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    quantizer_state: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.unused or self.missing)

    def summary(self) -> str:
        extra = f"; {len(self.quantizer_state)} quantizer tensors left to calibration" if self.quantizer_state else ""
        return (
            f"warm start: copied {len(self.copied)} tensors; skipped {len(self.mismatched)} with mismatched shapes, "
            f"{len(self.unused)} not in the model; {len(self.missing)} model tensors had no source{extra}"
        )

    def lines(self) -> list[str]:
        """The summary, then one line per copied and per skipped tensor."""
        out = [self.summary()]
        out += [f"  copied {n} {tuple(s)}" for n, s in self.copied]
        out += [f"  shape mismatch {n}: source {tuple(s)} vs model {tuple(d)}" for n, s, d in self.mismatched]
        out += [f"  not in model: {n}" for n in self.unused]
        out += [f"  no source for: {n}" for n in self.missing]
        return out

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "copied": [n for n, _ in self.copied],
            "mismatched": [{"name": n, "source": list(s), "model": list(d)} for n, s, d in self.mismatched],
            "unused": self.unused,
            "missing": self.missing,
            "quantizer_state": self.quantizer_state,
        }


def quantizer_keys(model: nn.Module) -> set[str]:
    """state_dict keys that belong to quantizers (set by calibration, never by a float checkpoint)."""
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            keys.update(f"{name}.{k}" for k in m.state_dict())
    return keys


def is_quantizer_key(name: str) -> bool:
    """A state_dict key that belongs to a quantizer (``...weight_quant.scale`` and the like)."""
    return any(part in QUANTIZER_ATTRS for part in name.split("."))


def warm_start(
    model: nn.Module,
    source: nn.Module | dict[str, torch.Tensor] | str | Path,
    strict: bool = False,
    include_quantizer_state: bool = False,
) -> WarmStartReport:
    """Copy every source tensor whose name and shape match; report the rest.

    ``source`` is a float model, its state_dict, or a safetensors file (qatkit's or a plain one). Quantizer
    state in the source (scales from another recipe) is skipped unless ``include_quantizer_state``; the
    model's own quantizers are set by calibration. ``strict=True`` raises if any weight was left uncopied.
    """
    if isinstance(source, (str, Path)):
        from qatkit.io.checkpoint import load_weights

        source = load_weights(source, allow_foreign=True)
    elif isinstance(source, nn.Module):
        source = source.state_dict()
    target = model.state_dict()
    qkeys = quantizer_keys(model)
    report = WarmStartReport()
    updates = {}
    for name, tensor in source.items():
        if is_quantizer_key(name) and not include_quantizer_state:
            report.quantizer_state.append(name)
        elif name not in target:
            report.unused.append(name)
        elif tuple(target[name].shape) != tuple(tensor.shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        else:
            updates[name] = tensor
            report.copied.append((name, tuple(tensor.shape)))
    report.missing = [k for k in target if k not in source and k not in qkeys]
    if strict and not report.ok:
        raise ValueError("\n".join(report.lines()))
    model.load_state_dict(updates, strict=False)
    return report
