"""Group-wise integer quantization of weight matrices: schemes, packing, RTN and HQQ, matmul.

Convention: ``W [O, I]`` is split along ``I`` into groups; each group has an fp16 scale and fp16
(float) zero point; codes ``q = clamp(round(W / scale + zero), 0, 2**bits - 1)``; the reconstruction
is ``W_hat = (q - zero) * scale``.
"""

from moe_local.quant.api import quantize
from moe_local.quant.bnb import (
    BitsandbytesNotInstalledError,
    BnbLinear,
    BnbTensor,
    BnbType,
    parse_bnb_type,
    quantize_bnb,
)
from moe_local.quant.gptq import HessianAccumulator, gptq_quantize
from moe_local.quant.hqq import HqqConfig
from moe_local.quant.linear import QuantLinear
from moe_local.quant.pack import pack_codes, unpack_codes
from moe_local.quant.schemes import QType, bits_per_weight, parse_qtype
from moe_local.quant.tensor import QuantizedTensor

__all__ = [
    "BitsandbytesNotInstalledError",
    "BnbLinear",
    "BnbTensor",
    "BnbType",
    "HessianAccumulator",
    "HqqConfig",
    "QType",
    "QuantLinear",
    "QuantizedTensor",
    "bits_per_weight",
    "gptq_quantize",
    "pack_codes",
    "parse_bnb_type",
    "parse_qtype",
    "quantize",
    "quantize_bnb",
    "unpack_codes",
]
