"""QuantSpec: the plain-data description of one tensor's quantizer (bits, signedness, granularity, observer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Granularity = Literal["tensor", "channel", "group"]
ObserverName = Literal["minmax", "ema", "percentile", "mse"]


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is fake-quantized.

    ``signed``/``symmetric`` select the integer grid and how the zero point is chosen; ``granularity``
    picks one scale per tensor, per output channel (``ch_axis``) or per group of ``group_size``
    consecutive values along the flattened input dimension.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "tensor"
    ch_axis: int = 0
    group_size: int = 0
    narrow_range: bool = False
    observer: ObserverName = "minmax"
    learnable: bool = False
    percentile: float = 99.99
    ema_momentum: float = 0.01
    mse_grid: int = 50

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.granularity == "group" and self.group_size <= 0:
            raise ValueError("granularity 'group' needs group_size > 0")
        if self.narrow_range and not self.signed:
            raise ValueError("narrow_range applies to signed grids only")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow_range)[1]


def qrange(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range of a ``bits``-wide grid: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    if signed:
        lo = -(2 ** (bits - 1))
        return (lo + 1 if narrow_range else lo), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1
