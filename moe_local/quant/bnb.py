"""The bitsandbytes scheme kind: ``quantize_bnb`` a float weight to a ``BnbTensor``.

Types (``BnbType``, ``parse_bnb_type``) live in ``bnb_type``, the weight in ``bnb_tensor`` and the
lazy bitsandbytes import and its CPU kernels in ``bnb_backend``; this module quantizes with
bitsandbytes' own functions (``bitsandbytes.functional.quantize_4bit`` / ``int8_vectorwise_quant``)
and defines the ``BITSANDBYTES`` kind the registry holds. Importing it never imports bitsandbytes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# the chunk size is read as bnb_tensor.QUANT_CHUNK_ELEMS: one setting for quantize and dequantize
from moe_local.quant import bnb_tensor
from moe_local.quant.base import SchemeKind
from moe_local.quant.bnb_backend import BNB_FLOAT_DTYPES, BitsandbytesNotInstalledError, import_bnb
from moe_local.quant.bnb_tensor import BnbTensor
from moe_local.quant.bnb_type import NESTED_BLOCKSIZE, BnbType, as_btype, parse_bnb_type
from moe_local.quant.rtn import row_chunks

__all__ = [
    "BITSANDBYTES",
    "BitsandbytesNotInstalledError",
    "BnbTensor",
    "BnbType",
    "parse_bnb_type",
    "quantize_bnb",
]

# Shapes: [O, I] weight; O=out features, I=in features.

FP16_MAX = 65504.0


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        got = (w.dtype, tuple(w.shape)) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight must be a 2-D floating-point tensor [out, in], got {got}")
    if w.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has NaN or infinite values")


def _aligned_row_chunks(o: int, i: int, blocksize: int) -> list[tuple[int, int]]:
    """Row ranges of about ``QUANT_CHUNK_ELEMS`` weights whose starts fall on block boundaries."""
    step = blocksize // math.gcd(i, blocksize)  # rows per whole number of blocks
    rows = max(step, bnb_tensor.QUANT_CHUNK_ELEMS // i // step * step)
    return [(s, min(o, s + rows)) for s in range(0, o, rows)]


def quantize_bnb(w: torch.Tensor, btype: BnbType | str) -> BnbTensor:
    """Quantize a weight matrix with bitsandbytes.

    4-bit: ``bitsandbytes.functional.quantize_4bit`` (run over block-aligned row chunks, which gives
    the same result as one call), with double quantization done as ``compress_statistics=True`` does
    (``quantize_blockwise(absmax - absmax.mean(), blocksize=256)``). int8: ``int8_vectorwise_quant``
    of the fp16 weight, as ``Linear8bitLt`` does.

    Args:
        w: ``[O, I]`` float weight (any float dtype; it is not modified).
        btype: a ``BnbType`` or a type name such as ``"nf4"``.

    Returns:
        The quantized weight on ``w``'s device.

    Raises:
        ValueError: on a non-2-D, empty, non-float or non-finite weight, an fp16 overflow for int8,
            or a bad ``btype``.
        BitsandbytesNotInstalledError: when bitsandbytes cannot be imported.
    """
    btype = as_btype(btype)
    _check_weight(w)
    _, bnbf = import_bnb()
    o, i = w.shape
    w = w.detach()
    if btype.kind == "int8":
        lo, hi = torch.aminmax(w)
        if max(-float(lo), float(hi)) > FP16_MAX:
            raise ValueError(f"int8 quantization goes through fp16: |weight| must be <= {FP16_MAX:g}")
        codes = torch.empty(o, i, dtype=torch.int8, device=w.device)
        scb = torch.empty(o, dtype=torch.float32, device=w.device)
        for start, end in row_chunks(o, i, bnb_tensor.QUANT_CHUNK_ELEMS):
            c, s, _ = bnbf.int8_vectorwise_quant(w[start:end].to(torch.float16).contiguous())
            codes[start:end] = c
            scb[start:end] = s
        return BnbTensor({"weight": codes, "SCB": scb}, (o, i), btype)
    if w.dtype not in BNB_FLOAT_DTYPES:
        w = w.to(torch.float32)
    packed, absmax, quant_map = [], [], None
    for start, end in _aligned_row_chunks(o, i, btype.blocksize):
        q, state = bnbf.quantize_4bit(
            w[start:end].contiguous(), blocksize=btype.blocksize, quant_type=btype.kind
        )
        packed.append(q.reshape(-1))
        absmax.append(state.absmax.float())
        quant_map = state.code
    tensors = {
        "weight": torch.cat(packed).unsqueeze(1),
        "absmax": torch.cat(absmax),
        "quant_map": quant_map.to(torch.float32, copy=True),
    }
    if btype.double_quant:
        offset = tensors["absmax"].mean()
        qabsmax, state2 = bnbf.quantize_blockwise(tensors["absmax"] - offset, blocksize=NESTED_BLOCKSIZE)
        tensors["absmax"] = qabsmax
        tensors["nested_absmax"] = state2.absmax.float()
        tensors["nested_quant_map"] = state2.code.float().clone()
        tensors["nested_offset"] = offset.float().reshape(1)
    return BnbTensor(tensors, (o, i), btype)


def _quantize_kind(w: torch.Tensor, btype: BnbType, **options: Any) -> BnbTensor:
    """``SchemeKind.quantize`` for bitsandbytes: it takes no options (None values are ignored)."""
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        raise ValueError(f"bitsandbytes schemes take no quantization options, got {', '.join(given)}")
    return quantize_bnb(w, btype)


BITSANDBYTES = SchemeKind(
    name="bitsandbytes",
    scheme_type=BnbType,
    weight_type=BnbTensor,
    parse=parse_bnb_type,
    quantize=_quantize_kind,
)
