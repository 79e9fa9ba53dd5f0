"""A SwiGLU expert in one native call gives the values of its three separate steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_local.experts import module as experts_module
from moe_local.experts.weights import ExpertWeights, apply_linear
from moe_local.quant import QType, native, quantize

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")

H, I = 128, 256  # noqa: E741


def _expert(bits: int = 4, group: int = 64) -> ExpertWeights:
    torch.manual_seed(bits)
    gate_up = quantize(torch.randn(2 * I, H) * 0.1, QType(bits, group))
    down = quantize(torch.randn(H, I) * 0.1, QType(bits, group))
    return ExpertWeights(down=down, gate_up=gate_up)


def _separate(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    gate, up = apply_linear(x, w.gate_up).chunk(2, dim=-1)
    return apply_linear(F.silu(gate) * up, w.down)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize(("bits", "group"), [(4, 64), (8, 32), (2, 128)])
def test_the_fused_call_equals_the_separate_steps(rows, bits, group):
    w = _expert(bits, group)
    x = torch.randn(rows, H).bfloat16()
    fused = experts_module._fused_call(x, w)
    assert fused is not None and fused.dtype == torch.bfloat16 and fused.shape == (rows, H)
    want = _separate(x, w)
    # every rounding as the separate calls round; only silu's exp may differ by a float32 ulp
    # (libm against torch's vectorized exp), which moves a bf16 result by one step, rarely
    differ = fused != want
    assert differ.float().mean() <= 0.01
    assert ((fused.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()


def test_what_the_kernel_cannot_take_runs_the_separate_steps():
    w = _expert()
    x = torch.randn(2, H).bfloat16()
    assert experts_module._fused_call(torch.randn(40, H).bfloat16(), w) is None  # many rows: prefill path
    dense = ExpertWeights(down=w.down.dequantize(torch.bfloat16), gate_up=w.gate_up)
    assert experts_module._fused_call(x, dense) is None  # a float weight
    with_bias = ExpertWeights(down=w.down, gate_up=w.gate_up, down_bias=torch.zeros(H, dtype=torch.bfloat16))
    assert experts_module._fused_call(x, with_bias) is None


def test_only_swiglu_families_take_the_fused_call(tiny_checkpoint):
    """Mixtral's experts qualify; GPT-OSS's clamped gate does not."""
    from moe_local.loading.loader import load

    for family, fusable in (("mixtral", True), ("gpt_oss", False)):
        lm = load(tiny_checkpoint(family))
        assert {lm.model.get_submodule(s.name)._fusable for s in lm.sites} == {fusable}
