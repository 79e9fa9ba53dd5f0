"""QuantLinear: drop-in nn.Linear replacement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_local.quant import QType, QuantLinear

N_IN, N_OUT = 512, 256

# Relative error ||y_q - y|| / ||y|| against the float nn.Linear (default init, gaussian x).
OUTPUT_BOUNDS = {
    "int8-g64": 0.01,
    "int4-g64": 0.12,
    "int3-g64": 0.25,
    "int2-g64": 0.55,
    "int4-g64-hqq": 0.11,
    "int3-g64-hqq": 0.22,
    "int2-g64-hqq": 0.45,
}


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(N_IN, N_OUT, bias=bias)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("scheme", sorted(OUTPUT_BOUNDS))
def test_from_linear_output_close(scheme: str) -> None:
    lin = _linear()
    ql = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(4, 3, N_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = lin(x)
    yq = ql(x)
    assert yq.shape == y.shape
    assert _rel(yq, y) < OUTPUT_BOUNDS[scheme]
    assert _rel(ql(x.to(torch.bfloat16)), y) < OUTPUT_BOUNDS[scheme] + 0.01


def test_bias_preserved_and_optional() -> None:
    lin = _linear()
    ql = QuantLinear.from_linear(lin, QType(4, 64))
    assert ql.bias is not None and torch.equal(ql.bias, lin.bias.detach())
    assert ql.bias.data_ptr() != lin.bias.data_ptr()
    no_bias = QuantLinear.from_linear(_linear(bias=False), "int4-g64")
    assert no_bias.bias is None
    assert "bias" not in no_bias.state_dict()
    x = torch.randn(2, N_IN)
    diff = ql(x) - no_bias.quantized().linear(x)
    assert torch.allclose(diff, lin.bias.detach().expand(2, N_OUT), atol=1e-5)


def test_state_dict_roundtrip() -> None:
    src = QuantLinear.from_linear(_linear(seed=0), "int3-g64-hqq")
    dst = QuantLinear.from_linear(_linear(seed=1), "int3-g64-hqq")
    x = torch.randn(3, N_IN)
    dst(x)
    dst(x.to(torch.bfloat16))  # builds caches that loading must invalidate
    sd = src.state_dict()
    assert set(sd) == {"packed", "scales", "zeros", "bias"}
    dst.load_state_dict(sd)
    assert torch.equal(dst(x), src(x))
    assert torch.equal(dst(x.to(torch.bfloat16)), src(x.to(torch.bfloat16)))
    assert torch.equal(dst.dequantize(), src.dequantize())


def test_module_to_dtype_keeps_fp16_params() -> None:
    ql = QuantLinear.from_linear(_linear(), "int4-g64")
    x = torch.randn(2, N_IN)
    ref = ql(x)
    model = nn.Sequential(ql).to(torch.bfloat16)
    assert ql.scales.dtype == torch.float16 and ql.zeros.dtype == torch.float16
    assert ql.packed.dtype == torch.uint8 and ql.bias is not None and ql.bias.dtype == torch.bfloat16
    assert _rel(model(x.to(torch.bfloat16)), ref) < 1e-2
    ql.float()
    assert ql.scales.dtype == torch.float16 and ql.bias is not None and ql.bias.dtype == torch.float32


def test_extra_repr_and_attributes() -> None:
    ql = QuantLinear.from_linear(_linear(), "int2-g32-hqq")
    assert ql.in_features == N_IN and ql.out_features == N_OUT
    assert ql.qtype == QType(2, 32, "hqq")
    assert "qtype=int2-g32-hqq" in repr(ql)
    assert "in_features=512, out_features=256, bias=True" in repr(ql)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), "int4-g64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not divisible by group size 64"):
        QuantLinear.from_linear(nn.Linear(100, 32), "int4-g64")
    with pytest.raises(ValueError, match="unsupported bits 5"):
        QuantLinear.from_linear(_linear(), "int5-g64")
    ql = QuantLinear.from_linear(_linear(), "int4-g64")
    with pytest.raises(ValueError, match="bias must be"):
        QuantLinear(ql.quantized(), torch.zeros(3))
    with pytest.raises(ValueError, match="last dim 512"):
        ql(torch.randn(2, 100))
