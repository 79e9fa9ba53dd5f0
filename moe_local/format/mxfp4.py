"""Read MXFP4 checkpoints (GPT-OSS-20B/120B): experts stored as FP4 blocks with power-of-two scales.

``quantization_config`` says ``quant_method: "mxfp4"``; each fused expert projection ``{m}`` of
shape ``[E, R, C]`` in rows (R: 2I for ``gate_up_proj``, H for ``down_proj``) is stored as

* ``{m}_blocks``: uint8 ``[E, R, G, 16]``, two FP4 (e2m1) codes per byte, the low nibble first,
  ``G = C / 32`` blocks of 32 values per row;
* ``{m}_scales``: uint8 ``[E, R, G]``, one e8m0 exponent per block, biased by 127;

and ``W[e, r, 32 g + j] = fp4(code) * 2 ** (scale[e, r, g] - 127)``, transposed to the layout the
model keeps (``gate_up_proj`` ``[E, H, 2I]``, ``down_proj`` ``[E, I, H]``): exactly transformers'
``convert_moe_packed_tensors`` (the value table in the target dtype, then ``ldexp``), one expert at
a time. Biases, attention, routers and embeddings are stored unquantized and read as they are.
``stored_expert_blocks`` gives one expert's blocks and scales as stored, for ``quantize`` to keep
them as MXFP4 byte for byte (the ``mxfp4`` scheme, ``moe_local.quant.mxfp4_tensor``).
Legend: E=experts, R=rows, C=columns, G=blocks per row, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moe_local.errors import CheckpointError
from moe_local.format.fp8 import DequantizedFiles, Packed, virtual_info
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.quant.mxfp4_type import FP4_VALUES

MXFP4_METHOD = "mxfp4"
BLOCK = 32  # values per scale
_FUSED_PARTS = {"gate_up_proj": "gate_up", "up_proj": "up", "down_proj": "down"}  # key -> expert part
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_SCALE_DTYPES = tuple(d for d in (torch.uint8, _E8M0) if d is not None)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP4 blocks and their exponents -> the weight, transposed as the model keeps it.

    Args:
        blocks: uint8 ``[..., R, G, 16]`` (one expert ``[R, G, 16]``, or all ``[E, R, G, 16]``).
        scales: ``[..., R, G]`` e8m0 exponents (uint8, or float8_e8m0fnu read as its bytes).
        dtype: the dtype of the result.

    Returns:
        ``[..., G * 32, R]`` in ``dtype``.

    Raises:
        CheckpointError: the shapes do not fit each other.
    """
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != BLOCK // 2:
        raise CheckpointError(
            f"MXFP4 blocks {list(blocks.shape)} do not fit scales {list(scales.shape)} "
            f"(expected [..., R, G, {BLOCK // 2}] and [..., R, G])"
        )
    *lead, groups, width = blocks.shape
    packed = blocks.reshape(-1, width)
    exp = scales.view(torch.uint8).reshape(-1, 1).to(torch.int32) - 127
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    out = torch.empty(packed.shape[0], width * 2, dtype=dtype)
    out[:, 0::2] = lut[(packed & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(packed >> 4).to(torch.int)]
    torch.ldexp(out, exp, out=out)  # the same op as transformers: value * 2 ** exp, rounded to dtype
    return out.view(*lead, groups * width * 2).transpose(-1, -2).contiguous()


def mxfp4_files(files: CheckpointFiles, dtype: torch.dtype) -> DequantizedFiles:
    """Show an MXFP4 checkpoint's files with each ``{m}_blocks``/``{m}_scales`` pair as ``{m}`` in ``dtype``.

    Raises:
        CheckpointError: blocks without scales (or the reverse), or a pair of wrong dtypes or
            shapes (one line naming the tensor); headers only, nothing is read.
    """
    names = files.names()
    present = set(names)
    packed: dict[str, Packed] = {}
    for key in names:
        if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" not in present:
            raise CheckpointError(f"{key} has no {key.removesuffix('_scales')}_blocks beside it")
        if not key.endswith("_blocks"):
            continue
        name = key.removesuffix("_blocks")
        scale = name + "_scales"
        if scale not in present:
            raise CheckpointError(f"{key} has no {scale} beside it")
        b, s = files.info(key), files.info(scale)
        if b.dtype != torch.uint8 or len(b.shape) != 4 or b.shape[-1] != BLOCK // 2:
            raise CheckpointError(
                f"{key} is {b.dtype} {list(b.shape)}; MXFP4 blocks are uint8 [experts, rows, groups, 16]"
            )
        if s.dtype not in _SCALE_DTYPES or tuple(s.shape) != tuple(b.shape[:-1]):
            raise CheckpointError(
                f"{scale} is {s.dtype} {list(s.shape)}; "
                f"{key} {list(b.shape)} needs uint8 {list(b.shape[:-1])}"
            )
        experts, rows, groups, width = b.shape
        shape = (experts, groups * width * 2, rows)

        def decode(parts: Sequence[torch.Tensor]) -> torch.Tensor:
            return dequantize_mxfp4(parts[0], parts[1], dtype)

        packed[name] = Packed(virtual_info(name, shape, dtype, b), (key, scale), (True, True), decode)
    return DequantizedFiles(files, packed, set(), MXFP4_METHOD)


def stored_expert_blocks(
    experts: Any, layer: int, expert: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One expert's MXFP4 parts as the publisher stored them, in the ``[out, in]`` layout experts keep.

    A fused projection stored as ``[E, R, G, 16]`` blocks is read as ``[E, C, R]`` and transposed
    (``site.is_transposed``) to the part ``[R, C]``: its blocks' rows are the part's rows as they
    are. Parts read any other way (no transpose) are left out: they are quantized from the
    dequantized floats instead.

    Args:
        experts: the checkpoint's expert reader (``HfExperts``; anything else gives ``{}``).
        layer: the layer.
        expert: the expert.

    Returns:
        ``{part: (blocks [R, G, 16] uint8, scales [R, G] uint8)}``; empty for a checkpoint that is
        not MXFP4.
    """
    files = getattr(experts, "files", None)
    if getattr(files, "method", None) != MXFP4_METHOD or layer not in getattr(experts, "keys", {}):
        return {}
    if not experts.sites[layer].is_transposed:
        return {}
    stored = files.stored
    present = set(stored.names())
    out = {}
    for pname, key in experts.keys[layer].fused.items():
        part = _FUSED_PARTS.get(pname)
        if part is None or key + "_blocks" not in present or key + "_scales" not in present:
            continue
        blocks = stored.read_slice(key + "_blocks", expert, drop_cache=experts.drop_cache)
        scales = stored.read_slice(key + "_scales", expert, drop_cache=experts.drop_cache)
        out[part] = (blocks.contiguous(), scales.view(torch.uint8).contiguous())
    return out
