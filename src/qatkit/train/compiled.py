"""``compile: true`` in a training stage: the model's training forward under ``torch.compile``, measured.

The trainer steps through :class:`CompiledModel`; checkpoints, validation and export keep using the model itself
(its ``state_dict`` keys stay the user's). The first call compiles: its wall time, the graphs Dynamo made and
the graph breaks it hit go into the stage summary. Where compilation fails (no C++ compiler, an op the backend
cannot lower), the stage says why in one line and trains eagerly; the model's own errors come from the eager
call, as they would without ``compile``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class CompileInfo:
    """What compiling the stage's model did: the mode, the first call's seconds (tracing and compiling forward and
    backward), the graphs Dynamo made (recompiles after a quantizer switch included) and the graph breaks it
    hit, or why it fell back."""

    mode: str
    first_call_s: float | None = None
    graphs: int | None = None
    graph_breaks: int | None = None
    fallback: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.fallback is not None:
            return f"torch.compile ({self.mode}) failed, trained eagerly: {self.fallback}"
        return (f"torch.compile ({self.mode}): {self.graphs} graph(s), {self.graph_breaks} graph break(s), first call "
                f"{self.first_call_s:.1f} s")  # fmt: skip


def _dynamo_counts() -> tuple[int, int]:
    """Dynamo's process-wide counters: graphs compiled so far, graph breaks so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _reason(e: BaseException) -> str:
    """The first line of the innermost cause, e.g. the C++ compiler's or the lowering's complaint."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


class CompiledModel(nn.Module):
    """Calls ``torch.compile(model, mode=mode)``; falls back to ``model`` itself if compiling raises.

    Only the eager model is a registered child, so ``train()``/``eval()`` reach it once and the compiled wrapper
    (which shares every parameter and buffer) is not a second copy in ``modules()``.
    """

    def __init__(self, model: nn.Module, mode: str = "default", on_fallback=None) -> None:
        super().__init__()
        self.model = model
        self.info = CompileInfo(mode)
        self.on_fallback = on_fallback
        object.__setattr__(self, "_compiled", torch.compile(model, mode=None if mode == "default" else mode))

    def forward(self, *args, **kwargs):
        if self.info.fallback is not None:
            return self.model(*args, **kwargs)
        graphs, breaks = _dynamo_counts()
        start = time.perf_counter()
        try:  # the backward compiles with the forward, so that its failure also lands here
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                out = self._compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:  # compiling failed: train eagerly, say why
            self.info.fallback = _reason(e)
            if self.on_fallback is not None:
                self.on_fallback(self.info.describe())
            return self.model(*args, **kwargs)
        if self.info.first_call_s is None:
            self.info.first_call_s = time.perf_counter() - start
        graphs_after, breaks_after = _dynamo_counts()
        self.info.graphs = (self.info.graphs or 0) + graphs_after - graphs
        self.info.graph_breaks = (self.info.graph_breaks or 0) + breaks_after - breaks
        return out
