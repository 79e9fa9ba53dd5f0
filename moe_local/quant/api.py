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

__all__ = ["make_linear_module", "parse_scheme", "prepare_kernel", "quantize", "quantize_scheme", "rebuild"]


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


def prepare_kernel(weight: object, dtype: torch.dtype) -> bool:
    """Build a quantized weight's CPU kernel layout now, as its first ``dtype`` call would.

    Readers and loaders call it on weights that will compute on this CPU, so that the first forward
    finds them converted (and holding one copy, see ``QuantizedTensor``); never on weights bound for
    a device copy, whose packed codes the copy reads.

    Args:
        weight: a ``QuantizedWeight``, a ``QuantLinear``, or anything else (a dense tensor, None).
        dtype: the activations' dtype.

    Returns:
        True when the weight will run on a kernel for ``dtype``; False (nothing done) otherwise.
    """
    return isinstance(weight, QuantizedWeight | QuantLinear) and weight.prepare_kernel(dtype)
