"""The QuantizedWeight contract, the scheme registry and QuantLinear over any registered kind."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_local.quant import (
    BnbTensor,
    BnbType,
    HqqConfig,
    QType,
    QuantizedTensor,
    QuantizedWeight,
    QuantLinear,
    SchemeKind,
    kind_of,
    parse_scheme,
    quantize,
    quantize_scheme,
    rebuild,
    register_scheme,
    registry,
    scheme_kinds,
)
from moe_local.quant.api import make_linear_module
from moe_local.quant.base import check_shape
from moe_local.quant.bnb_backend import bitsandbytes_available

N_OUT, N_IN = 64, 128
needs_bnb = pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes is not installed")


def _w(o: int = N_OUT, i: int = N_IN) -> torch.Tensor:
    return torch.randn(o, i, generator=torch.Generator().manual_seed(0))


# --- a toy third kind: fp16 weights, to show a kind needs only the contract ----------------------


@dataclass(frozen=True)
class Fp16Scheme:
    bits: int = 16

    @property
    def full_name(self) -> str:
        return "fp16-test"


def _parse_fp16(text: str) -> Fp16Scheme:
    if text != "fp16-test":
        raise ValueError(f"not fp16-test: {text!r}")
    return Fp16Scheme()


class Fp16Weight(QuantizedWeight):
    def __init__(self, w: torch.Tensor, shape: tuple[int, int]) -> None:
        self.shape = check_shape(shape)
        if w.dtype != torch.float16 or tuple(w.shape) != self.shape:
            raise ValueError("w must be fp16 of the weight's shape")
        self.w = w
        self._kernel = {}

    @property
    def scheme(self) -> Fp16Scheme:
        return Fp16Scheme()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    @classmethod
    def from_tensors(cls, tensors, shape, scheme) -> Fp16Weight:
        return cls(tensors["w"], shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.w.to(dtype)

    def linear(self, x, bias=None, *, use_kernel=None) -> torch.Tensor:
        self._check_linear_args(x, bias)
        return F.linear(x, self.w.to(x.dtype), None if bias is None else bias.to(x.dtype))


FP16_KIND = SchemeKind(
    name="fp16-test",
    scheme_type=Fp16Scheme,
    weight_type=Fp16Weight,
    parse=_parse_fp16,
    quantize=lambda w, scheme: Fp16Weight(w.half(), tuple(w.shape)),
)


@pytest.fixture
def with_fp16_kind(monkeypatch):
    monkeypatch.setattr(registry, "_KINDS", list(registry._KINDS))
    register_scheme(FP16_KIND)
    return FP16_KIND


# --- the base type ------------------------------------------------------------------------------


def test_implementations_share_the_base() -> None:
    qt = quantize(_w(), "int4-g64")
    assert isinstance(qt, QuantizedWeight) and qt.scheme == qt.qtype == QType(4, 64)
    assert issubclass(BnbTensor, QuantizedWeight)
    # the positional constructor code outside quant/ uses
    again = QuantizedTensor(qt.packed, qt.scales, qt.zeros, qt.shape, qt.qtype)
    assert torch.equal(again.dequantize(), qt.dequantize())
    with pytest.raises(TypeError):
        QuantizedWeight()  # type: ignore[abstract]


def test_to_moves_and_non_blocking_is_accepted() -> None:
    qt = quantize(_w(), "int4-g64")
    assert qt.to("cpu", non_blocking=True) is qt
    meta = qt.to("meta", non_blocking=True)
    assert type(meta) is QuantizedTensor and meta.device == torch.device("meta")
    assert meta.shape == qt.shape and meta.nbytes == qt.nbytes and meta.kernel_cache_nbytes == 0


def test_pin_memory_without_cuda_returns_self(monkeypatch) -> None:
    qt = quantize(_w(), "int4-g64")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert qt.pin_memory() is qt
    assert not qt.is_pinned()
    assert not qt.to("meta").is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pin_memory_with_cuda() -> None:
    qt = quantize(_w(), "int4-g64")
    pinned = qt.pin_memory()
    assert pinned is not qt and pinned.is_pinned() and pinned.pin_memory() is pinned
    assert torch.equal(pinned.dequantize(), qt.dequantize())
    moved = pinned.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(moved.dequantize().cpu(), qt.dequantize())


# --- the registry -------------------------------------------------------------------------------


def test_builtin_kinds_and_parse_order() -> None:
    names = [k.name for k in scheme_kinds()]
    assert names[:2] == ["group-wise", "bitsandbytes"]
    assert parse_scheme("int3-g64-hqq") == QType(3, 64, "hqq")
    assert parse_scheme("nf4-dq") == BnbType("nf4", 64, True)
    assert kind_of(QType(4, 64)).weight_type is QuantizedTensor
    assert kind_of(BnbType("int8")).weight_type is BnbTensor
    with pytest.raises(ValueError, match="unsupported bits 5"):  # the group-wise message comes first
        parse_scheme("int5-g64")
    with pytest.raises(ValueError, match="cannot parse scheme"):
        parse_scheme("zz")
    with pytest.raises(ValueError, match="QType, BnbType"):
        kind_of(5)


def test_quantize_scheme_and_rebuild() -> None:
    w = _w()
    by_name = quantize_scheme(w, "int4-g64")
    assert torch.equal(by_name.packed, quantize(w, QType(4, 64)).packed)
    back = rebuild({k: v.clone() for k, v in by_name.tensors().items()}, by_name.shape, "int4-g64")
    assert type(back) is QuantizedTensor and torch.equal(back.dequantize(), by_name.dequantize())
    hqq = quantize_scheme(w, "int3-g64-hqq", hqq_config=HqqConfig(iters=3))
    assert torch.equal(hqq.zeros, quantize(w, "int3-g64-hqq", hqq_config=HqqConfig(iters=3)).zeros)
    with pytest.raises(ValueError, match="calibration"):
        quantize_scheme(w, "int4-g64-gptq")
    with pytest.raises(ValueError):
        quantize_scheme(w, object())


@needs_bnb
def test_bnb_through_the_registry() -> None:
    w = _w()
    qt = quantize_scheme(w, "nf4")
    assert type(qt) is BnbTensor and qt.scheme == qt.btype == BnbType("nf4")
    back = rebuild(dict(qt.tensors()), qt.shape, qt.scheme)
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert qt.to("cpu", non_blocking=True) is qt
    with pytest.raises(ValueError, match="no quantization options"):
        quantize_scheme(w, "nf4", hqq_config=HqqConfig())
    layer = make_linear_module(qt, None)
    assert type(layer) is QuantLinear and layer.quantized() is qt


def test_register_scheme_rejects_clashes(with_fp16_kind) -> None:
    with pytest.raises(ValueError, match="clashes"):
        register_scheme(with_fp16_kind)
    with pytest.raises(ValueError, match="SchemeKind"):
        register_scheme("fp16-test")  # type: ignore[arg-type]


def test_a_registered_kind_works_everywhere(with_fp16_kind) -> None:
    lin = nn.Linear(N_IN, N_OUT)
    layer = QuantLinear.from_linear(lin, "fp16-test")
    assert isinstance(layer.quantized(), Fp16Weight) and layer.scheme == Fp16Scheme()
    x = torch.randn(3, N_IN)
    with torch.no_grad():
        assert torch.allclose(layer(x), lin(x), atol=1e-2)
    layer.float()  # the stored fp16 tensor keeps its dtype; the bias follows
    assert layer.w.dtype == torch.float16 and layer.bias is not None and layer.bias.dtype == torch.float32
    assert "qtype=fp16-test" in repr(layer)
    weight = rebuild({"w": layer.w}, (N_OUT, N_IN), "fp16-test")
    assert torch.equal(weight.dequantize(), layer.dequantize())


# --- QuantLinear over any weight ----------------------------------------------------------------


def test_quant_linear_keeps_the_weight_until_a_buffer_changes() -> None:
    qt = quantize(_w(), "int4-g64")
    layer = QuantLinear(qt)
    assert layer.quantized() is qt and layer.qtype is layer.scheme
    layer.scales.mul_(2)  # in place: the view is rebuilt
    rebuilt = layer.quantized()
    assert rebuilt is not qt and torch.equal(rebuilt.scales, layer.scales)
    with pytest.raises(ValueError, match="QuantizedWeight"):
        QuantLinear(_w())  # type: ignore[arg-type]
