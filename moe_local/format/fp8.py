"""Read FP8 block-quantized checkpoints (DeepSeek-V3/R1, Qwen3-*-FP8, GLM-4.5-FP8, MiniMax-M2).

Their ``quantization_config`` says ``quant_method: "fp8"`` and ``weight_block_size: [bo, bi]``;
each quantized linear ``[O, I]`` is stored as two tensors:

* ``{m}.weight``: ``float8_e4m3fn`` ``[O, I]``;
* ``{m}.weight_scale_inv``: float32 ``[ceil(O / bo), ceil(I / bi)]``, one factor per block (a
  single factor for a per-tensor scale);

and ``W[o, i] = float32(weight[o, i]) * scale_inv[o // bo, i // bi]``, computed in float32 and then
cast: what transformers' ``Fp8Dequantize`` does on a dequantizing load, and, where ``bo`` does not
divide ``O`` (DeepSeek's ``kv_a_proj_with_mqa``, 576 rows), what DeepSeek's own ``weight_dequant``
does (the last block is partial). Tensors without a scale (embeddings, norms, routers, ``lm_head``,
whatever ``modules_to_not_convert`` names) are stored unquantized and read as they are. Fused
3-D experts ``{m}.gate_up_proj`` ``[E, O, I]`` take ``{m}.gate_up_proj_scale_inv`` ``[E, ...]``.
``scale_fmt: "ue8m0"`` scales are powers of two, stored as e8m0 or as uint8 exponents (bias 127).
Static activation scales (``activation_scale``) are dropped, as transformers drops them when it
dequantizes: activations stay in the compute dtype.

``DequantizedFiles`` shows a checkpoint's files as the unquantized tensors they stand for (scales
hidden, each quantized tensor dequantized as it is read), so every reader of Hugging Face
checkpoints (dense weights, experts, quantize, export) reads one tensor, or one expert, at a time
without knowing the publisher's format.
Legend: O=out features, I=in features, E=experts, bo/bi=block rows/columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moe_local.errors import CheckpointError, UnsupportedModelError
from moe_local.format.safetensors_io import CheckpointFiles, SafetensorsFile, TensorInfo

FP8_METHOD = "fp8"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_SCALE_DTYPES = tuple(
    d for d in (torch.float32, torch.bfloat16, torch.float16, torch.uint8, _E8M0) if d is not None
)
_DROPPED = (".activation_scale", ".input_scale")  # static activation scales: unused once dequantized
_BLOCK_MAX = 1 << 16

# The stored tensors of one visible tensor (whole, or one leading index of each) -> that tensor.
Decode = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Packed:
    """How one visible (unquantized) tensor is made from stored ones.

    Attributes:
        info: the tensor as read (its shape and the dtype it is dequantized to).
        keys: the stored tensors it is made of (the first holds the values).
        sliced: for each stored tensor, whether ``tensor[e]`` of the visible tensor reads its ``[e]``
            (False: the whole stored tensor serves every index, e.g. a per-tensor scale).
        decode: stored tensors -> the visible tensor (or its ``[e]`` from their ``[e]``).
    """

    info: TensorInfo
    keys: tuple[str, ...]
    sliced: tuple[bool, ...]
    decode: Decode


class DequantizedFiles:
    """A checkpoint's files as the unquantized tensors they stand for; reads like ``CheckpointFiles``.

    Args:
        stored: the files as stored.
        packed: visible name -> how it is made; its stored tensors are hidden.
        dropped: stored tensors that are neither shown nor used (static activation scales).
        method: the publisher's ``quant_method`` (``"fp8"``, ``"mxfp4"``), for messages.
    """

    def __init__(self, stored: CheckpointFiles, packed: dict[str, Packed], dropped: set[str], method: str):
        self.stored = stored
        self.method = method
        self.folder = stored.folder
        self.files: dict[str, SafetensorsFile] = stored.files  # the shards, for identity checks
        self._packed = packed
        first = {p.keys[0]: name for name, p in packed.items()}
        hidden = {k for p in packed.values() for k in p.keys} | dropped
        self._names = [first.get(k, k) for k in stored.names() if k in first or k not in hidden]
        # which shard holds each visible name (its first stored part): for membership and identity;
        # a dequantized tensor is read through this view, never from that file by its visible name
        self.key_to_file: dict[str, SafetensorsFile] = {
            name: stored.key_to_file[packed[name].keys[0] if name in packed else name] for name in self._names
        }

    def names(self) -> list[str]:
        """Every visible tensor name, in the stored order."""
        return list(self._names)

    def info(self, key: str) -> TensorInfo:
        """Shape and dtype of ``key`` as read (for a dequantized tensor: its unquantized size)."""
        packed = self._packed.get(key)
        return packed.info if packed is not None else self.stored.info(key)

    def read(
        self, key: str, *, drop_cache: bool | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Read tensor ``key`` (dequantized if it is stored quantized), into ``out`` when given.

        ``drop_cache`` is passed to the stored files (None: their default).
        """
        packed = self._packed.get(key)
        if packed is None:
            return self.stored.read(key, drop_cache=drop_cache, out=out)
        t = packed.decode([self.stored.read(k, drop_cache=drop_cache) for k in packed.keys])
        if out is None:
            return t
        if out.dtype != t.dtype or out.numel() != t.numel() or not out.is_contiguous():
            raise ValueError(f"cannot read {t.dtype} {list(t.shape)} into {out.dtype} {list(out.shape)}")
        out.view(t.shape).copy_(t)
        return out.view(t.shape)

    def read_slice(self, key: str, index: int, *, drop_cache: bool | None = None) -> torch.Tensor:
        """Read ``key[index]`` along the first dimension (only that index is read and dequantized)."""
        packed = self._packed.get(key)
        if packed is None:
            return self.stored.read_slice(key, index, drop_cache=drop_cache)
        if not packed.info.shape or not 0 <= index < packed.info.shape[0]:
            raise CheckpointError(f"{self.folder.name}: {key} has no row {index}")
        parts = [
            self.stored.read_slice(k, index, drop_cache=drop_cache)
            if sliced
            else self.stored.read(k, drop_cache=drop_cache)
            for k, sliced in zip(packed.keys, packed.sliced, strict=True)
        ]
        return packed.decode(parts)


