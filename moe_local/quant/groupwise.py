"""The group-wise integer scheme kind: ``quantize`` a float weight to a ``QuantizedTensor``.

Schemes are ``QType`` (``int4-g64``, ``int3-g64-hqq``); the ``rtn`` and ``hqq`` methods need only the
weight, ``gptq`` needs calibration data and goes through ``moe_local.quant.gptq`` instead.
"""

from __future__ import annotations

import torch

from moe_local.quant.base import SchemeKind
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
    shape = (int(w.shape[0]), int(w.shape[1]))
    return QuantizedTensor(parts.packed, parts.scales, parts.zeros, shape, qt, parts.superscales)


GROUPWISE = SchemeKind(
    name="group-wise",
    scheme_type=QType,
    weight_type=QuantizedTensor,
    parse=parse_qtype,
    quantize=quantize,
)
