"""The ``mxfp4`` scheme: OCP MX quantization, dequantization (transformers' bit for bit), matmul."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_local.errors import MoeLocalError
from moe_local.format.mxfp4 import dequantize_mxfp4
from moe_local.quant import (
    Mxfp4Tensor,
    Mxfp4Type,
    QuantLinear,
    kind_of,
    parse_scheme,
    quantize_mxfp4,
    quantize_scheme,
    rebuild,
)
from moe_local.quant.dense import dense_linear
from moe_local.recipes import Recipe, Rule

MX = Mxfp4Type()
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # magnitudes by code; code 2k has an even mantissa


def _spec_code(x: float) -> int:
    """One element by the OCP MX spec: nearest e2m1 magnitude, ties to the even code, saturating at 6."""
    mag = min(abs(x), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1[c] - mag), c % 2))  # a tie prefers the even code
    return best | (8 if math.copysign(1.0, x) < 0 else 0)


def _spec_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's algorithm written out element by element: blocks [O, G, 16] and scales [O, G]."""
    o, i = w.shape
    blocks = torch.zeros(o, i // 32, 16, dtype=torch.uint8)
    scales = torch.zeros(o, i // 32, dtype=torch.uint8)
    for r in range(o):
        for g in range(i // 32):
            vals = [float(v) for v in w[r, 32 * g : 32 * g + 32]]
            amax = max(abs(v) for v in vals)
            x = -127 if amax == 0 else max(-127, min(127, math.floor(math.log2(amax)) - 2))
            scales[r, g] = x + 127
            codes = [_spec_code(v / 2.0**x) for v in vals]
            for j in range(16):
                blocks[r, g, j] = codes[2 * j] | (codes[2 * j + 1] << 4)
    return blocks, scales


def _weight(o: int = 6, i: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g) * torch.logspace(-3, 2, o).unsqueeze(1)
    w[0, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 4)  # every tie, a saturation
    w[0, 32:] = 0.0  # an all-zero block
    w[1, 32:] = -0.0
    w[2, :32] = 1e-40  # subnormal: the exponent clamps at -127
    return w


def test_quantize_matches_the_spec_byte_for_byte():
    w = _weight()
    want_blocks, want_scales = _spec_quantize(w)
    q = quantize_mxfp4(w)
    assert torch.equal(q.scales, want_scales)
    assert torch.equal(q.blocks, want_blocks)
    assert q.nbytes * 8 / w.numel() == Mxfp4Type().bits_per_weight == 4.25
    # the ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4, 7 -> 6 (times 2**0)
    assert q.dequantize()[0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    assert int(q.scales[2, 0]) == 0 and int(q.scales[0, 1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_the_checkpoint_readers_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (10, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (10, 3), dtype=torch.uint8, generator=g)
    q = Mxfp4Tensor(blocks, scales, (10, 96), Mxfp4Type())
    want = dequantize_mxfp4(blocks, scales, dtype).t()  # transformers' convert_moe_packed_tensors
    assert torch.equal(q.dequantize(dtype), want)
    assert torch.equal(q.dequantize_rows(3, 7, dtype), want[3:7])


def test_a_dequantized_mxfp4_weight_round_trips_losslessly():
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (16, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, (16, 4), dtype=torch.uint8, generator=g)
    w = Mxfp4Tensor(blocks, scales, (16, 128), Mxfp4Type()).dequantize()
    assert torch.equal(quantize_mxfp4(w).dequantize(), w)
    assert torch.equal(quantize_mxfp4(w.bfloat16()).dequantize(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_linear_is_dense_linear_on_the_dequantized_weight(dtype, rows):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    q = quantize_mxfp4(w)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(4)).to(dtype)
    bias = torch.randn(48).to(dtype)
    dense = q.dequantize(dtype)
    assert torch.equal(q.linear(x), dense_linear(x, dense))
    assert torch.equal(q.linear(x, bias), dense_linear(x, dense, bias))
    assert torch.equal(q.linear(x.view(1, rows, 96)), dense_linear(x, dense).view(1, rows, 48))
    assert q.linear(x[:0]).shape == (0, 48)
    ref = F.linear(x.float(), dense.float())
    assert float((q.linear(x).float() - ref).abs().max()) <= 0.02 * float(ref.abs().max())


def test_scheme_registry_rebuild_and_quant_linear():
    scheme = parse_scheme(" MXFP4 ")
    assert scheme == Mxfp4Type() and scheme.full_name == "mxfp4"
    assert kind_of(scheme).weight_type is Mxfp4Tensor
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    q = quantize_scheme(w, "mxfp4")
    back = rebuild({k: v.clone() for k, v in q.tensors().items()}, q.shape, "mxfp4")
    assert torch.equal(back.dequantize(), q.dequantize())
    lin = nn.Linear(64, 32)
    ql = QuantLinear.from_linear(lin, "mxfp4")
    x = torch.randn(3, 64)
    assert torch.equal(ql(x), F.linear(x, ql.dequantize(), lin.bias.detach()))
    assert set(ql.state_dict()) == {"blocks", "scales", "bias"} and "qtype=mxfp4" in repr(ql)
    with pytest.raises(ValueError, match="takes no quantization options"):
        quantize_scheme(w, "mxfp4", hqq_config=object())


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: quantize_mxfp4(torch.randn(4, 48)), "multiple of the mxfp4 block"),
        (lambda: quantize_mxfp4(torch.tensor([[float("nan")] * 32])), "NaN or infinite"),
        (lambda: quantize_mxfp4(torch.zeros(4, 32, dtype=torch.int32)), "floating-point"),
        (
            lambda: Mxfp4Tensor(torch.zeros(4, 1, 16), torch.zeros(4, 1, dtype=torch.uint8), (4, 32), MX),
            "blocks must",
        ),
        (lambda: rebuild({"blocks": torch.zeros(4, 1, 16, dtype=torch.uint8)}, (4, 32), "mxfp4"), "expects"),
        (lambda: quantize_mxfp4(torch.randn(4, 32)).linear(torch.randn(2, 16)), "last dim 32"),
        (lambda: parse_scheme("mxfp4-g64"), "cannot parse"),
    ],
)
def test_bad_inputs_are_one_line_value_errors(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_recipe_rules_take_mxfp4():
    recipe = Recipe("t", "", (Rule("*.experts.*", Mxfp4Type(), 1), Rule("*", parse_scheme("int4-g64"), 2)))
    assert recipe.scheme_for("model.layers.0.mlp.experts.down", 64) == Mxfp4Type()
    assert recipe.scheme_for("model.layers.0.mlp.experts.down", 48) is None  # no whole blocks: kept
    assert recipe.fallback_for("model.layers.0.mlp.experts.down", 48) == Mxfp4Type()
    assert recipe.scheme_for("model.lm_head.weight", 64) is None  # protected, as for any 4-bit rule
    hqq = recipe.with_method("hqq")
    assert hqq.rules[0].scheme == Mxfp4Type() and hqq.rules[1].scheme.method == "hqq"
    with pytest.raises(MoeLocalError, match="do not apply to mxfp4 experts"):
        recipe.with_experts(bits=2)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 32])
def test_few_bf16_rows_run_on_the_native_kernel_within_the_int8_rounding(rows):
    """The kernel rounds activations to int8 per 64 values: within 1.5e-2 of the exact product."""
    from moe_local.quant import native

    if not native.available():
        pytest.skip("the native kernel is not built here")
    torch.manual_seed(rows)
    q = quantize_mxfp4(torch.randn(96, 320) * 0.05)
    x = torch.randn(rows, 320).bfloat16()
    exact = x.float() @ q.dequantize().T
    got = q.linear(x)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - exact).norm() / exact.norm()) < 1.5e-2
    assert torch.equal(q.linear(x, use_kernel=False), (x @ q.dequantize(torch.bfloat16).T))
    assert not torch.equal(got, q.linear(x, use_kernel=False))  # it did take the kernel
