"""One tensor quantized as a recipe rule says: rtn/hqq (importance-weighted with ``--imatrix``) or gptq.

Shared by the writer (every tensor it writes) and the allocation of choice rules (each candidate
scheme it measures), so both quantize a tensor the same way.
"""

from __future__ import annotations

import torch

from moe_local.errors import MoeLocalError


def quantize_tensor(
    w: torch.Tensor,
    qtype,
    name: str,
    inputs: torch.Tensor | None = None,
    imatrix: bool = False,
    act_order: bool = False,
):
    """Quantize ``w`` [O, I]; GPTQ uses ``inputs`` [n, I] (the calibration tokens it sees).

    With ``imatrix``, rtn and hqq rules weight their rounding by the inputs' mean square per
    channel (``inputs`` may be tokens or an accumulator of them); with ``act_order``, gptq rules
    visit columns by decreasing Hessian diagonal with static groups.
    """
    from moe_local.quant import QuantizedTensor
    from moe_local.quant.api import quantize_scheme

    try:
        method = getattr(qtype, "method", None)
        if imatrix and inputs is not None and method in ("rtn", "hqq"):
            from moe_local.quant.hqq import hqq_quantize
            from moe_local.quant.importance import importance_of, weighted_rtn_quantize

            imp = importance_of(inputs)
            parts = (
                hqq_quantize(w, qtype, importance=imp)
                if method == "hqq"
                else weighted_rtn_quantize(w, qtype, imp)
            )
            shape = (int(w.shape[0]), int(w.shape[1]))
            return QuantizedTensor(parts.packed, parts.scales, parts.zeros, shape, qtype, parts.superscales)
        if method != "gptq":
            return quantize_scheme(w, qtype)
        from moe_local.quant.gptq import HessianAccumulator, gptq_quantize

        if isinstance(inputs, HessianAccumulator):
            acc = inputs
        else:
            acc = HessianAccumulator(w.shape[1])
            acc.add(inputs)
        qt = gptq_quantize(w.float(), acc.hessian(), qtype, act_order=act_order)
        return QuantizedTensor(qt.packed, qt.scales, qt.zeros, qt.shape, qtype)
    except ValueError as exc:
        raise MoeLocalError(f"cannot quantize {name} {tuple(w.shape)} as {qtype}: {exc}") from exc
