"""moe-local's C kernel (``quant/native.py``, ``quant/qlinear.c``): numerics, one copy, fallbacks.

The kernel rounds the activations to int8 per chunk of 32 bytes of codes (as llama.cpp's Q8_0
does) and is otherwise exact: it must equal that rounding followed by a float32 matmul to float32
rounding error, and stay within the rounding's bound of the unrounded product.
"""

from __future__ import annotations

import pytest
import torch

from moe_local import env
from moe_local.quant import QType, native, quantize
from moe_local.quant import tensor as qtensor_mod

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler or no AVX2/FMA/F16C here")


def _rounded_like_the_kernel(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to int8 per chunk (32 bytes of codes: 32 / 64 / 128 values at 8 / 4 / 2 bits)."""
    per = 32 * 8 // bits
    xc = x.float().reshape(-1, per)
    d = xc.abs().amax(1, keepdim=True) / 127
    return (torch.round(xc / torch.where(d > 0, d, 1)) * d).reshape(x.shape)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    ("bits", "group", "shape"),
    [
        (4, 64, (40, 64)),
        (4, 128, (96, 3584)),
        (4, 64, (7, 1024)),
        (8, 32, (8, 96)),
        (8, 128, (64, 1024)),
        (2, 128, (24, 512)),
        (2, 128, (5, 768)),
        # groups inside one chunk: each group's scale reaches only its own lanes
        (4, 32, (40, 576)),
        (4, 16, (12, 256)),
        (8, 16, (9, 96)),
        (2, 16, (6, 512)),
        (2, 32, (6, 256)),
        (2, 64, (6, 384)),
    ],
)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_equals_int8_rounded_activations_times_w_hat(bits: int, group: int, shape: tuple, m: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + m)
    qt = quantize(torch.randn(*shape, generator=gen), QType(bits, group))
    x = torch.randn(m, shape[1], generator=gen)
    w_hat = qt.dequantize()
    got = native.qlinear(x, qt.packed, qt.scales, qt.zeros, qt.shape, bits, group)
    assert got.dtype == torch.float32 and got.shape == (m, shape[0])
    assert _rel(got, _rounded_like_the_kernel(x, bits) @ w_hat.T) < 2e-6
    # int8 rounding of normal activations: half a step of amax / 127 per value, 0.5-1% of the product
    assert _rel(got, x @ w_hat.T) < 1.5e-2
    x[0, 3] = 40.0  # an outlier: its chunk's step grows, the other chunks' do not
    got = native.qlinear(x, qt.packed, qt.scales, qt.zeros, qt.shape, bits, group)
    assert _rel(got, _rounded_like_the_kernel(x, bits) @ w_hat.T) < 2e-6


def test_zero_activations_and_zero_chunks() -> None:
    qt = quantize(torch.randn(16, 256), QType(4, 64))
    x = torch.zeros(2, 256)
    x[1, 64:128] = torch.linspace(-1, 1, 64)  # one chunk carries everything, the others are 0
    got = native.qlinear(x, qt.packed, qt.scales, qt.zeros, qt.shape, 4, 64)
    assert torch.equal(got[0], torch.zeros(16))
    assert _rel(got[1:], _rounded_like_the_kernel(x[1:], 4) @ qt.dequantize().T) < 2e-6


@pytest.mark.parametrize(("bits", "group"), [(8, 32), (8, 128), (4, 64), (4, 128), (2, 128)])
def test_dequantize_rows_bit_identical_to_the_torch_path(bits: int, group: int, monkeypatch) -> None:
    qt = quantize(torch.randn(50, 512, generator=torch.Generator().manual_seed(bits)), QType(bits, group))
    fast = qt.dequantize_rows(3, 41, torch.bfloat16), qt.dequantize()
    monkeypatch.setattr(native, "available", lambda: False)
    slow = qt.dequantize_rows(3, 41, torch.bfloat16), qt.dequantize()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_linear_runs_native_on_the_stored_codes_and_converts_nothing(monkeypatch) -> None:
    calls = []
    real = native.NativeWeight.linear_bf16
    monkeypatch.setattr(
        native.NativeWeight, "linear_bf16", lambda self, x2: calls.append(x2.shape[0]) or real(self, x2)
    )
    blob = torch.empty(0, dtype=torch.uint8)
    src = quantize(torch.randn(64, 512), QType(4, 64))
    # the codes as views into one buffer, as an expert read from a moe-local folder holds them
    parts = [t.contiguous().view(torch.uint8).reshape(-1) for t in (src.packed, src.scales, src.zeros)]
    blob = torch.cat(parts)
    views, start = [], 0
    for t, like in zip(parts, (src.packed, src.scales, src.zeros), strict=True):
        views.append(blob[start : start + t.numel()].view(like.dtype).view(like.shape))
        start += t.numel()
    qt = qtensor_mod.QuantizedTensor(*views, src.shape, src.qtype)
    assert qt.prepare_kernel(torch.bfloat16) is True  # ready as stored
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    y = qt.linear(x)
    assert calls == [3] and y.dtype == torch.bfloat16
    assert qt.kernel_cache_nbytes == 0  # no second layout beside the codes
    assert qt.packed.untyped_storage().data_ptr() == blob.untyped_storage().data_ptr()
    assert _rel(y, x.float() @ src.dequantize().T) < 1.5e-2
    # float32 compute stays the exact reference path; many rows run dequantize + float32 matmul
    assert _rel(qt.linear(x.float()), x.float() @ src.dequantize().T) < 1e-5
    many = torch.randn(qtensor_mod.NATIVE_MAX_TOKENS + 1, 512, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(many.float(), src.dequantize()).to(torch.bfloat16)
    assert torch.equal(qt.linear(many), expected) and calls == [3]
    qt.linear(x, use_kernel=False)
    assert calls == [3]


def test_unsupported_groups_and_bits_keep_the_other_paths() -> None:
    cpu = torch.device("cpu")
    assert native.supports((8, 256), 4, 64, cpu) and native.supports((8, 256), 8, 32, cpu)
    assert native.supports((8, 256), 4, 32, cpu) and native.supports((8, 256), 2, 16, cpu)  # in a chunk
    assert not native.supports((8, 96), 4, 32, cpu)  # rows of 1.5 chunks
    assert not native.supports((8, 240), 3, 16, cpu)  # 3-bit codes: torch's int4 kernel
    assert not native.supports((8, 256), 4, 64, torch.device("meta"))


def test_switched_off_by_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(env.NATIVE.name, "0")
    native._library.cache_clear()
    try:
        assert not native.available()
        qt = quantize(torch.randn(16, 256), QType(4, 64))
        assert qtensor_mod.QuantizedTensor._kernel_kind(qt) != "native"
    finally:
        monkeypatch.delenv(env.NATIVE.name)
        native._library.cache_clear()
    assert native.available()


def test_built_once_into_the_home_folder(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(env.HOME.name, str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.available()
        built = list((tmp_path / "kernels").glob("qlinear-*.so"))
        assert len(built) == 1 and not [p for p in (tmp_path / "kernels").iterdir() if p not in built]
        native._library.cache_clear()
        mtime = built[0].stat().st_mtime_ns
        assert native.available() and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    finally:
        native._library.cache_clear()


def test_the_prebuilt_decode_call_equals_the_checked_call_and_follows_replaced_tensors() -> None:
    """The decode path's prebuilt call gives the same bits, and never reads tensors replaced since."""
    qt = quantize(torch.randn(96, 256), QType(4, 64))
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    codes = (qt.packed, qt.scales, qt.zeros)
    checked = native.qlinear(x, *codes, qt.shape, 4, 64)
    assert torch.equal(qt.linear(x), checked)
    assert torch.equal(qt.linear(x[None]), checked[None])  # leading dims kept
    qt.scales = qt.scales * 2  # a new tensor, not the one the call was built on
    assert torch.equal(qt.linear(x), native.qlinear(x, qt.packed, qt.scales, qt.zeros, qt.shape, 4, 64))
    with pytest.raises(ValueError, match="last dim 256"):
        qt.linear(torch.randn(1, 128, dtype=torch.bfloat16))


def test_many_rows_dequantize_into_a_reused_buffer_with_the_same_bits() -> None:
    """The prefill path writes each dequantized chunk into one reused buffer: the result is unchanged."""
    qt = quantize(torch.randn(300, 256), QType(4, 64))
    x = torch.randn(40, 256, dtype=torch.bfloat16)  # above NATIVE_MAX_TOKENS: dequantize + matmul
    want = (x.float() @ qt.dequantize().T).bfloat16()
    assert torch.equal(qt.linear(x), want)
    assert torch.equal(qt.linear(x), want)  # again, through the same buffer
    out = torch.empty(10, 256)
    got = native.dequantize_rows(qt.packed, qt.scales, qt.zeros, qt.shape, 4, 64, 5, 15, out)
    assert got is out and torch.equal(out, qt.dequantize_rows(5, 15))
    with pytest.raises(ValueError, match="contiguous float32"):
        native.dequantize_rows(
            qt.packed, qt.scales, qt.zeros, qt.shape, 4, 64, 0, 3, torch.empty(3, 256).half()
        )
