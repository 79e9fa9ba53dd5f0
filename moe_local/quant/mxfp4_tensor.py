"""``Mxfp4Tensor``: a weight stored as MXFP4 (e2m1 elements, one e8m0 exponent per 32), and its matmul.

The stored tensors are GPT-OSS's own layout for one matrix, so a checkpoint published in MXFP4
is kept byte for byte (``moe_local.format.mxfp4.stored_expert_blocks``):

* ``blocks``: uint8 ``[O, G, 16]``, two e2m1 codes a byte (the low nibble first);
* ``scales``: uint8 ``[O, G]``, the e8m0 exponent of each block (scale ``2 ** (e - 127)``).

``quantize_mxfp4`` makes them from a float weight as the OCP MX spec (v1.0, section 6.3) does.

On the CPU, a few bf16 rows (a decode step) run on the native kernel straight from the blocks
(``native.mxfp4_bf16``: activations rounded to int8 per 64 values as the 4-bit kernel does, the
e2m1 values looked up as integers; about 0.6% relative error, like llama.cpp's MXFP4 x Q8 dot).
Elsewhere (many rows, float32, no native kernel, ``use_kernel=False``) the path is
dequantize-then-matmul with a fast dequantize: each byte indexes a 256-entry table of its two
values in the output dtype (one gather, no shifts or masks), times the block's power of two (exact:
every MXFP4 value is representable in bf16 and float32). That matmul is ``dense_linear`` on the
dequantized weight, so its result is bit-identical to running the source's dequantized weights
(transformers' ``convert_moe_packed_tensors``) as dense ones.
Shapes: [O, I] weight, G = I / 32 blocks per row, [..., I] activations, [..., O] outputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moe_local.quant import native
from moe_local.quant.base import QuantizedWeight, SchemeKind, check_shape
from moe_local.quant.dense import dense_linear
from moe_local.quant.mxfp4_type import (
    E8M0_BIAS,
    FP4_EMAX,
    FP4_VALUES,
    MXFP4_BLOCK,
    Mxfp4Type,
    parse_mxfp4_type,
)
from moe_local.quant.rtn import row_chunks

TENSOR_NAMES: tuple[str, ...] = ("blocks", "scales")
NATIVE_MAX_TOKENS = 32  # rows of bf16 x up to which the native kernel runs (a decode step, small batches)
QUANT_CHUNK_ELEMS = 1 << 22  # weights quantized at once (bounds the float32 temporaries)
# e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6: the midpoints between neighbours, and which of them
# round up (to the even code) under round-to-nearest-even; the others round down
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)
_PAIR_DTYPES = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}
_tables: dict[Any, torch.Tensor] = {}


def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 1]``: for each byte, its (low, high) nibbles' values in ``dtype`` packed as one integer."""
    key = ("pair", dtype, device)
    table = _tables.get(key)
    if table is None:
        values = torch.tensor(FP4_VALUES, dtype=torch.float32)
        pairs = torch.stack([values.repeat(16), values.repeat_interleave(16)], dim=1).to(dtype)
        table = _tables[key] = pairs.contiguous().view(_PAIR_DTYPES[dtype]).reshape(256, 1).to(device)
    return table


def _scale_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 1]``: ``2 ** (e - 127)`` for each exponent byte, in ``dtype`` (255: inf, as ``ldexp``)."""
    key = ("scale", dtype, device)
    table = _tables.get(key)
    if table is None:
        exps = torch.arange(256, dtype=torch.int32) - E8M0_BIAS
        table = torch.ldexp(torch.ones(256, dtype=torch.float32), exps).to(dtype)
        table = _tables[key] = table.reshape(256, 1).to(device)
    return table


def dequantize_blocks(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 ``blocks`` ``[R, G, 16]`` and ``scales`` ``[R, G]`` -> ``[R, G * 32]`` in ``dtype``.

    bf16 and float32 compute in ``dtype`` (exactly); other dtypes in float32, rounded once.
    """
    rows, groups = scales.shape
    work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    w = F.embedding(blocks.reshape(rows, groups * 16).to(torch.int32), _pair_table(work, blocks.device))
    w = w.view(work).view(rows, groups, MXFP4_BLOCK)
    w.mul_(F.embedding(scales.to(torch.int32), _scale_table(work, blocks.device)))  # [R, G, 1]
    return w.view(rows, groups * MXFP4_BLOCK).to(dtype)


