"""Attention of half-precision models on the CPU, computed in float32.

torch's CPU ``scaled_dot_product_attention`` in bfloat16 is slow without AVX-512 BF16: a decode step
of one query over 550 cached keys (8 heads, 2 KV heads, head size 128) took 1.4 ms, against 0.23 ms
for the same call in float32 including the conversions (2-core AVX2 machine). With a long prompt
that was a quarter of a 4-bit decode step. ``use_float32_attention`` points such a model's
attention at transformers' own sdpa function with the inputs widened to float32 and the output
rounded back (more exact, not less: every product and sum is float32), under its own registered
name so that other models in the process keep torch's path.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "moe_local_sdpa_fp32"
_HALF = (torch.bfloat16, torch.float16)


def _float32_sdpa(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' sdpa attention, in float32 for half-precision CPU inputs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or query.dtype not in _HALF:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    out, weights = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), mask, *args, **kwargs
    )
    return out.to(query.dtype), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _float32_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa takes, built as for sdpa


def use_float32_attention(model: nn.Module) -> bool:
    """Compute ``model``'s sdpa attention in float32 when it runs in half precision on the CPU.

    Args:
        model: a loaded model (its parameters' device and dtype decide).

    Returns:
        True when switched; False for other devices, dtypes or attention implementations.
    """
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return False
    if getattr(model, "dtype", param.dtype) not in _HALF:
        return False
    from transformers import PretrainedConfig

    configs = [getattr(m, "config", None) for m in model.modules()]
    configs += [c.get_text_config() for c in configs if isinstance(c, PretrainedConfig)]
    targets = {
        id(c): c
        for c in configs
        if isinstance(c, PretrainedConfig) and getattr(c, "_attn_implementation", None) == "sdpa"
    }
    if not targets:
        return False
    _register()
    for config in targets.values():
        config._attn_implementation = NAME
    return True
