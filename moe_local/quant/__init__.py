"""Quantized weight matrices: group-wise integer (RTN, HQQ, GPTQ), bitsandbytes and MXFP4, and their matmul.

Every quantized weight is a ``QuantizedWeight`` (``QuantizedTensor`` for group-wise schemes,
``BnbTensor`` for bitsandbytes, ``Mxfp4Tensor`` for MXFP4); ``QuantLinear`` is the ``nn.Linear``
over any of them; the registry (``parse_scheme``, ``quantize_scheme``, ``register_scheme``) maps a
scheme to its kind.

Group-wise convention: ``W [O, I]`` is split along ``I`` into groups; each group has an fp16 scale and
fp16 (float) zero point; codes ``q = clamp(round(W / scale + zero), 0, 2**bits - 1)``; the
reconstruction is ``W_hat = (q - zero) * scale``.
"""

from moe_local.quant.base import QuantizedWeight, Scheme, SchemeKind
from moe_local.quant.bnb import quantize_bnb
from moe_local.quant.bnb_backend import BitsandbytesNotInstalledError
from moe_local.quant.bnb_tensor import BnbTensor
from moe_local.quant.bnb_type import BnbType, parse_bnb_type
from moe_local.quant.gptq import HessianAccumulator, gptq_quantize
from moe_local.quant.groupwise import quantize
from moe_local.quant.hqq import HqqConfig
from moe_local.quant.linear import QuantLinear
from moe_local.quant.mxfp4_tensor import Mxfp4Tensor, quantize_mxfp4
from moe_local.quant.mxfp4_type import Mxfp4Type, parse_mxfp4_type
from moe_local.quant.pack import pack_codes, unpack_codes
from moe_local.quant.registry import (
    kind_of,
    parse_scheme,
    quantize_scheme,
    rebuild,
    register_scheme,
    scheme_kinds,
)
from moe_local.quant.schemes import QType, bits_per_weight, parse_qtype
from moe_local.quant.tensor import QuantizedTensor

__all__ = [
    "BitsandbytesNotInstalledError",
    "BnbTensor",
    "BnbType",
    "HessianAccumulator",
    "HqqConfig",
    "Mxfp4Tensor",
    "Mxfp4Type",
    "QType",
    "QuantLinear",
    "QuantizedTensor",
    "QuantizedWeight",
    "Scheme",
    "SchemeKind",
    "bits_per_weight",
    "gptq_quantize",
    "kind_of",
    "pack_codes",
    "parse_bnb_type",
    "parse_mxfp4_type",
    "parse_qtype",
    "parse_scheme",
    "quantize",
    "quantize_bnb",
    "quantize_mxfp4",
    "quantize_scheme",
    "rebuild",
    "register_scheme",
    "scheme_kinds",
    "unpack_codes",
]
