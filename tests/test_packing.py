"""Bit packing: round trips, agreement with numpy's little-endian packbits, a hand example, errors."""

import numpy as np
import pytest
import torch

from qatkit.quant.packing import pack_bits, packed_nbytes, unpack_bits


def _numpy_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack via bit planes: expand each code to `bits` little-endian bits, then np.packbits(bitorder='little')."""
    flat = codes.reshape(-1).astype(np.uint8)
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def _loop_reference(codes: list[int], bits: int) -> list[int]:
    per_byte = 8 // bits
    out = []
    for start in range(0, len(codes), per_byte):
        byte = 0
        for i, c in enumerate(codes[start : start + per_byte]):
            byte |= c << (i * bits)
        out.append(byte)
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(7,), (33,), (3, 5, 7), (1,), (8,), (0,)])
def test_round_trip_and_numpy_reference(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + len(shape))
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(codes.numel(), bits)
    np.testing.assert_array_equal(packed.numpy(), _numpy_reference(codes.numpy(), bits))
    back = unpack_bits(packed, bits, shape)
    assert back.dtype == torch.uint8 and back.shape == shape
    assert torch.equal(back.long(), codes)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_small_case_against_python_loop(bits):
    codes = [(3 * i + 1) % (1 << bits) for i in range(11)]
    assert pack_bits(torch.tensor(codes), bits).tolist() == _loop_reference(codes, bits)


def test_hand_example():
    packed = pack_bits(torch.tensor([1, 2, 3, 0]), 2)
    assert packed.tolist() == [0b00111001] == [57]
    assert unpack_bits(packed, 2, (4,)).tolist() == [1, 2, 3, 0]
    assert pack_bits(torch.tensor([1, 0, 1]), 1).tolist() == [0b101]
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    # 3 bits: 5 = 1,0,1 / 3 = 1,1,0 / 7 = 1,1,1 (lowest bit first) fill byte 0 and spill one bit into byte 1
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]
    assert unpack_bits(torch.tensor([0b11011101, 0b1], dtype=torch.uint8), 3, (3,)).tolist() == [5, 3, 7]


def test_accepts_other_integer_dtypes():
    codes = torch.tensor([[1, 2], [3, 0]], dtype=torch.int8)
    assert torch.equal(unpack_bits(pack_bits(codes, 2), 2, (2, 2)), codes.to(torch.uint8))
    codes = torch.tensor([255, 0, 17], dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, 8), 8, (3,)), codes)


def test_packed_nbytes():
    assert packed_nbytes(0, 2) == 0
    assert packed_nbytes(7, 1) == 1
    assert packed_nbytes(9, 1) == 2
    assert packed_nbytes(5, 2) == 2
    assert packed_nbytes(5, 4) == 3
    assert packed_nbytes(5, 8) == 5
    assert packed_nbytes(8, 3) == 3 and packed_nbytes(9, 3) == 4 and packed_nbytes(3, 7) == 3


def test_errors():
    with pytest.raises(ValueError, match="code 4 is out of range"):
        pack_bits(torch.tensor([0, 4, 1]), 2)
    with pytest.raises(ValueError, match="-1"):
        pack_bits(torch.tensor([0, -1]), 4)
    with pytest.raises(ValueError, match="256"):
        pack_bits(torch.tensor([256]), 8)
    with pytest.raises(ValueError, match="code 8 is out of range"):
        pack_bits(torch.tensor([0, 8]), 3)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits must be one of"):
            pack_bits(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        packed_nbytes(4, 16)
    with pytest.raises(ValueError, match="needs 2"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, (4,))
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int32), 4, (4,))
    with pytest.raises(ValueError, match="bits must be one of.*0"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 0, (4,))
