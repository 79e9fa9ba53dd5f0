"""pack_codes / unpack_codes: exact roundtrips, layouts and bad input."""

from __future__ import annotations

import pytest
import torch

from moe_local.quant import pack_codes, unpack_codes
from moe_local.quant.pack import packed_size

ALL_BITS = (8, 4, 3, 2)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(16,), (5, 64), (2, 3, 24), (7, 512)])
def test_roundtrip_random(bits: int, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + shape[-1])
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_roundtrip_edge_values(bits: int) -> None:
    qmax = (1 << bits) - 1
    n = 64
    rows = [
        torch.zeros(n),
        torch.full((n,), qmax),
        torch.arange(n) % 2 * qmax,  # 0, max, 0, max, ...
        (torch.arange(n) + 1) % 2 * qmax,  # max, 0, max, 0, ...
        torch.arange(n) % (qmax + 1),  # every value in order
    ]
    codes = torch.stack(rows).to(torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, n), codes)


def test_byte_layouts() -> None:
    c4 = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    assert pack_codes(c4, 4).tolist() == [1 | 2 << 4, 15]
    c2 = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)
    assert pack_codes(c2, 2).tolist() == [1 | 2 << 2 | 3 << 4]
    c3 = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(int(c) << (3 * k) for k, c in enumerate(c3.tolist()))
    assert pack_codes(c3, 3).tolist() == [word & 255, word >> 8 & 255, word >> 16]
    c8 = torch.tensor([0, 255, 7], dtype=torch.uint8)
    assert pack_codes(c8, 8).tolist() == [0, 255, 7]


def test_pack_does_not_alias_input() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    packed = pack_codes(codes, 8)
    packed[0] = 99
    assert codes[0] == 0


def test_non_contiguous_input() -> None:
    codes = torch.randint(0, 16, (32, 16), dtype=torch.uint8).t()  # [16, 32], non-contiguous
    assert torch.equal(unpack_codes(pack_codes(codes, 4), 4, 32), codes)


@pytest.mark.parametrize(("bits", "n"), [(3, 12), (3, 4), (4, 7), (2, 6), (2, 2)])
def test_bad_sizes_raise(bits: int, n: int) -> None:
    with pytest.raises(ValueError, match="multiple of"):
        pack_codes(torch.zeros(2, n, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="multiple of"):
        packed_size(n, bits)


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="valid bits"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="must be < 16"):
        pack_codes(torch.full((8,), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="must be < 8"):
        pack_codes(torch.full((8,), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_codes(torch.tensor(1, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="need a last dim of 6 bytes"):
        unpack_codes(torch.zeros(2, 5, dtype=torch.uint8), 3, 16)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(torch.zeros(2, 4), 4, 8)