def virtual_info(name: str, shape: tuple[int, ...], dtype: torch.dtype, stored: TensorInfo) -> TensorInfo:
    """The ``TensorInfo`` of a tensor made by dequantizing: its shape, dtype and size once read."""
    return TensorInfo(name, dtype, shape, stored.offset, math.prod(shape) * dtype.itemsize)


# ----------------------------------------------------------------------------- FP8


@dataclass(frozen=True)
class Fp8Config:
    """The parts of an FP8 ``quantization_config`` that reading needs.

    Attributes:
        block: ``weight_block_size`` (rows, columns), or None (per-tensor scales only).
    """

    block: tuple[int, int] | None

    @classmethod
    def from_dict(cls, q: dict, where: str) -> Fp8Config:
        """Check and read ``quantization_config``.

        Raises:
            CheckpointError: a field has a wrong value (named).
            UnsupportedModelError: FP4-packed experts (DeepSeek-V4's ``expert_dtype: "fp4"``).
        """
        block = q.get("weight_block_size")
        if block is not None:
            ok = isinstance(block, list | tuple) and len(block) == 2
            if not ok or not all(isinstance(b, int) and not isinstance(b, bool) for b in block):
                raise CheckpointError(f"{where}: weight_block_size = {block!r} must be two integers")
            if not all(1 <= b <= _BLOCK_MAX for b in block):
                raise CheckpointError(
                    f"{where}: weight_block_size = {list(block)} must be from 1 to {_BLOCK_MAX}"
                )
            block = (int(block[0]), int(block[1]))
        fmt = q.get("scale_fmt", "float")
        if fmt not in ("float", "ue8m0"):
            raise CheckpointError(f"{where}: scale_fmt = {fmt!r} must be 'float' or 'ue8m0'")
        if q.get("expert_dtype", "fp8") != "fp8":
            raise UnsupportedModelError(
                f"{where}: expert_dtype = {q.get('expert_dtype')!r}: FP8 checkpoints with FP4-packed "
                "experts are not read yet"
            )
        return cls(block)