class Mxfp4Tensor(QuantizedWeight):
    """A weight ``[O, I]`` in MXFP4: ``W[o, 32 g + j] = e2m1(code) * 2 ** (scales[o, g] - 127)``.

    Attributes:
        blocks: ``[O, I / 32, 16]`` uint8 codes, two a byte, the low nibble first.
        scales: ``[O, I / 32]`` uint8 e8m0 exponents.
        shape: ``(O, I)``.
        mtype: the scheme.
    """

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], mtype: Mxfp4Type):
        """Check and keep the tensors (not copied).

        Raises:
            ValueError: a scheme that is not ``Mxfp4Type``, ``I`` not a multiple of 32, or tensors of
                the wrong dtype, shape or device.
        """
        if not isinstance(mtype, Mxfp4Type):
            raise ValueError(f"mtype must be an Mxfp4Type, got {type(mtype).__name__}")
        self.shape = check_shape(shape)
        self.mtype = mtype
        o, i = self.shape
        if i % MXFP4_BLOCK:
            raise ValueError(f"in features I={i} is not a multiple of the mxfp4 block of {MXFP4_BLOCK}")
        g = i // MXFP4_BLOCK
        for name, t, want in (("blocks", blocks, (o, g, MXFP4_BLOCK // 2)), ("scales", scales, (o, g))):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or tuple(t.shape) != want:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be torch.uint8 {want} for mxfp4 {self.shape}, got {got}")
        if blocks.device != scales.device:
            raise ValueError("blocks and scales must be on the same device")
        self.blocks = blocks
        self.scales = scales
        self._kernel: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"Mxfp4Tensor(shape={self.shape}, device={self.device})"

    @property
    def scheme(self) -> Mxfp4Type:
        """The scheme, ``mtype``."""
        return self.mtype

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self.blocks.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"blocks": [O, G, 16] uint8, "scales": [O, G] uint8}`` (not copies)."""
        return {"blocks": self.blocks, "scales": self.scales}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: Mxfp4Type | str
    ) -> Mxfp4Tensor:
        """Rebuild from ``tensors()`` output (sharing memory).

        Raises:
            ValueError: missing or extra keys, or tensors that do not fit ``shape``.
        """
        if not isinstance(tensors, dict) or set(tensors) != set(TENSOR_NAMES):
            got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
            raise ValueError(f"mxfp4 expects tensors {list(TENSOR_NAMES)}, got {got}")
        mtype = parse_mxfp4_type(scheme) if isinstance(scheme, str) else scheme
        return cls(tensors["blocks"], tensors["scales"], tuple(shape), mtype)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize output rows ``[start, end)`` into ``dtype`` (``[end - start, I]``).

        Raises:
            ValueError: when the range is not inside ``[0, O]``.
        """
        if not 0 <= start <= end <= self.shape[0]:
            raise ValueError(f"row range [{start}, {end}) is outside [0, {self.shape[0]})")
        return dequantize_blocks(self.blocks[start:end], self.scales[start:end], dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the whole weight: ``W_hat`` ``[O, I]`` in ``dtype``."""
        return self.dequantize_rows(0, self.shape[0], dtype)

    def _native_ok(self, x2: torch.Tensor, use_kernel: bool | None) -> bool:
        """Whether ``x2`` runs on the native MXFP4 kernel (see the module docstring)."""
        if use_kernel is False or x2.dtype != torch.bfloat16 or self.device.type != "cpu":
            return False
        if self.shape[1] % 64 or not native.available():
            return False
        return bool(use_kernel) or x2.shape[0] <= NATIVE_MAX_TOKENS

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, *, use_kernel: bool | None = None
    ) -> torch.Tensor:
        """Compute ``x @ W_hat.T + bias``: on the native kernel, or dequantized then ``dense_linear``.

        ``dense_linear`` runs few bf16 rows on the CPU on the native bf16 kernel and many through a
        float32 GEMM; the result equals the dense model's on the dequantized weight, bit for bit.

        Args:
            x: activations ``[..., I]`` (float dtype, same device as the weight).
            bias: optional ``[O]``, cast to ``x.dtype``.
            use_kernel: None: the native kernel for at most ``NATIVE_MAX_TOKENS`` bf16 rows on the
                CPU; True: at any row count; False: always the exact dequantize path.

        Returns:
            ``[..., O]`` in ``x.dtype``.

        Raises:
            ValueError: when ``x`` is not a float tensor with last dim ``I`` on the weight's device,
                or ``bias`` is not ``[O]``.
        """
        self._check_linear_args(x, bias)
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the weight is on {self.device}")
        o, i = self.shape
        with torch.no_grad():
            x2 = x.detach().reshape(-1, i)
            b = None if bias is None else bias.detach().to(x2.dtype)
            if x2.shape[0] == 0:
                out = x2.new_zeros(0, o) if b is None else x2.new_zeros(0, o) + b
            elif self._native_ok(x2, use_kernel):
                out = native.mxfp4_bf16(x2, self.blocks, self.scales, self.shape)
                out = out if b is None else out + b
            else:
                out = dense_linear(x2, self.dequantize(x2.dtype), b)
        return out.reshape(*x.shape[:-1], o)


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Scaled float32 values -> e2m1 codes (uint8): nearest, ties to even, saturating at 6."""
    mag = v.abs()
    code = torch.bucketize(mag, torch.tensor(_MIDPOINTS, device=v.device))  # ties go down
    for tie in _TIES_UP:
        code += mag == tie
    code = code.to(torch.uint8)
    code |= torch.signbit(v).to(torch.uint8) << 3
    return code


def quantize_mxfp4(w: torch.Tensor, mtype: Mxfp4Type | str | None = None) -> Mxfp4Tensor:
    """Quantize a float weight to MXFP4 as the OCP MX spec does.

    Per block of 32 along ``I``: the shared exponent is ``X = floor(log2(max |v|)) - 2`` (2 is the
    largest e2m1 exponent), clamped to the e8m0 range ``[-127, 127]`` (an all-zero block takes
    -127); each element is ``v / 2 ** X`` rounded to the nearest e2m1 value, ties to even, values
    beyond 6 saturating to +-6; the sign is kept (``-0.0`` as code 8).

    Args:
        w: ``[O, I]`` float weight, ``I`` a multiple of 32 (not modified).
        mtype: the scheme (or its name); None for ``Mxfp4Type()``.

    Returns:
        The quantized weight on ``w``'s device.

    Raises:
        ValueError: a non-2-D, empty, non-float or non-finite weight, or ``I`` not a multiple of 32.
    """
    mtype = Mxfp4Type() if mtype is None else parse_mxfp4_type(mtype) if isinstance(mtype, str) else mtype
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2 or w.numel() == 0:
        got = (w.dtype, tuple(w.shape)) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight must be a non-empty 2-D floating-point tensor [out, in], got {got}")
    o, i = (int(d) for d in w.shape)
    if i % MXFP4_BLOCK:
        raise ValueError(f"in features I={i} is not a multiple of the mxfp4 block of {MXFP4_BLOCK}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has NaN or infinite values")
    g = i // MXFP4_BLOCK
    blocks = torch.empty(o, g, MXFP4_BLOCK // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(o, g, dtype=torch.uint8, device=w.device)
    for start, end in row_chunks(o, i, QUANT_CHUNK_ELEMS):
        v = w[start:end].detach().to(torch.float32).reshape(end - start, g, MXFP4_BLOCK)
        amax = v.abs().amax(dim=-1)
        _, exp = torch.frexp(amax)  # amax = m * 2 ** exp, m in [0.5, 1): floor(log2 amax) = exp - 1
        shared = torch.where(amax > 0, exp - 1 - FP4_EMAX, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
        scaled = torch.ldexp(v, (-shared).unsqueeze(-1))  # exact: a power of two within float32's range
        codes = _round_e2m1(scaled).view(end - start, g, MXFP4_BLOCK // 2, 2)
        blocks[start:end] = codes[..., 0] | (codes[..., 1] << 4)
        scales[start:end] = (shared + E8M0_BIAS).to(torch.uint8)
    return Mxfp4Tensor(blocks, scales, (o, i), mtype)


def _quantize_kind(w: torch.Tensor, mtype: Mxfp4Type, **options: Any) -> Mxfp4Tensor:
    """``SchemeKind.quantize`` for mxfp4: it takes no options (None values are ignored)."""
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        raise ValueError(f"mxfp4 takes no quantization options, got {', '.join(given)}")
    return quantize_mxfp4(w, mtype)


MXFP4 = SchemeKind(
    name="mxfp4",
    scheme_type=Mxfp4Type,
    weight_type=Mxfp4Tensor,
    parse=parse_mxfp4_type,
    quantize=_quantize_kind,
)
