"""Half-precision models on the CPU compute their sdpa attention in float32, under their own name."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from moe_local.config import LoadOptions
from moe_local.loading import attention
from moe_local.loading.loader import load


def test_the_float32_attention_is_sdpa_on_widened_inputs():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 3, 16).bfloat16()
    k, v = torch.randn(1, 2, 9, 16).bfloat16(), torch.randn(1, 2, 9, 16).bfloat16()
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    got, _ = attention._float32_sdpa(module, q, k, v, None, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, scaling=0.25)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    full, _ = attention._float32_sdpa(module, q.float(), k.float(), v.float(), None, scaling=0.25)
    assert torch.equal(full, want)  # float32 inputs: transformers' function as it is


def test_only_half_precision_cpu_models_switch(tiny_checkpoint):
    folder = tiny_checkpoint("mixtral")
    half = load(folder, LoadOptions(dtype="bfloat16"))
    assert half.model.config._attn_implementation == attention.NAME
    full = load(folder, LoadOptions(dtype="float32"))
    assert full.model.config._attn_implementation == "sdpa"  # the exact reference path stays
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = half.model(input_ids=ids).logits.float(), full.model(input_ids=ids).logits
    assert (a - b).abs().max() <= 0.05 * b.abs().max() + 0.05  # bf16 weights and activations only
