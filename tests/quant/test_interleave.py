"""Row-interleaved weights (``quant/interleave.py``): the same bytes, read through row strides.

Interleaving moves each row's codes, scales and zeros side by side; every kernel must give exactly
the values it gives on the three separate arrays, and a folder read this way must generate the same.
"""

from __future__ import annotations

import pytest
import torch

from moe_local.config import LoadOptions
from moe_local.format import reader
from moe_local.loading.loader import load
from moe_local.quant import QType, native, quantize
from moe_local.quant.interleave import ROW_ALIGN, interleavable, interleave
from moe_local.recipes import load_recipe

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler or no AVX2/FMA/F16C here")

SCHEMES = [(4, 64, (40, 1024)), (4, 32, (24, 576)), (4, 128, (16, 3584)), (8, 128, (12, 1024)),
           (8, 16, (9, 96)), (2, 64, (6, 384)), (4, 16, (12, 256))]  # fmt: skip


def _weights(bits: int, group: int, shape: tuple[int, int], n: int = 2):
    gen = torch.Generator().manual_seed(bits * 100 + group)
    return [quantize(torch.randn(*shape, generator=gen), QType(bits, group)) for _ in range(n)]


@pytest.mark.parametrize(("bits", "group", "shape"), SCHEMES)
def test_every_kernel_gives_the_same_bits(bits, group, shape):
    before = _weights(bits, group, shape)
    after = interleave(before)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(1))
    for old, new in zip(before, after, strict=True):
        assert native.row_strides(new._packed, new.scales, new.zeros)[0] % ROW_ALIGN == 0
        assert new._packed.data_ptr() % ROW_ALIGN == 0
        assert torch.equal(new.packed, old.packed) and torch.equal(new.scales, old.scales)
        assert torch.equal(new.zeros, old.zeros) and new.nbytes == old.nbytes
        assert torch.equal(new.dequantize(), old.dequantize())
        for xs in (x, x.bfloat16(), x[:1].bfloat16()):  # float32 and bf16 activations, decode's one row
            assert torch.equal(new.linear(xs), old.linear(xs))
        args = (new._packed, new.scales, new.zeros, new.shape, bits, group, 1, 4)
        assert torch.equal(native.dequantize_rows(*args), old.dequantize()[1:4])
    # one buffer for all of them: an expert stays one block, and the old tensors are not kept
    storage = after[0]._packed.untyped_storage().data_ptr()
    assert all(w.scales.untyped_storage().data_ptr() == storage for w in after)


def test_fused_expert_calls_give_the_same_bits():
    hidden, inner = 256, 384
    gen = torch.Generator().manual_seed(3)
    experts = [
        (quantize(torch.randn(2 * inner, hidden, generator=gen), QType(4, 64)),
         quantize(torch.randn(hidden, inner, generator=gen), QType(4, 64)))
        for _ in range(3)
    ]  # fmt: skip
    mixed = [tuple(interleave(list(pair))) for pair in experts]
    x = torch.randn(1, hidden, generator=gen).bfloat16()
    weights = torch.tensor([0.5, 0.3, 0.2])

    def calls(pairs):
        return [(gu.native_weight(), d.native_weight()) for gu, d in pairs]

    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert torch.equal(
                native.experts_bf16(x, calls(mixed), weights), native.experts_bf16(x, calls(experts), weights)
            )
            assert torch.equal(
                native.expert_bf16(x, *calls(mixed)[0]), native.expert_bf16(x, *calls(experts)[0])
            )
        finally:
            torch.set_num_threads(before)


def test_tensors_the_kernel_cannot_stride_through_are_copied_not_misread():
    (w,) = _weights(4, 64, (32, 512), n=1)
    x = torch.randn(3, 512)
    want = native.qlinear(x, w.packed, w.scales, w.zeros, w.shape, 4, 64)
    # columns apart (a transposed copy read back): no row strides, so the call reads a contiguous copy
    packed_t = w.packed.t().contiguous().t()
    assert native.row_strides(packed_t, w.scales, w.zeros) is None
    assert torch.equal(native.qlinear(x, packed_t, w.scales, w.zeros, w.shape, 4, 64), want)
    # scales and zeros of different strides cannot share the kernel's one scale stride
    wide = torch.zeros(32, 2 * w.scales.shape[1], dtype=torch.float16)
    wide[:, : w.scales.shape[1]] = w.scales
    assert native.row_strides(w.packed, wide[:, : w.scales.shape[1]], w.zeros) is None
    with pytest.raises(ValueError, match="contiguous rows"):
        native.NativeWeight(packed_t, w.scales, w.zeros, w.shape, 4, 64)
    with pytest.raises(ValueError, match="not a plain CPU weight"):
        interleave([w.dequantize()])
    assert not interleavable(w.dequantize())


def test_a_folder_reads_interleaved_and_generates_the_same(tiny_checkpoint, tmp_path, monkeypatch):
    from moe_local.convert.writer import quantize_checkpoint

    folder = tmp_path / "q4"  # experts wide enough for the native kernel's 64-value chunks
    quantize_checkpoint(
        tiny_checkpoint("mixtral", hidden_size=128, intermediate_size=192), folder, load_recipe("all-4bit")
    )
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    lm = load(folder, LoadOptions(dtype="bfloat16"), tokenizer=False)
    w = lm.store.get(lm.sites[0].layer, 0)
    assert w.gate_up._packed.stride(0) > w.gate_up._packed.shape[1]  # rows apart: scales beside codes
    assert w.gate_up._packed.untyped_storage().data_ptr() == w.down.zeros.untyped_storage().data_ptr()
    with torch.inference_mode():
        got = lm.model(ids).logits
    monkeypatch.setattr(reader, "_kernel_layout", lambda parts: parts)  # the blob's own three arrays
    plain = load(folder, LoadOptions(dtype="bfloat16"), tokenizer=False)
    assert plain.store.get(plain.sites[0].layer, 0).gate_up._packed.is_contiguous()
    with torch.inference_mode():
        assert torch.equal(plain.model(ids).logits, got)


def test_padding_bytes_are_zero_not_left_over():
    (w,) = _weights(4, 64, (8, 320), n=1)  # 5 groups: 20 bytes of scales and zeros, codes at byte 32
    (mixed,) = interleave([w])
    code_stride, _ = native.row_strides(mixed._packed, mixed.scales, mixed.zeros)
    assert code_stride == 32 + 160
    base = mixed.scales.untyped_storage().data_ptr()
    assert mixed._packed.data_ptr() - base == 32  # codes after the padding, 32-byte aligned
    rows = torch.empty(0, dtype=torch.uint8).set_(mixed.scales.untyped_storage()).view(8, code_stride)
    assert not rows[:, 20:32].any()  # the 12 padding bytes of every row
    assert torch.equal(rows[:, 32:], w.packed) and torch.equal(mixed.dequantize(), w.dequantize())
