"""GPTQ bit layout: rows and columns of codes in int32 words, v1 zeros (minus one, with borrows)."""

from __future__ import annotations

import pytest
import torch

from moe_local.format.gptq_layout import (
    pack_cols,
    pack_rows,
    qzeros_from_checkpoint,
    qzeros_to_v1,
    unpack_cols,
    unpack_rows,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (64, 48), generator=g)
    rows = pack_rows(codes, bits)
    assert rows.dtype == torch.int32 and rows.shape == (64 * bits // 32, 48)
    assert torch.equal(unpack_rows(rows, bits), codes)
    cols = pack_cols(codes.t(), bits)
    assert cols.shape == (48, 64 * bits // 32)
    assert torch.equal(unpack_cols(cols, bits), codes.t())
    zeros = torch.randint(1, 1 << bits, (4, 64), generator=g)  # export range: at least 1
    assert torch.equal(qzeros_from_checkpoint(qzeros_to_v1(zeros, bits), bits, 1, 64), zeros)
    assert torch.equal(qzeros_from_checkpoint(pack_cols(zeros, bits), bits, 2, 64), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_hand_computed_words(bits):
    # the words of one column are the little-endian split of sum(code_j << bits * j)
    n = 32 if bits == 3 else 64
    codes = [(7 * j + 3) % (1 << bits) for j in range(n)]
    big = sum(c << (bits * j) for j, c in enumerate(codes))
    words = [(big >> (32 * k)) & 0xFFFFFFFF for k in range(n * bits // 32)]
    expected = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
    assert torch.equal(pack_rows(torch.tensor(codes)[:, None], bits)[:, 0], expected)


def test_v1_zeros_hand_computed_and_borrows():
    zeros = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert int(qzeros_to_v1(zeros, 4)[0, 0]) == 0x76543210  # v1 stores zero - 1 in each nibble
    assert int(qzeros_to_v1(torch.full((1, 8), 8), 4)[0, 0]) == 0x77777777
    # GPTQModel subtracts 1 from whole words, so a zero of 0 borrows; reading adds the word back
    with_zero = torch.tensor([[0, 5, 0, 15, 1, 0, 9, 2]])
    word = (int(pack_cols(with_zero, 4)[0, 0]) - 0x11111111) & 0xFFFFFFFF
    stored = torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32)
    assert torch.equal(qzeros_from_checkpoint(stored, 4, 1, 8), with_zero)
