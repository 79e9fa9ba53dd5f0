"""Read GPTQ checkpoints (GPTQModel / AutoGPTQ layout) into moe-local's quantized tensors.

A GPTQ linear ``[O, I]`` is stored as four tensors next to where its ``weight`` would be:

* ``qweight`` ``[I * bits / 32, O]`` int32: codes packed along the INPUT dim, ``32 / bits`` per word,
  code ``j`` of a word in bits ``[bits * j, bits * (j + 1))`` (3-bit: 32 codes in 3 words, see
  ``pack_rows``);
* ``qzeros`` ``[G, O * bits / 32]`` int32: integer zero points packed the same way along the OUTPUT dim;
* ``scales`` ``[G, O]`` fp16;
* ``g_idx`` ``[I]`` int32: the group of each input channel (``i // group_size`` without act-order).

``W_hat[o, i] = (q[o, i] - zero[o, g]) * scale[o, g]`` with ``g = g_idx[i]``: the moe-local convention
with an integer zero, so a GPTQ tensor maps onto a ``QuantizedTensor`` exactly. Checkpoint format
``gptq`` (v1) stores ``zero - 1``: GPTQModel subtracts 1 from every field of a whole 32-bit word for
2/4/8 bits (a field holding 0 borrows from the next) and field by field, modulo ``2**bits``, for
3 bits; reading adds it back the same way. ``gptq_v2`` stores the zero itself.
Legend: O=out features, I=in features, G=groups (I / group size), E=experts, H=hidden size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_local.errors import CheckpointError, UnsupportedModelError
from moe_local.format.safetensors_io import CheckpointFiles

if TYPE_CHECKING:
    from moe_local.quant import QuantizedTensor

GPTQ_BITS: tuple[int, ...] = (2, 3, 4, 8)
GPTQ_TENSORS: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")
_WORD = 32
_MASK32 = (1 << 32) - 1
_FORMATS = {"gptq": 1, "gptq_v2": 2}


# ----------------------------------------------------------------------------- bit layout


def _check_bits(bits: int) -> None:
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ packing supports bits {GPTQ_BITS}, got {bits}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    words = words & _MASK32
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along dim 0 into int32 words, the GPTQ ``qweight`` layout.

    For 2/4/8 bits, word ``r`` holds rows ``r * k .. r * k + k - 1`` (``k = 32 / bits``), row ``r * k + j``
    in bits ``[bits * j, bits * (j + 1))``. For 3 bits, 32 rows fill 3 words as one little-endian
    96-bit number (row ``j`` in bits ``[3j, 3j + 3)``; rows 10 and 21 straddle two words).

    Args:
        codes: integer tensor ``[N, M]`` with values in ``[0, 2**bits)``; ``N`` a multiple of
            ``32 / bits`` (of 32 for 3 bits).
        bits: 2, 3, 4 or 8.

    Returns:
        int32 ``[N * bits / 32, M]``.

    Raises:
        ValueError: on unsupported bits, a bad ``N`` or a code out of range.
    """
    _check_bits(bits)
    n, m = codes.shape
    block = _WORD if bits == 3 else _WORD // bits
    if n % block:
        raise ValueError(f"{bits}-bit GPTQ packing needs a multiple of {block} values, got {n}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >> bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    if bits != 3:
        c = c.view(n // block, block, m)
        shifts = torch.arange(block, dtype=torch.int64).mul_(bits).view(1, block, 1)
        return _to_int32((c << shifts).sum(dim=1))
    # 3 bits: a block of 32 codes is one 96-bit number split into three words
    c = c.view(n // _WORD, _WORD, m)
    shifts = torch.arange(_WORD, dtype=torch.int64).mul_(3)
    words = []
    for w in range(3):
        lo = w * _WORD
        word = torch.zeros(n // _WORD, m, dtype=torch.int64)
        for j in range(_WORD):
            s = int(shifts[j]) - lo  # position of code j relative to this word
            if -3 < s < _WORD:
                word |= (c[:, j] << s) if s >= 0 else (c[:, j] >> -s)
        words.append(word & _MASK32)
    return _to_int32(torch.stack(words, dim=1).view(n // _WORD * 3, m))


def unpack_rows(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_rows``.

    Args:
        words: int32 ``[W, M]``.
        bits: 2, 3, 4 or 8.
        n: rows to return (default: all ``W * 32 / bits``).

    Returns:
        int64 codes ``[n, M]``.
    """
    _check_bits(bits)
    w, m = words.shape
    u = words.to(torch.int64) & _MASK32
    if bits != 3:
        block = _WORD // bits
        shifts = torch.arange(block, dtype=torch.int64).mul_(bits).view(1, block, 1)
        codes = ((u.view(w, 1, m) >> shifts) & ((1 << bits) - 1)).reshape(w * block, m)
    else:
        if w % 3:
            raise ValueError(f"3-bit GPTQ words come in threes, got {w} rows")
        u = u.view(w // 3, 3, m)
        codes = torch.empty(w // 3, _WORD, m, dtype=torch.int64)
        for j in range(_WORD):
            bit = 3 * j
            word, s = divmod(bit, _WORD)
            v = u[:, word] >> s
            if s > _WORD - 3:  # straddles into the next word
                v = v | (u[:, word + 1] << (_WORD - s))
            codes[:, j] = v & 7
        codes = codes.view(w // 3 * _WORD, m)
    return codes if n is None else codes[:n]


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 (the GPTQ ``qzeros`` layout): ``pack_rows`` of the transpose, transposed."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_cols``: int64 ``[R, n]``."""
    return unpack_rows(words.t(), bits, n).t()


def _v1_word_offset(bits: int) -> int:
    """The per-word constant GPTQModel subtracts from v1 ``qzeros`` (1 in every field) for 2/4/8 bits."""
    return sum(1 << (bits * j) for j in range(_WORD // bits))


def qzeros_to_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer zero points ``[G, O]`` as v1 ``qzeros`` (stored ``zero - 1``), as GPTQModel writes them.

    Zero points of at least 1 store without borrows, so every v1 reader (word-wise or field-wise) agrees.
    """
    if bits == 3:
        return pack_cols((zeros.to(torch.int64) - 1) & 7, bits)
    words = pack_cols(zeros, bits).to(torch.int64) & _MASK32
    return _to_int32(words - _v1_word_offset(bits))


def qzeros_from_checkpoint(qzeros: torch.Tensor, bits: int, version: int, out_features: int) -> torch.Tensor:
    """Integer zero points ``[G, O]`` (int64) from stored ``qzeros``.

    Args:
        qzeros: int32 ``[G, O * bits / 32]``.
        bits: 2, 3, 4 or 8.
        version: 1 for checkpoint format ``gptq`` (stores ``zero - 1``), 2 for ``gptq_v2``.
        out_features: ``O``.

    Returns:
        The zero points.
    """
    if version == 2:
        return unpack_cols(qzeros, bits, out_features)
    if bits == 3:
        return (unpack_cols(qzeros, bits, out_features) + 1) & 7
    words = (qzeros.to(torch.int64) & _MASK32) + _v1_word_offset(bits)
    return unpack_cols(_to_int32(words), bits, out_features)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GptqConfig:
    """The parts of a checkpoint's ``quantization_config`` that reading needs."""

    bits: int  # the default; per-module bits (GPTQModel's ``dynamic``) are read from tensor shapes
    version: int  # 1: checkpoint_format "gptq" (zeros stored minus 1); 2: "gptq_v2"


def _raw_quant_config(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # unreadable: load_config says why, in one line
        return None
    q = data.get("quantization_config") if isinstance(data, dict) else None
    return q if isinstance(q, dict) else None


def is_gptq_checkpoint(folder: str | Path) -> bool:
    """True when ``folder/config.json`` has a ``quantization_config`` whose quant_method is ``gptq``."""
    q = _raw_quant_config(Path(folder))
    method = (q or {}).get("quant_method", (q or {}).get("method"))
    return isinstance(method, str) and method.lower() == "gptq"


def read_gptq_config(folder: str | Path) -> GptqConfig:
    """Parse and check the GPTQ ``quantization_config`` of ``folder/config.json``.

    Raises:
        CheckpointError: not a GPTQ checkpoint, or fields missing.
        UnsupportedModelError: a storage format moe-local does not read (marlin, planar, non-int32 words)
            or a bit width it cannot compute.
    """
    q = _raw_quant_config(Path(folder))
    if q is None or not is_gptq_checkpoint(folder):
        raise CheckpointError(f"{folder}/config.json has no GPTQ quantization_config")
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if fmt not in _FORMATS or q.get("is_marlin_format"):
        raise UnsupportedModelError(
            f"GPTQ checkpoint format {fmt!r} is not supported; moe-local reads gptq and gptq_v2"
        )
    pack_dtype = str(q.get("pack_dtype", "int32")).lower().removeprefix("torch.")
    if pack_dtype != "int32":
        raise UnsupportedModelError(f"GPTQ pack_dtype {pack_dtype!r} is not supported; moe-local reads int32")
    try:
        bits = int(q["bits"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}/config.json: quantization_config lacks bits") from exc
    if bits not in GPTQ_BITS:
        raise UnsupportedModelError(f"{bits}-bit GPTQ is not supported; moe-local reads {GPTQ_BITS} bits")
    return GptqConfig(bits, _FORMATS[fmt])


# ----------------------------------------------------------------------------- tensors


def bits_of(qweight_rows: int, in_features: int, config: GptqConfig) -> int:
    """A linear's bits from its shapes: GPTQModel's ``dynamic`` may give modules their own bit width."""
    bits, rest = divmod(qweight_rows * _WORD, in_features)
    return bits if rest == 0 and bits in GPTQ_BITS else config.bits


def _target_group(in_features: int, group_size: int) -> int:
    """moe-local's group size for a GPTQ group size: the same, or the largest valid one dividing it.

    Per-channel (``-1``) and large groups are re-expressed exactly with smaller groups that repeat
    their scale and zero.
    """
    from moe_local.quant.schemes import VALID_GROUP_SIZES

    span = in_features if group_size <= 0 else group_size
    for g in sorted(VALID_GROUP_SIZES, reverse=True):
        if span % g == 0 and in_features % g == 0:
            return g
    raise UnsupportedModelError(
        f"GPTQ group size {group_size} over {in_features} inputs cannot be expressed with "
        f"moe-local's group sizes {VALID_GROUP_SIZES}"
    )


def gptq_to_quantized(
    tensors: dict[str, torch.Tensor], bits: int, version: int, name: str = ""
) -> QuantizedTensor:
    """Turn one linear's GPTQ tensors into a ``QuantizedTensor`` computing the same ``W_hat``.

    Args:
        tensors: ``qweight``, ``qzeros``, ``scales`` and optionally ``g_idx`` of one linear.
        bits: bits per code.
        version: 1 (``gptq``, zeros stored minus 1) or 2 (``gptq_v2``).
        name: the linear's name, for error messages.

    Returns:
        The ``QuantizedTensor`` ``[O, I]``.

    Raises:
        CheckpointError: shapes that do not fit together.
        UnsupportedModelError: act-order (a permuted ``g_idx``) or a group size that cannot be expressed.
    """
    from moe_local.quant import QType, QuantizedTensor, pack_codes

    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    g_idx = tensors.get("g_idx")
    groups, out_features = scales.shape
    in_features = int(g_idx.numel()) if g_idx is not None else qweight.shape[0] * _WORD // bits
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise UnsupportedModelError(f"{name}: GPTQ qweight/qzeros must be int32 words")
    if qweight.shape[1] != out_features or qweight.shape[0] * _WORD != in_features * bits:
        raise CheckpointError(
            f"{name}: qweight {tuple(qweight.shape)} does not fit {bits}-bit [{out_features}, {in_features}]"
        )
    if in_features % groups or qzeros.shape[0] != groups:
        raise CheckpointError(f"{name}: {groups} groups of scales do not divide {in_features} inputs")
    group_size = in_features // groups
    if g_idx is not None:
        expected = torch.arange(in_features, dtype=torch.int64) // group_size
        if not torch.equal(g_idx.to(torch.int64), expected):
            raise UnsupportedModelError(
                f"{name}: act-order GPTQ (desc_act, a permuted g_idx) is not supported by moe-local"
            )
    target = _target_group(in_features, group_size)
    repeat = group_size // target
    codes = unpack_rows(qweight, bits, in_features).t()  # [O, I]
    zeros = qzeros_from_checkpoint(qzeros, bits, version, out_features).t()  # [O, G]
    scales_t = scales.to(torch.float16).t()  # [O, G]
    if repeat > 1:
        zeros = zeros.repeat_interleave(repeat, dim=1)
        scales_t = scales_t.repeat_interleave(repeat, dim=1)
    packed = pack_codes(codes.to(torch.uint8).contiguous(), bits)
    return QuantizedTensor(
        packed,
        scales_t.contiguous(),
        zeros.to(torch.float16).contiguous(),
        (out_features, in_features),
        QType(bits, target),
    )


def quantized_nbytes(files: CheckpointFiles, prefix: str, bits: int) -> int:
    """Bytes of the ``QuantizedTensor`` that ``gptq_to_quantized`` makes, from tensor headers only."""
    qweight, scales = files.info(f"{prefix}.qweight"), files.info(f"{prefix}.scales")
    groups, out_features = scales.shape
    g_idx = f"{prefix}.g_idx"
    in_features = (
        files.info(g_idx).shape[0] if g_idx in files.key_to_file else qweight.shape[0] * _WORD // bits
    )
    target = _target_group(in_features, in_features // groups)
    return qweight.nbytes + 2 * 2 * out_features * (in_features // target)
