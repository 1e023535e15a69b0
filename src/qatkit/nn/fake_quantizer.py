"""FakeQuantizer: the module that holds one tensor's quantizer state and applies fake quantization.

Every piece of state (scale, zero point, running range, batch counter, on/off switches) is a buffer or
parameter, so it travels in ``state_dict`` and survives a resume.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from qatkit.quant.affine import fake_quantize, lsq_fake_quantize, qparams_from_range
from qatkit.quant.observers import observe
from qatkit.quant.spec import QuantSpec


def num_scales(spec: QuantSpec, shape: tuple[int, ...] | None) -> int:
    """How many (scale, zero point) pairs a tensor of ``shape`` needs under ``spec``."""
    if spec.granularity == "tensor":
        return 1
    if shape is None:
        raise ValueError(f"granularity '{spec.granularity}' needs the tensor shape (weights only)")
    if spec.granularity == "channel":
        return shape[spec.ch_axis]
    inner = 1
    for d in shape[1:]:
        inner *= d
    if inner % spec.group_size:
        raise ValueError(f"input size {inner} is not a multiple of group_size {spec.group_size}")
    return shape[0] * inner // spec.group_size


class FakeQuantizer(nn.Module):
    """Observes a tensor's range and fake-quantizes it according to a :class:`QuantSpec`.

    ``observer_on`` and ``fake_quant_on`` are buffers, not Python flags, so a resumed run continues in the
    same phase; ``forward`` reads their Python mirrors (``observing``, ``quantizing``, kept in step by the setters
    and by ``load_state_dict``), so ``torch.compile`` specialises on them instead of splitting the graph at a
    tensor-to-bool, and eager calls skip two device reads. A learnable (LSQ) scale is initialised by the observer
    on the first observed batch; an asymmetric learnable quantizer also learns its offset (LSQ+, Bhalgat et al.
    2020) as the float parameter ``offset``, whose rounded value is the integer ``zero_point`` the exporters read.
    Given a ``shape`` it quantizes a weight: each observation replaces the range instead of merging into it.
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.spec = self.base_spec = spec
        self.is_weight = shape is not None
        n = num_scales(spec, shape)
        scale = torch.ones(n)
        if spec.learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        if self.learns_offset:
            self.offset = nn.Parameter(torch.zeros(n))
            self.register_state_dict_pre_hook(_sync_before_state_dict)
        self.register_buffer("min_val", torch.zeros(n))
        self.register_buffer("max_val", torch.zeros(n))
        self.register_buffer("observed_batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("observer_on", torch.ones((), dtype=torch.bool))
        self.register_buffer("fake_quant_on", torch.ones((), dtype=torch.bool))
        self.observing = self.quantizing = True

    @property
    def ch_axis(self) -> int | None:
        return self.spec.ch_axis if self.spec.granularity == "channel" else None

    @property
    def group_size(self) -> int:
        return self.spec.group_size if self.spec.granularity == "group" else 0

    @property
    def learns_offset(self) -> bool:
        """LSQ+: a learned scale on an asymmetric grid learns its zero point too."""
        return self.spec.learnable and not self.spec.symmetric

    @torch.no_grad()
    def sync_zero_point(self) -> None:
        """The integer zero point the learned offset stands for (rounded, on the grid), for export and state."""
        if self.learns_offset:
            self.zero_point.copy_(self.offset.round().clamp(self.spec.qmin, self.spec.qmax).to(torch.int32))

    @property
    def tracks_every_step(self) -> bool:
        """Weight ranges re-observed every step: cheap min-max on fixed (non-learnable) scales only."""
        return self.spec.observer == "minmax" and not self.spec.learnable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.update_range(x)
            if self.spec.learnable and self.training:  # a learned scale is initialised once, then trained
                self.set_observer(False)
        if not self.quantizing:
            return x
        if not self.spec.learnable:
            return fake_quantize(x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax, self.ch_axis,
                                 self.group_size)  # fmt: skip
        zp = self.offset if self.learns_offset else self.zero_point
        self.sync_zero_point()
        return lsq_fake_quantize(x, self.scale, zp, self.spec.qmin, self.spec.qmax, self.ch_axis, self.group_size)

    @torch.no_grad()
    def update_range(self, x: torch.Tensor) -> None:
        """Merge ``x``'s range into the running range and recompute scale and zero point."""
        if self.is_weight:
            seen: int | torch.Tensor = 0
        else:  # traced: the counter stays a tensor (no graph split); eager: one read is cheaper than a select
            seen = self.observed_batches if torch.compiler.is_compiling() else int(self.observed_batches)
        lo, hi = observe(x, self.spec, (self.min_val, self.max_val), seen)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.observed_batches.add_(1)  # in place: `+=` would re-register the buffer (slow setattr)
        scale, zp = qparams_from_range(lo, hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        if self.learns_offset:
            self.offset.copy_(zp.to(self.offset.dtype))

    def set_bits(self, bits: int | None) -> bool:
        """Quantize on a ``bits`` grid from now on (None: the width it was made with); True if it changed.
        The caller re-initialises the scale for the new grid (transform/bits.py)."""
        spec = self.base_spec if bits is None else replace(self.base_spec, bits=bits)
        changed = spec != self.spec
        self.spec = spec
        return changed

    def reset_range(self) -> None:
        """Forget the running range (the next observed batch starts afresh)."""
        self.observed_batches.zero_()

    def set_observer(self, on: bool) -> None:
        self.observer_on.fill_(on)
        self.observing = on

    def set_fake_quant(self, on: bool) -> None:
        self.fake_quant_on.fill_(on)
        self.quantizing = on

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.observing, self.quantizing = bool(self.observer_on), bool(self.fake_quant_on)

    def extra_repr(self) -> str:
        s = self.spec
        kind = "lsq" if s.learnable else s.observer
        sign = "int" if s.signed else "uint"
        return f"{sign}{s.bits}, {s.granularity}, {'sym' if s.symmetric else 'asym'}, {kind}"


def _sync_before_state_dict(module: FakeQuantizer, prefix: str, keep_vars: bool) -> None:
    """A saved zero point is always the one the learned offset stands for, even right after an optimiser step."""
    module.sync_zero_point()
