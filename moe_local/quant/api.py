"""The entry points code outside ``moe_local.quant`` uses: parse, quantize, rebuild, wrap as a module.

Every function works for any registered scheme kind (see ``moe_local.quant.registry``); ``quantize``
is the group-wise one, with its ``hqq_config``.
"""

from __future__ import annotations

import torch

from moe_local.quant.base import QuantizedWeight
from moe_local.quant.groupwise import quantize
from moe_local.quant.linear import QuantLinear
from moe_local.quant.registry import parse_scheme, quantize_scheme, rebuild

__all__ = ["make_linear_module", "parse_scheme", "quantize", "quantize_scheme", "rebuild"]


def make_linear_module(weight: QuantizedWeight, bias: torch.Tensor | None) -> QuantLinear:
    """A drop-in ``nn.Linear`` module over a quantized weight of any kind.

    Args:
        weight: the quantized weight ``[O, I]``.
        bias: optional ``[O]`` float bias.

    Returns:
        The ``QuantLinear``.

    Raises:
        ValueError: when ``weight`` is not a ``QuantizedWeight`` or ``bias`` is not a float ``[O]`` tensor.
    """
    return QuantLinear(weight, bias)
