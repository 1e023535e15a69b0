"""Fold BatchNorm into the convolution before it, so exported int8 convolutions fuse in the runtime.

A BatchNorm left between a quantized Conv and its Q node blocks ONNX Runtime's DQ -> Conv -> Q fusion;
folding first (as deployment toolchains do) and quantizing the folded weights avoids that. Which BatchNorm
follows which layer is found by tracing the model with torch.fx, so attribute-style models (ResNet blocks with
``self.conv1``/``self.bn1``) fold as well as ``nn.Sequential`` stacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn``'s running statistics and affine terms into ``layer``'s weight and bias, in place."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv)
    beta = bn.bias if bn.affine else torch.zeros_like(inv)
    factor = gamma * inv
    layer.weight.mul_(factor.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: the BatchNorm modules folded, and each one left with the reason.

    Truthy when something was folded; iterating yields the folded names (so ``if report:`` and
    ``", ".join(report)`` work as they did on the old list of names)."""

    folded: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    """(BatchNorm name, why it was not folded)."""
    traced: bool = True
    """False when torch.fx could not trace the model and only the ``nn.Sequential`` rule was applied."""
    trace_error: str | None = None

    def __bool__(self) -> bool:
        return bool(self.folded)

    def __iter__(self) -> Iterator[str]:
        return iter(self.folded)

    def __len__(self) -> int:
        return len(self.folded)

    def lines(self) -> list[str]:
        """A human summary: counts, one line per BatchNorm left unfolded with its reason, the fallback note."""
        total = len(self.folded) + len(self.left)
        if total == 0:
            return []
        out = [f"folded {len(self.folded)} of {total} BatchNorm into the preceding Conv/Linear"]
        if not self.traced:
            out.append(
                f"torch.fx could not trace the model ({self.trace_error}): only a BatchNorm right after a "
                "Conv/Linear inside an nn.Sequential was folded"
            )
        out += [f"  {name} left unfolded: {why}" for name, why in self.left]
        return out

    def to_dict(self) -> dict:
        return {
            "folded": list(self.folded),
            "left": {name: why for name, why in self.left},
            "traced": self.traced,
            "trace_error": self.trace_error,
        }


_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def fold_batchnorm(model: nn.Module) -> FoldReport:
    """Fold every BatchNorm whose only input is a Conv/Linear output used by nothing else, found by tracing the
    model with torch.fx; returns a :class:`FoldReport` (folded names, and the reason for each one left).

    Folding uses the running statistics (eval-mode semantics). Each folded BatchNorm is replaced by
    ``nn.Identity`` so the module names (and state_dict keys) of the rest stay put. A model torch.fx cannot
    trace falls back to folding a BatchNorm that directly follows a Conv/Linear inside an ``nn.Sequential``.
    """
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not bns:
        return FoldReport()
    try:
        graph = _FoldTracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable Python
        return _fold_sequential(model, bns, (str(e).strip().splitlines() or [type(e).__name__])[0][:160])
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    node_of: dict[str, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
            node_of.setdefault(str(n.target), n)
    report = FoldReport()
    todo: list[tuple[str, str]] = []
    for name, bn in bns.items():
        why = _why_not(name, bn, node_of.get(name), calls, modules)
        if why is None:
            todo.append((str(node_of[name].args[0].target), name))
        else:
            report.left.append((name, why))
    for layer, name in todo:
        fold_into(modules[layer], bns[name])
        model.set_submodule(name, nn.Identity())
        report.folded.append(name)
    return report


class _FoldTracer(fx.Tracer):
    """Conv/Linear/BatchNorm stay single call_module nodes (also subclasses, which are then left unfolded)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_LAYERS, _BatchNorm)) or super().is_leaf_module(m, qualname)


def _why_not(
    name: str, bn: nn.Module, node: fx.Node | None, calls: dict[str, int], modules: dict[str, nn.Module]
) -> str | None:
    """Why the BatchNorm ``name`` cannot be folded into the layer before it, or None if it can."""
    if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not folded (only BatchNorm1d/BatchNorm2d)"
    if node is None:
        return "not called in the traced forward (unused, or inside a module torch.fx does not trace into)"
    if calls[name] > 1:
        return f"{name} called {calls[name]} times"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "no running statistics"
    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(src, fx.Node):
        return "its input is not a single tensor"
    layer = modules.get(str(src.target)) if src.op == "call_module" else None
    if layer is None or type(layer) not in _LAYERS:  # (exact types: a subclass may compute something else)
        return f"follows {_describe(src, modules)} not a Conv/Linear"
    if (type(layer), type(bn)) not in _PAIRS:
        return f"follows {_describe(src, modules)}, which a {type(bn).__name__} does not fold into"
    lname = str(src.target)
    if calls[lname] > 1:
        return f"{lname} called {calls[lname]} times"
    if len(src.users) > 1:
        return f"{lname} output also used elsewhere"
    width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != width:
        return f"{bn.num_features} features but {lname} gives {width}"
    return None


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A node as a reason names it: ``pool (MaxPool2d)``, ``add``, ``.view()``, ``the model input``."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    return f"{node.op} {node.target}"


def _fold_sequential(model: nn.Module, bns: dict[str, nn.Module], error: str) -> FoldReport:
    """The fallback for untraceable models: a BatchNorm directly after a Conv/Linear inside an nn.Sequential."""
    report = FoldReport(traced=False, trace_error=error)
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (_, a), (b_name, b) in zip(children, children[1:], strict=False):
            if any(type(a) is la and type(b) is lb for la, lb in _PAIRS) and b.track_running_stats:
                fold_into(a, b)
                setattr(seq, b_name, nn.Identity())
                report.folded.append(f"{seq_name}.{b_name}" if seq_name else b_name)
    done = set(report.folded)
    report.left = [(n, f"model not traceable by torch.fx ({error})") for n in bns if n not in done]
    return report
