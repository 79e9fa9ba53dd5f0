"""QuantizedTensor: linear() against the dequantized reference, serialization, validation."""

from __future__ import annotations

import pytest
import torch

import moe_local.quant.tensor as qtensor_mod
from moe_local.quant import QType, QuantizedTensor, bits_per_weight, kernels, native, pack_codes, quantize

N_OUT, N_IN = 256, 512
ALL_BITS = (8, 4, 3, 2)
HAS_KERNEL = kernels.int4_kernel_available()

# fp32 inputs run the dequantize path: the same W_hat as dequantize(), so only summation order differs.
FP32_REL = 1e-5
# bf16 inputs: bf16 weights/scales and a bf16 output; compared with an fp32 reference (measured ~3e-3).
BF16_REL = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def _qt(bits: int, group: int = 64, o: int = N_OUT, i: int = N_IN, method: str = "rtn") -> QuantizedTensor:
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(bits + group + o))
    return quantize(w, QType(bits, group, method))


def _x(*lead: int, i: int = N_IN) -> torch.Tensor:
    return torch.randn(*lead, i, generator=torch.Generator().manual_seed(sum(lead) + 7))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_linear_fp32_matches_dequantized(bits: int, lead: tuple[int, ...]) -> None:
    qt = _qt(bits)
    x = _x(*lead)
    ref = x @ qt.dequantize().T
    y = qt.linear(x)
    assert y.shape == (*lead, N_OUT) and y.dtype == torch.float32
    assert _rel(y, ref) < FP32_REL
    assert _cos(y, ref) > 0.99999


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("use_kernel", [None, True, False])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3)])
def test_linear_bf16_matches_dequantized(bits: int, use_kernel: bool | None, lead: tuple[int, ...]) -> None:
    qt = _qt(bits)
    x = _x(*lead).to(torch.bfloat16)
    ref = x.float() @ qt.dequantize().T
    y = qt.linear(x, use_kernel=use_kernel)
    assert y.shape == (*lead, N_OUT) and y.dtype == torch.bfloat16
    assert _rel(y, ref) < BF16_REL
    assert _cos(y, ref) > 0.9999


@pytest.mark.skipif(not HAS_KERNEL, reason="this torch has no CPU int4 kernel")
def test_kernel_is_used_for_2_to_4bit_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "available", lambda: False)  # torch's kernel (native: test_native.py)
    calls = []
    real = kernels.int4_linear

    def spy(*args: torch.Tensor | int) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "int4_linear", spy)
    qt = _qt(4)
    x = _x(3).to(torch.bfloat16)
    qt.linear(x)
    assert len(calls) == 1
    qt.linear(x.float())  # fp32: reference path
    qt.linear(x, use_kernel=False)
    assert len(calls) == 1
    _qt(3).linear(x)  # 3- and 2-bit codes fit the kernel's 4-bit lanes
    _qt(2).linear(x)
    assert len(calls) == 3
    _qt(3).linear(torch.cat([x] * 40))  # 120 rows: dequantize + matmul beats the kernel
    assert len(calls) == 3
    # unsupported shapes fall back silently: group 16, or out features not a multiple of 16
    _qt(4, group=16).linear(x, use_kernel=True)
    _qt(4, o=40).linear(x, use_kernel=True)
    assert len(calls) == 3


@pytest.mark.skipif(not HAS_KERNEL, reason="this torch has no CPU int4 kernel")
def test_kernel_matches_reference_path_large_row_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "available", lambda: False)  # torch's kernel (native: test_native.py)
    qt = _qt(4, group=128, o=320)
    x = _x(200).to(torch.bfloat16)  # above KERNEL_MAX_TOKENS: auto takes the reference path
    ref = qt.linear(x.float())
    assert _rel(qt.linear(x, use_kernel=True), ref) < BF16_REL
    assert _rel(qt.linear(x), ref) < BF16_REL
    assert qt.kernel_cache_nbytes == 320 * 512 // 2 + (512 // 128) * 320 * 2 * 2  # codes + bf16 (s, b)
    qt.clear_kernel_cache()
    assert qt.kernel_cache_nbytes == 0
    assert _rel(qt.linear(x[:3], use_kernel=True), ref[:3]) < BF16_REL


