"""``quantize``: one entry point from a float weight and a scheme to a ``QuantizedTensor``."""

from __future__ import annotations

import torch

from moe_local.quant.hqq import HqqConfig, hqq_quantize
from moe_local.quant.rtn import rtn_quantize
from moe_local.quant.schemes import QType, parse_qtype
from moe_local.quant.tensor import QuantizedTensor

# Shapes: [O, I] weight.  O=out features, I=in features.


def quantize(w: torch.Tensor, qtype: QType | str, *, hqq_config: HqqConfig | None = None) -> QuantizedTensor:
    """Quantize a weight matrix with the scheme's method (``rtn`` or ``hqq``).

    Args:
        w: float weight ``[O, I]`` (any float dtype); ``I`` must be divisible by the group size.
        qtype: a ``QType`` or a scheme name such as ``"int4-g64"`` / ``"int3-g64-hqq"``.
        hqq_config: optimization parameters for the ``hqq`` method (default ``HqqConfig()``).

    Returns:
        The quantized tensor, on ``w``'s device.

    Raises:
        ValueError: on an unsupported scheme, a malformed weight or NaN/inf values.
    """
    qt = parse_qtype(qtype) if isinstance(qtype, str) else qtype
    if not isinstance(qt, QType):
        raise ValueError(f"qtype must be a QType or a scheme name, got {type(qtype).__name__}")
    if qt.method == "gptq":
        raise ValueError("gptq needs calibration data: use moe_local.quant.gptq with a Hessian of the inputs")
    parts = hqq_quantize(w, qt, hqq_config) if qt.method == "hqq" else rtn_quantize(w, qt)
    return QuantizedTensor(parts.packed, parts.scales, parts.zeros, (int(w.shape[0]), int(w.shape[1])), qt)


def parse_scheme(text: str):
    """Parse any stored scheme name: ``int4-g64[-hqq|-gptq]`` or a bitsandbytes ``nf4``/``fp4-b128``/``int8``.

    Returns:
        A ``QType`` or a ``BnbType``.

    Raises:
        ValueError: the name is neither.
    """
    from moe_local.quant.bnb import parse_bnb_type

    try:
        return parse_qtype(text)
    except ValueError as first:
        try:
            return parse_bnb_type(text)
        except ValueError:
            raise first from None


def quantize_scheme(w: torch.Tensor, scheme):
    """Quantize ``w`` [O, I] with a ``QType`` (rtn/hqq) or a ``BnbType`` (bitsandbytes)."""
    from moe_local.quant.bnb import BnbType, quantize_bnb

    if isinstance(scheme, BnbType):
        return quantize_bnb(w, scheme)
    return quantize(w, scheme)


def rebuild(tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme):
    """Rebuild a quantized weight of ``scheme`` from its ``tensors()``."""
    from moe_local.quant.bnb import BnbTensor, BnbType

    if isinstance(scheme, BnbType):
        return BnbTensor.from_tensors(tensors, shape, scheme)
    return QuantizedTensor.from_tensors(tensors, shape, scheme)


def make_linear_module(weight, bias: torch.Tensor | None):
    """A drop-in ``nn.Linear`` module over a quantized weight of either kind."""
    from moe_local.quant.bnb import BnbLinear, BnbTensor
    from moe_local.quant.linear import QuantLinear

    if isinstance(weight, BnbTensor):
        return BnbLinear(weight, bias)
    return QuantLinear(weight, bias)
