"""Bit packing of low-bit integer codes into bytes, for compact storage of quantized weights.

Codes are packed as a little-endian bit stream: the first code sits in the lowest bits of the first byte, and a
code of a width that does not divide 8 (3, 5, 6, 7 bits) continues in the next byte, so N codes of b bits take
ceil(N * b / 8) bytes. For 1, 2, 4 and 8 bits that is the plain layout of whole codes per byte.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> int:
    """Return how many whole codes fit in one byte (0 where the width does not divide 8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 8 // bits if 8 % bits == 0 else 0


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to pack ``numel`` codes of ``bits`` bits each (the last byte zero-padded)."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return math.ceil(numel * bits / 8)


def _bit_stream(values: torch.Tensor, width: int) -> torch.Tensor:
    """Each uint8 value as ``width`` 0/1 bytes, lowest bit first, concatenated."""
    shifts = torch.arange(width, dtype=torch.uint8, device=values.device)
    return ((values.unsqueeze(1) >> shifts) & 1).reshape(-1)


def _from_bit_stream(stream: torch.Tensor, width: int) -> torch.Tensor:
    """Groups of ``width`` 0/1 bytes (lowest bit first) as uint8 values."""
    shifts = torch.arange(width, dtype=torch.uint8, device=stream.device)
    return (stream.view(-1, width) << shifts).sum(1, dtype=torch.uint8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) of any shape into a flat uint8 tensor."""
    per_byte = _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        bad = lo if lo < 0 else hi if hi >= 1 << bits else None
        if bad is not None:
            raise ValueError(f"code {bad} is out of range [0, {(1 << bits) - 1}] for {bits}-bit packing")
    flat = flat.to(torch.uint8)
    if per_byte == 1:
        return flat.clone()
    if per_byte == 0:  # 3, 5, 6, 7 bits: through a bit stream
        stream = _bit_stream(flat, bits)
        stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
        return _from_bit_stream(stream, 8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_byte)
    out = groups[:, 0].clone()
    for i in range(1, per_byte):
        out |= groups[:, i] << (i * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes of ``shape``, dropping the padding of the last byte."""
    per_byte = _check_bits(bits)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    numel = math.prod(shape)
    expected = packed_nbytes(numel, bits)
    flat = packed.reshape(-1)
    if flat.numel() != expected:
        raise ValueError(f"packed has {flat.numel()} bytes but shape {shape} at {bits} bits needs {expected}")
    if per_byte == 1:
        return flat.clone().view(shape)
    if per_byte == 0:
        return _from_bit_stream(_bit_stream(flat, 8)[: numel * bits], bits).view(shape)
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    codes = (flat.unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:numel].view(shape)