@pytest.mark.skipif(not HAS_KERNEL, reason="this torch has no CPU int4 kernel")
@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("shape", [(64, 64), (80, 128), (144, 96), (320, 512)])
def test_fast_kernel_layout_matches_torch_conversion(bits: int, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
    shifted = codes.to(torch.int32) + 8 - (1 << (bits - 1))
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(shifted, 1)
    assert torch.equal(kernels.pack_int4_weight(pack_codes(codes, bits), bits, shape), expected)


@pytest.mark.parametrize("bits", [4, 3])
def test_linear_in_row_chunks(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    qt = _qt(bits, o=100)
    x = _x(4)
    ref = x @ qt.dequantize().T
    monkeypatch.setattr(qtensor_mod, "DEQUANT_CHUNK_ELEMS", 3 * N_IN)  # 34 chunks of 3 rows
    assert _rel(qt.linear(x), ref) < FP32_REL
    assert _rel(qt.linear(x.to(torch.bfloat16), use_kernel=False), ref) < BF16_REL


def test_linear_bias_and_fp16_input() -> None:
    qt = _qt(4)
    x = _x(2, 3)
    bias = torch.randn(N_OUT)
    assert _rel(qt.linear(x, bias), x @ qt.dequantize().T + bias) < FP32_REL
    y16 = qt.linear(x.half(), bias.half())
    assert y16.dtype == torch.float16 and _rel(y16, x @ qt.dequantize().T + bias) < BF16_REL
    empty = qt.linear(torch.zeros(0, N_IN))
    assert empty.shape == (0, N_OUT)


def test_linear_bad_input() -> None:
    qt = _qt(4)
    with pytest.raises(ValueError, match="last dim 512"):
        qt.linear(torch.randn(2, 256))
    with pytest.raises(ValueError, match="floating-point"):
        qt.linear(torch.ones(2, N_IN, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"bias must have shape \(256,\)"):
        qt.linear(torch.randn(2, N_IN), torch.randn(10))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_tensors_roundtrip_and_nbytes(bits: int) -> None:
    qt = _qt(bits, method="hqq")
    tensors = qt.tensors()
    assert set(tensors) == {"packed", "scales", "zeros"}
    assert qt.nbytes * 8 == N_OUT * N_IN * bits_per_weight(qt.qtype)
    assert qt.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    # the caller's use: one contiguous byte blob, then views back into it
    blob = torch.cat([t.contiguous().view(torch.uint8).flatten() for t in tensors.values()])
    views, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        views[name] = blob[offset : offset + n].view(t.dtype).view(t.shape)
        offset += n
    back = QuantizedTensor.from_tensors(views, qt.shape, qt.qtype)
    assert back.shape == qt.shape and back.qtype == qt.qtype
    for name in tensors:
        assert torch.equal(back.tensors()[name], tensors[name])
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_from_tensors_validation() -> None:
    qt = _qt(4)
    tensors = qt.tensors()
    with pytest.raises(ValueError, match="expected tensors"):
        QuantizedTensor.from_tensors({"packed": tensors["packed"]}, qt.shape, qt.qtype)
    with pytest.raises(ValueError, match=r"scales must be torch\.float16"):
        QuantizedTensor.from_tensors({**tensors, "scales": tensors["scales"].float()}, qt.shape, qt.qtype)
    with pytest.raises(ValueError, match=r"packed must be torch\.uint8"):
        QuantizedTensor.from_tensors(tensors, qt.shape, QType(3, 64))
    with pytest.raises(ValueError, match="not divisible by group size"):
        QuantizedTensor.from_tensors(tensors, (N_OUT, 500), qt.qtype)
    with pytest.raises(ValueError, match="two positive ints"):
        QuantizedTensor.from_tensors(tensors, (N_OUT,), qt.qtype)  # type: ignore[arg-type]


def test_to_device_and_dtype_outputs() -> None:
    qt = _qt(2)
    assert qt.to("cpu") is qt
    meta = qt.to("meta")
    assert meta.device.type == "meta" and meta.shape == qt.shape
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(qt.dequantize_rows(10, 20), qt.dequantize()[10:20])
    with pytest.raises(ValueError, match="outside"):
        qt.dequantize_rows(10, N_OUT + 1)
    assert "int2-g64" in repr(qt)
