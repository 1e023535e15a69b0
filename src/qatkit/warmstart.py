"""Warm start (seed 003): copy float weights into a (prepared) model by name, and say what was copied."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .nn.fake_quantizer import FakeQuantizer


@dataclass
class WarmStartReport:
    copied: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.unused or self.missing)

    def summary(self) -> str:
        return (
            f"warm start: copied {len(self.copied)} tensors; skipped {len(self.mismatched)} with mismatched shapes, "
            f"{len(self.unused)} not in the model; {len(self.missing)} model tensors had no source"
        )

    def lines(self) -> list[str]:
        out = [self.summary()]
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
        }


def quantizer_keys(model: nn.Module) -> set[str]:
    """state_dict keys that belong to quantizers (set by calibration, never by a float checkpoint)."""
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            keys.update(f"{name}.{k}" for k in m.state_dict())
    return keys


def warm_start(
    model: nn.Module, source: nn.Module | dict[str, torch.Tensor] | str | Path, strict: bool = False
) -> WarmStartReport:
    """Copy every source tensor whose name and shape match; report the rest.

    ``source`` is a float model, its state_dict, or a safetensors file. ``strict=True`` raises if anything
    other than quantizer state was left uncopied.
    """
    if isinstance(source, (str, Path)):
        from .checkpoint import load_weights

        source = load_weights(source)
    elif isinstance(source, nn.Module):
        source = source.state_dict()
    target = model.state_dict()
    qkeys = quantizer_keys(model)
    report = WarmStartReport()
    updates = {}
    for name, tensor in source.items():
        if name not in target:
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