def scale_key_of(key: str) -> str:
    """Scale of weight ``key``: ``m.weight`` -> ``m.weight_scale_inv``, ``x`` -> ``x_scale_inv``."""
    return key + "_scale_inv"


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of the block scales of a weight ``[..., O, I]``: ``[..., ceil(O/bo), ceil(I/bi)]``."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _scales_f32(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # e8m0 exponents stored as bytes: the scale is 2 ** (byte - 127)
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype
) -> torch.Tensor:
    """``W = float32(weight) * scale_inv`` per block (or per tensor), cast to ``dtype``.

    Args:
        weight: fp8 ``[..., O, I]``.
        scale_inv: ``[..., ceil(O/bo), ceil(I/bi)]`` (float, e8m0 or uint8 exponents), or one value.
        block: (bo, bi); only needed for block scales.
        dtype: the dtype of the result.

    Returns:
        ``[..., O, I]`` in ``dtype``, each element the float32 product rounded once.

    Raises:
        CheckpointError: the scale's shape fits neither a per-tensor nor this block grid.
    """
    w = weight.to(torch.float32)
    s = _scales_f32(scale_inv)
    if s.numel() == 1:
        return w.mul_(s.reshape(())).to(dtype)
    if block is None or tuple(s.shape) != scale_grid(tuple(w.shape), block):
        raise CheckpointError(
            f"a scale of shape {tuple(s.shape)} does not fit a weight {tuple(w.shape)} in blocks of {block}"
        )
    (rows, cols), (bo, bi) = w.shape[-2:], block
    if rows % bo == 0 and cols % bi == 0:  # whole blocks: one broadcast multiply, no expanded scale
        lead = tuple(w.shape[:-2])
        grid = w.view(*lead, rows // bo, bo, cols // bi, bi)
        grid.mul_(s.view(*lead, rows // bo, 1, cols // bi, 1))
    else:  # a partial last block: scales expanded to the weight's size and cut
        w.mul_(s.repeat_interleave(bo, dim=-2)[..., :rows, :].repeat_interleave(bi, dim=-1)[..., :cols])
    return w.to(dtype)


def _check_pair(files: CheckpointFiles, key: str, scale: str, block: tuple[int, int] | None) -> None:
    """Headers only: an fp8 weight with a scale of a usable dtype and shape, or one clear line."""
    w, s = files.info(key), files.info(scale)
    if w.dtype not in FP8_DTYPES or len(w.shape) < 2:
        raise CheckpointError(
            f"{key} has a scale ({scale}) but is stored as {w.dtype} {list(w.shape)}, not as an fp8 matrix"
        )
    if s.dtype not in _SCALE_DTYPES:
        raise CheckpointError(f"{scale} is stored as {s.dtype}; a block scale must be float32, bf16 or e8m0")
    if math.prod(s.shape) == 1:
        return
    if block is None:
        raise CheckpointError(
            f"{scale} has shape {list(s.shape)} but quantization_config has no weight_block_size"
        )
    want = scale_grid(w.shape, block)
    if tuple(s.shape) != want:
        raise CheckpointError(
            f"{scale} has shape {list(s.shape)}; {key} {list(w.shape)} in blocks of "
            f"{block[0]}x{block[1]} needs {list(want)}"
        )


def fp8_files(files: CheckpointFiles, config: Fp8Config, dtype: torch.dtype) -> DequantizedFiles:
    """Show an FP8 checkpoint's files as unquantized tensors of ``dtype`` (headers checked, nothing read).

    Raises:
        CheckpointError: an fp8 weight without its scale, a scale without its weight, or a scale of
            the wrong dtype or shape (one line naming the tensor).
    """
    names = files.names()
    present = set(names)
    packed: dict[str, Packed] = {}
    dropped = {k for k in names if k.endswith(_DROPPED)}
    block = config.block
    for key in names:
        if key.endswith("_scale_inv") or key in dropped:
            continue
        scale = scale_key_of(key)
        info = files.info(key)
        if scale not in present:
            if info.dtype in FP8_DTYPES:
                raise CheckpointError(f"{key} is stored as {info.dtype} but the checkpoint has no {scale}")
            continue
        _check_pair(files, key, scale, block)
        per_tensor = math.prod(files.info(scale).shape) == 1

        def decode(parts: Sequence[torch.Tensor]) -> torch.Tensor:
            return dequantize_fp8(parts[0], parts[1], block, dtype)

        packed[key] = Packed(
            virtual_info(key, info.shape, dtype, info), (key, scale), (True, not per_tensor), decode
        )
    used = {p.keys[1] for p in packed.values()}
    for key in names:
        if key.endswith("_scale_inv") and key not in used:
            raise CheckpointError(
                f"{key} is a scale but the checkpoint has no {key.removesuffix('_scale_inv')}"
            )
    return DequantizedFiles(files, packed, dropped, FP8_METHOD)
