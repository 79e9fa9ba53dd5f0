"""Many bf16 rows where the CPU has bf16 products: torch's bf16 GEMM on W_hat rounded to bf16 (<= 4 bits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_local.quant import native
from moe_local.quant.groupwise import quantize

ROWS = 128  # above every kernel's few-row limit (the int4 kernel's: 96): the many-row path


@pytest.fixture
def weight():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(96, 128, generator=gen)


@pytest.mark.parametrize("scheme", ["int4-g64", "int2-g64", "int3-g64-hqq"])
def test_low_bit_weights_run_bf16_gemm_on_w_hat_rounded_once(weight, scheme, monkeypatch):
    monkeypatch.setattr(native, "BF16_GEMM", True)
    qt = quantize(weight, scheme)
    x = torch.randn(ROWS, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.inference_mode():
        got = qt.linear(x)
    w_hat = qt.dequantize()
    assert torch.equal(got, F.linear(x, w_hat.bfloat16()))
    exact = x.double() @ w_hat.double().T
    scale = x.abs().double() @ w_hat.abs().double().T  # sum of |products|
    # W_hat's bf16 rounding moves each product by at most 2^-9 of it; one bf16 rounding of the sum
    assert ((got.double() - exact).abs() <= scale * 2**-9 + exact.abs() * 2**-8).all()


def test_8_bit_weights_and_machines_without_bf16_products_keep_float32(weight, monkeypatch):
    x = torch.randn(ROWS, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    int8 = quantize(weight, "int8-g64")
    int4 = quantize(weight, "int4-g64")
    monkeypatch.setattr(native, "BF16_GEMM", True)
    with torch.inference_mode():
        assert torch.equal(int8.linear(x), F.linear(x.float(), int8.dequantize()).bfloat16())
    monkeypatch.setattr(native, "BF16_GEMM", False)
    with torch.inference_mode():
        assert torch.equal(int4.linear(x), F.linear(x.float(), int4.dequantize()).bfloat16())
