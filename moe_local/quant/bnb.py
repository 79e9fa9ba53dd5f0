"""bitsandbytes weight types: NF4 / FP4 (blockwise 4-bit) and LLM.int8 (row-wise 8-bit) weights.

A ``BnbTensor`` is a weight ``[O, I]`` quantized with bitsandbytes' own functions
(``bitsandbytes.functional.quantize_4bit`` / ``int8_vectorwise_quant``) and multiplied with its kernels
(``bitsandbytes.matmul_4bit`` / the ``int8_scaled_mm`` op). It round-trips through a flat dict of plain
tensors (``tensors()`` / ``from_tensors``) plus the JSON-able metadata ``shape`` and ``btype.full_name``,
so it can live in the same blobs as ``QuantizedTensor``.

Type names: ``nf4``, ``fp4`` (block size 64), ``nf4-b128`` (other block sizes), ``nf4-dq`` /
``nf4-b128-dq`` (double quantization: the fp32 block absmax values are themselves 8-bit quantized in
blocks of 256), ``int8`` (per-output-row absmax scale, LLM.int8 without outlier decomposition).

bitsandbytes is optional and imported lazily (importing it costs seconds): importing this module never
needs it; quantizing or multiplying without it raises ``BitsandbytesNotInstalledError``.

CPU notes (bitsandbytes 0.50): the fast 4-bit CPU kernel (AVX512-BF16) needs its own weight layout,
which ``linear`` builds from the stored layout on first use and caches (``kernel_cache_nbytes``; about
the size of the packed codes); it computes in bf16 with bf16 block scales. The int8 kernel quantizes
the activations row-wise to int8 too (``torch._int_mm`` on AVX512 CPUs).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.quant.rtn import row_chunks

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

# Shapes: [O, I] weight, [..., I] activations, [..., O] outputs; B = blocks = ceil(O * I / blocksize).

BNB_KINDS: tuple[str, ...] = ("nf4", "fp4", "int8")
BNB_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # quantize_4bit's valid sizes
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # double quantization block size (the only one matmul_4bit supports)
KERNEL_MAX_TOKENS = 256  # above this many rows of x, dequantize + dense matmul beats the CPU 4-bit kernel
QUANT_CHUNK_ELEMS = 1 << 22  # weights quantized / dequantized at once (bounds the fp32 temporaries)
CPU_PACK_BLOCK_N = 32  # output rows interleaved by bitsandbytes' CPU 4-bit layout
FP16_MAX = 65504.0
INT8_DEQUANT_SCALE = 7.874015718698502e-3  # 1 / 127 as bitsandbytes' int8_vectorwise_dequant writes it
_BNB_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # dtypes bitsandbytes' kernels take
INSTALL_HINT = "bitsandbytes is not installed: pip install bitsandbytes"

TENSOR_NAMES_4BIT: tuple[str, ...] = ("weight", "absmax", "quant_map")
TENSOR_NAMES_NESTED: tuple[str, ...] = ("nested_absmax", "nested_quant_map", "nested_offset")
TENSOR_NAMES_INT8: tuple[str, ...] = ("weight", "SCB")

_BNB_TYPE_RE = re.compile(r"^([a-z0-9]+?)(?:-b(\d+))?(-dq)?$")
_CPU_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"

logger = logging.getLogger(__name__)


class BitsandbytesNotInstalledError(ImportError, ValueError):
    """bitsandbytes is needed but cannot be imported (catchable as ImportError or ValueError)."""


@dataclass(frozen=True)
class BnbType:
    """A bitsandbytes weight type.

    Attributes:
        kind: ``"nf4"`` or ``"fp4"`` (4-bit codes with one fp32 absmax per block of ``blocksize``
            consecutive weights of the flattened ``[O, I]`` matrix) or ``"int8"`` (int8 codes with
            one fp32 absmax per output row).
        blocksize: 4-bit block size, one of ``BNB_BLOCKSIZES``; must stay 64 for ``int8``.
        double_quant: 4-bit only: quantize the block absmax values to 8 bits (blocks of 256),
            saving about ``24 / blocksize`` bits per weight.
    """

    kind: str
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BNB_KINDS:
            raise ValueError(f"unknown bitsandbytes kind {self.kind!r}; valid: {', '.join(BNB_KINDS)}")
        if isinstance(self.blocksize, bool) or self.blocksize not in BNB_BLOCKSIZES:
            valid = ", ".join(map(str, BNB_BLOCKSIZES))
            raise ValueError(f"unsupported bitsandbytes block size {self.blocksize!r}; valid: {valid}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be a bool, got {self.double_quant!r}")
        if self.kind == "int8" and (self.blocksize != DEFAULT_BLOCKSIZE or self.double_quant):
            raise ValueError("int8 is row-wise: it takes no block size and no double quantization")

    @property
    def bits(self) -> int:
        """Bits per code: 4 or 8."""
        return 8 if self.kind == "int8" else 4

    @property
    def full_name(self) -> str:
        """``"nf4"``, ``"fp4-b128"``, ``"nf4-dq"``, ``"int8"``; ``parse_bnb_type`` reads it back."""
        name = self.kind
        if self.blocksize != DEFAULT_BLOCKSIZE:
            name += f"-b{self.blocksize}"
        return name + "-dq" if self.double_quant else name

    def __str__(self) -> str:
        return self.full_name


def parse_bnb_type(text: str) -> BnbType:
    """Parse a bitsandbytes type name such as ``"nf4"``, ``"fp4-b128"``, ``"nf4-dq"`` or ``"int8"``.

    Args:
        text: ``<kind>[-b<blocksize>][-dq]``; case and surrounding spaces are ignored.

    Returns:
        The parsed ``BnbType``.

    Raises:
        ValueError: when the text is malformed or names an unknown kind or unsupported block size.
    """
    if not isinstance(text, str):
        raise ValueError(f"bitsandbytes type must be a string, got {type(text).__name__}")
    m = _BNB_TYPE_RE.match(text.strip().lower())
    if m is None:
        raise ValueError(f"malformed bitsandbytes type {text!r}; expected e.g. nf4, fp4-b128, nf4-dq, int8")
    kind, blocksize, dq = m.groups()
    return BnbType(kind, DEFAULT_BLOCKSIZE if blocksize is None else int(blocksize), dq is not None)


def _as_btype(btype: BnbType | str) -> BnbType:
    if isinstance(btype, BnbType):
        return btype
    if isinstance(btype, str):
        return parse_bnb_type(btype)
    raise ValueError(f"btype must be a BnbType or a type name, got {type(btype).__name__}")


def _import_bnb() -> tuple[ModuleType, ModuleType]:
    """Import ``bitsandbytes`` and ``bitsandbytes.functional``.

    Returns:
        ``(bitsandbytes, bitsandbytes.functional)``.

    Raises:
        BitsandbytesNotInstalledError: when the package is missing or fails to import.
    """
    cpu_logger = logging.getLogger(_CPU_BNB_LOGGER)
    quiet = cpu_logger.level == logging.NOTSET
    if quiet:
        # bitsandbytes logs a warning on import when the optional Hub kernel package `kernels` is absent.
        cpu_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as exc:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BitsandbytesNotInstalledError(INSTALL_HINT) from None
        raise BitsandbytesNotInstalledError(f"bitsandbytes could not be imported: {exc}") from exc
    finally:
        if quiet:
            cpu_logger.setLevel(logging.NOTSET)
    return bitsandbytes, bitsandbytes.functional


def bitsandbytes_available() -> bool:
    """Whether ``bitsandbytes`` can be imported (imports it when it can).

    Returns:
        True when the bitsandbytes weight types are usable.
    """
    try:
        _import_bnb()
    except BitsandbytesNotInstalledError:
        return False
    return True


def _has_cpu_kernel(op: str) -> bool:
    """Whether bitsandbytes registered a CPU-specific kernel for ``op`` (it only does where fast)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"))
    except (AttributeError, RuntimeError):
        return False


def pack_4bit_for_cpu(weight: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Rearrange bitsandbytes' packed 4-bit codes into its CPU-kernel layout.

    Produces exactly what ``bitsandbytes.functional._convert_weight_packed_for_cpu`` produces for the
    codes (checked at first use), about 10x faster: a byte of the CPU layout holds one code of row
    ``r`` (low nibble) and one of row ``r + 16`` (high nibble) of a 32-row group, for columns
    ``2p`` and ``2p + 1`` in consecutive bytes.

    Args:
        weight: ``[O * I / 2, 1]`` (or any shape with that many elements) uint8, the stored layout
            (two codes per byte, row-major over ``[O, I]``, first code in the high nibble).
        shape: ``(O, I)`` with ``O % 32 == 0`` and ``I`` even.

    Returns:
        ``[O, I / 2]`` uint8.

    Raises:
        ValueError: when the shape does not fit the layout.
    """
    o, i = shape
    if o % CPU_PACK_BLOCK_N or i % 2 or weight.numel() * 2 != o * i:
        raise ValueError(f"the CPU 4-bit layout needs O % {CPU_PACK_BLOCK_N} == 0 and even I, got {shape}")
    half = CPU_PACK_BLOCK_N // 2
    # [O/32, 2, 16, I/2] -> rows r and r + 16 of each group side by side, columns before rows.
    a = weight.reshape(o // CPU_PACK_BLOCK_N, 2, half, i // 2).transpose(2, 3).contiguous()
    lo_rows, hi_rows = a[:, 0], a[:, 1]
    out = torch.empty(o // CPU_PACK_BLOCK_N, i // 2, half, 2, dtype=torch.uint8, device=weight.device)
    torch.bitwise_or(hi_rows & 0xF0, lo_rows >> 4, out=out[..., 0])  # column 2p
    torch.bitwise_or(hi_rows << 4, lo_rows & 0x0F, out=out[..., 1])  # column 2p + 1
    return out.view(o, i // 2)


_CPU_4BIT_STATE: dict[str, Any] = {}


def _cpu_4bit_packer() -> Callable[[torch.Tensor, QuantState], tuple[torch.Tensor, QuantState]] | None:
    """The CPU-layout converter once checked against bitsandbytes on a small matrix, or None.

    The fast path needs bitsandbytes' CPU ``gemv_4bit`` kernel (registered only on AVX512-BF16 CPUs).
    The first call verifies ``pack_4bit_for_cpu`` bit-exactly against bitsandbytes' own converter and
    the kernel's output against ``x @ dequantize().T``; on a mismatch it falls back to bitsandbytes'
    converter, and when even that disagrees the 4-bit kernel path is disabled.
    """
    if "packer" in _CPU_4BIT_STATE:
        return _CPU_4BIT_STATE["packer"]
    packer = None
    bnb, bnbf = _import_bnb()
    if _has_cpu_kernel("bitsandbytes::gemv_4bit"):
        gen = torch.Generator().manual_seed(0)
        o, i = 64, 256
        w = torch.randn(o, i, generator=gen)
        x = torch.randn(3, i, generator=gen)
        q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        ref = x @ bnbf.dequantize_4bit(q, state).T
        bnb_convert = getattr(bnbf, "_convert_weight_packed_for_cpu", None)

        def fast(weight: torch.Tensor, qs: QuantState) -> tuple[torch.Tensor, QuantState]:
            return pack_4bit_for_cpu(weight, tuple(qs.shape)), _cpu_quant_state(qs)

        candidates = [fast] if bnb_convert is None else [fast, bnb_convert]
        expected = None
        for convert in candidates:
            try:
                packed, cpu_state = convert(q.clone(), _clone_state(state))
                if expected is None and bnb_convert is not None:
                    expected = bnb_convert(q.clone(), _clone_state(state))[0]
                with torch.no_grad():
                    out = bnb.matmul_4bit(x.to(torch.bfloat16), packed, cpu_state).float()
            except Exception as exc:  # a bitsandbytes change broke this path: use the generic one
                logger.debug("bitsandbytes CPU 4-bit path check failed: %s", exc)
                continue
            same_layout = expected is None or torch.equal(packed, expected)
            if same_layout and float((out - ref).norm() / ref.norm()) < 2e-2:
                packer = convert
                break
        if packer is None:
            logger.warning("bitsandbytes' CPU 4-bit kernel failed its self-check; using dequantize + matmul")
    _CPU_4BIT_STATE["packer"] = packer
    return packer


def _clone_state(qs: QuantState) -> QuantState:
    """A copy of a non-nested QuantState whose tensors can be modified (converters work in place)."""
    cls = type(qs)
    return cls(
        absmax=qs.absmax.clone(),
        shape=qs.shape,
        code=qs.code,
        blocksize=qs.blocksize,
        quant_type=qs.quant_type,
        dtype=qs.dtype,
    )


def _cpu_quant_state(qs: QuantState) -> QuantState:
    """The QuantState bitsandbytes' CPU kernel expects: bf16 absmax ``[I / blocksize, O]``, not nested."""
    o, i = qs.shape
    absmax = qs.absmax.float().reshape(o, i // qs.blocksize).T.to(torch.bfloat16).contiguous()
    cpu_state = type(qs)(
        absmax=absmax,
        shape=torch.Size((o, i)),
        code=qs.code,
        blocksize=qs.blocksize,
        quant_type=qs.quant_type,
        dtype=torch.bfloat16,
    )
    cpu_state.packing_format_for_cpu = True
    return cpu_state


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
    rows = max(step, QUANT_CHUNK_ELEMS // i // step * step)
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
    btype = _as_btype(btype)
    _check_weight(w)
    _, bnbf = _import_bnb()
    o, i = w.shape
    w = w.detach()
    if btype.kind == "int8":
        lo, hi = torch.aminmax(w)
        if max(-float(lo), float(hi)) > FP16_MAX:
            raise ValueError(f"int8 quantization goes through fp16: |weight| must be <= {FP16_MAX:g}")
        codes = torch.empty(o, i, dtype=torch.int8, device=w.device)
        scb = torch.empty(o, dtype=torch.float32, device=w.device)
        for start, end in row_chunks(o, i, QUANT_CHUNK_ELEMS):
            c, s, _ = bnbf.int8_vectorwise_quant(w[start:end].to(torch.float16).contiguous())
            codes[start:end] = c
            scb[start:end] = s
        return BnbTensor({"weight": codes, "SCB": scb}, (o, i), btype)
    if w.dtype not in _BNB_FLOAT_DTYPES:
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


def _expected_tensors(
    shape: tuple[int, int], btype: BnbType
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    o, i = shape
    if btype.kind == "int8":
        return {"weight": ((o, i), torch.int8), "SCB": ((o,), torch.float32)}
    blocks = -(-o * i // btype.blocksize)
    expected = {
        "weight": (((o * i + 1) // 2, 1), torch.uint8),
        "absmax": ((blocks,), torch.uint8 if btype.double_quant else torch.float32),
        "quant_map": ((16,), torch.float32),
    }
    if btype.double_quant:
        expected["nested_absmax"] = ((-(-blocks // NESTED_BLOCKSIZE),), torch.float32)
        expected["nested_quant_map"] = ((256,), torch.float32)
        expected["nested_offset"] = ((1,), torch.float32)
    return expected


class BnbTensor:
    """A weight ``[O, I]`` quantized by bitsandbytes, with bitsandbytes' dequantization and matmul.

    Stored tensors (``tensors()``), named as in bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``
    state dicts:

    - nf4 / fp4: ``weight`` ``[ceil(O * I / 2), 1]`` uint8 (two codes per byte over the flattened
      matrix), ``absmax`` ``[B]`` fp32 (uint8 with double quantization), ``quant_map`` ``[16]`` fp32;
      with double quantization also ``nested_absmax`` ``[ceil(B / 256)]`` fp32, ``nested_quant_map``
      ``[256]`` fp32 and ``nested_offset`` ``[1]`` fp32.
    - int8: ``weight`` ``[O, I]`` int8 and ``SCB`` ``[O]`` fp32 (row absmax; ``W_hat = q * SCB / 127``).

    Attributes:
        shape: ``(O, I)``.
        btype: the bitsandbytes type.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], btype: BnbType) -> None:
        """Wrap stored tensors; see ``from_tensors``.

        Args:
            tensors: the named tensors (kept, not copied).
            shape: ``(O, I)``.
            btype: the type they were made with.

        Raises:
            ValueError: on a bad shape or type, missing or extra keys, or tensors of the wrong dtype,
                shape or device.
        """
        if not isinstance(btype, BnbType):
            raise ValueError(f"btype must be a BnbType, got {type(btype).__name__}")
        shape = tuple(shape)
        if len(shape) != 2 or any(not isinstance(d, numbers.Integral) or d <= 0 for d in shape):
            raise ValueError(f"shape must be two positive ints (out, in), got {shape!r}")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.btype = btype
        expected = _expected_tensors(self.shape, btype)
        if not isinstance(tensors, dict) or set(tensors) != set(expected):
            got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
            raise ValueError(f"{btype} expects tensors {sorted(expected)}, got {got}")
        for name, (want_shape, want_dtype) in expected.items():
            t = tensors[name]
            if not isinstance(t, torch.Tensor) or t.dtype != want_dtype or tuple(t.shape) != want_shape:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{name} must be {want_dtype} {want_shape} for {btype} {self.shape}, got {got}"
                )
        if len({t.device for t in tensors.values()}) != 1:
            raise ValueError("all tensors of a BnbTensor must be on the same device")
        self._tensors = {name: tensors[name] for name in expected}
        self._kernel: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"BnbTensor(shape={self.shape}, btype={self.btype}, device={self.device})"

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self._tensors["weight"].device

    @property
    def nbytes(self) -> int:
        """Total bytes of the stored tensors (excludes the kernel-layout cache)."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @property
    def kernel_cache_nbytes(self) -> int:
        """Bytes held by the CPU 4-bit kernel layout that ``linear`` builds (0 before it is built)."""
        return sum(t.numel() * t.element_size() for t in self._kernel.get("cpu4bit_tensors", ()))

    def clear_kernel_cache(self) -> None:
        """Drop the CPU 4-bit kernel layout built by ``linear`` (about ``O * I / 2`` bytes)."""
        self._kernel.clear()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name the stored tensors for serialization.

        Returns:
            The tensors listed in the class docstring (not copies).
        """
        return dict(self._tensors)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], btype: BnbType | str
    ) -> BnbTensor:
        """Rebuild a ``BnbTensor`` from ``tensors()`` output.

        Args:
            tensors: exactly the keys ``tensors()`` returns for ``btype``.
            shape: ``(O, I)``.
            btype: the type (or its name) the tensors were made with.

        Returns:
            The quantized tensor (sharing memory with ``tensors``).

        Raises:
            ValueError: on missing or extra keys, or tensors of the wrong dtype, shape or device.
        """
        return cls(dict(tensors), shape, _as_btype(btype))

    @classmethod
    def from_quant_state(cls, weight: torch.Tensor, quant_state: QuantState) -> BnbTensor:
        """Wrap a weight quantized by bitsandbytes elsewhere (``Params4bit`` data and its state).

        Args:
            weight: the packed uint8 codes (``[ceil(O * I / 2), 1]`` or any shape of that size).
            quant_state: its ``bitsandbytes.functional.QuantState`` with a 2-D shape ``(O, I)``.

        Returns:
            The quantized tensor (sharing memory where the dtypes already match).

        Raises:
            ValueError: on an unsupported quant type, block size or nesting, or mismatched tensors.
        """
        shape = tuple(quant_state.shape) if quant_state.shape is not None else ()
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape must be (out, in), got {shape!r}")
        nested = bool(quant_state.nested)
        if nested and quant_state.state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(
                f"nested block size must be {NESTED_BLOCKSIZE}, got {quant_state.state2.blocksize}"
            )
        btype = BnbType(quant_state.quant_type, int(quant_state.blocksize), nested)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.uint8:
            raise ValueError("weight must be the uint8 packed codes")
        tensors = {
            "weight": weight.reshape(-1, 1),
            "absmax": quant_state.absmax if nested else quant_state.absmax.float(),
            "quant_map": quant_state.code.float(),
        }
        if nested:
            tensors["nested_absmax"] = quant_state.state2.absmax.float()
            tensors["nested_quant_map"] = quant_state.state2.code.float()
            tensors["nested_offset"] = torch.as_tensor(quant_state.offset, dtype=torch.float32).reshape(1)
        return cls(tensors, shape, btype)

    def quant_state(self, dtype: torch.dtype = torch.float32) -> QuantState:
        """The bitsandbytes ``QuantState`` of a 4-bit weight (sharing the stored tensors).

        Args:
            dtype: the dtype ``dequantize_4bit`` returns (bf16, fp16 or fp32).

        Returns:
            A fresh ``QuantState``; ``as_dict(packed=True)`` gives bitsandbytes' state-dict entries.

        Raises:
            ValueError: for int8 weights.
            BitsandbytesNotInstalledError: when bitsandbytes cannot be imported.
        """
        if self.btype.kind == "int8":
            raise ValueError("int8 weights have no 4-bit QuantState")
        _, bnbf = _import_bnb()
        t = self._tensors
        offset = state2 = None
        if self.btype.double_quant:
            offset = t["nested_offset"].reshape(())
            state2 = bnbf.QuantState(
                absmax=t["nested_absmax"],
                code=t["nested_quant_map"],
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        return bnbf.QuantState(
            absmax=t["absmax"],
            shape=torch.Size(self.shape),
            code=t["quant_map"],
            blocksize=self.btype.blocksize,
            quant_type=self.btype.kind,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    def to(self, device: torch.device | str) -> BnbTensor:
        """Return a copy on ``device`` (``self`` when already there); the kernel cache is not carried.

        Args:
            device: the target device.

        Returns:
            The quantized tensor on ``device``.
        """
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {name: t.to(device) for name, t in self._tensors.items()}
        return BnbTensor(moved, self.shape, self.btype)

    def _absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax as fp32 ``[B]`` (undoing double quantization)."""
        if not self.btype.double_quant:
            return self._tensors["absmax"]
        _, bnbf = _import_bnb()
        qs = self.quant_state()
        return (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the whole weight with bitsandbytes.

        Args:
            dtype: output float dtype.

        Returns:
            ``W_hat`` ``[O, I]`` in ``dtype``.

        Raises:
            BitsandbytesNotInstalledError: when bitsandbytes cannot be imported.
        """
        _, bnbf = _import_bnb()
        o, i = self.shape
        if self.btype.kind == "int8":
            out = torch.empty(o, i, dtype=dtype, device=self.device)
            codes, scb = self._tensors["weight"], self._tensors["SCB"]
            for start, end in row_chunks(o, i, QUANT_CHUNK_ELEMS):
                out[start:end] = bnbf.int8_vectorwise_dequant(codes[start:end], scb[start:end])
            return out
        direct = dtype in _BNB_FLOAT_DTYPES
        w = bnbf.dequantize_4bit(
            self._tensors["weight"], self.quant_state(dtype if direct else torch.float32)
        )
        return w.reshape(o, i).to(dtype)

    def _cpu_kernel_tensors(self) -> tuple[torch.Tensor, QuantState] | None:
        """The CPU-kernel layout of a 4-bit weight (built once and cached), or None when unsupported."""
        o, i = self.shape
        if o % CPU_PACK_BLOCK_N or i % self.btype.blocksize:
            return None
        if "cpu4bit" not in self._kernel:
            packer = _cpu_4bit_packer()
            if packer is None:
                return None
            qs = self.quant_state()
            if qs.nested:
                qs.absmax, qs.state2, qs.offset, qs.nested = self._absmax_fp32(), None, None, False
            packed, cpu_state = packer(self._tensors["weight"], _clone_state(qs))
            self._kernel["cpu4bit"] = (packed, cpu_state)
            self._kernel["cpu4bit_tensors"] = (packed, cpu_state.absmax)
        return self._kernel["cpu4bit"]

    def _linear_4bit(self, x2: torch.Tensor, use_kernel: bool | None) -> torch.Tensor:
        bnb, _ = _import_bnb()
        if use_kernel is False:
            return F.linear(x2, self.dequantize(x2.dtype))
        if self.device.type == "cpu" and (use_kernel or x2.shape[0] <= KERNEL_MAX_TOKENS):
            cpu = self._cpu_kernel_tensors()
            if cpu is not None:
                return bnb.matmul_4bit(x2, cpu[0], cpu[1]).to(x2.dtype)
        # The stored layout: bitsandbytes' own kernels on CUDA / XPU; on CPU its generic path
        # (dequantize_4bit into x's dtype, then a dense matmul).
        dtype = x2.dtype if x2.dtype in _BNB_FLOAT_DTYPES else torch.float32
        return bnb.matmul_4bit(x2.to(dtype), self._tensors["weight"], self.quant_state(dtype)).to(x2.dtype)

    def _linear_int8(self, x2: torch.Tensor, use_kernel: bool | None) -> torch.Tensor:
        _, bnbf = _import_bnb()
        on_cpu = self.device.type == "cpu"
        fast = not on_cpu or _has_cpu_kernel("bitsandbytes::int8_linear_matmul")
        if use_kernel is False or (use_kernel is None and not fast):
            # x @ W_hat.T with W_hat = q * SCB / 127 (int8_vectorwise_dequant's formula), scaled on the
            # output side: the int8 codes convert exactly to x's dtype, chunk by chunk (several times
            # faster on CPU than materializing W_hat).
            o, i = self.shape
            codes = self._tensors["weight"]
            scale = self._tensors["SCB"] * INT8_DEQUANT_SCALE
            parts = [
                (F.linear(x2, codes[s:e].to(x2.dtype)).float() * scale[s:e]).to(x2.dtype)
                for s, e in row_chunks(o, i, QUANT_CHUNK_ELEMS)
            ]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        # LLM.int8 without outliers: int8 activations (row absmax), int32 matmul, rescale. The CUDA
        # quantizer wants fp16 inputs (as bitsandbytes' MatMul8bitLt passes); the CPU one takes any float.
        xq = x2 if on_cpu and x2.dtype in _BNB_FLOAT_DTYPES else x2.half()
        ca, sca, _ = bnbf.int8_vectorwise_quant(xq)
        out_dtype = x2.dtype if x2.dtype in _BNB_FLOAT_DTYPES else torch.float32
        out = torch.ops.bitsandbytes.int8_scaled_mm.default(
            ca, self._tensors["weight"], sca, self._tensors["SCB"], bias=None, dtype=out_dtype
        )
        return out.to(x2.dtype)

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, *, use_kernel: bool | None = None
    ) -> torch.Tensor:
        """Compute ``x @ W_hat.T + bias`` with bitsandbytes' kernels (inference only: no autograd).

        nf4 / fp4 on CPU: ``bitsandbytes.matmul_4bit`` on the CPU-kernel layout (cached on first use),
        bf16 arithmetic, for at most ``KERNEL_MAX_TOKENS`` rows; more rows (or no AVX512-BF16 kernel)
        take bitsandbytes' dequantize-then-matmul path. Other devices: ``matmul_4bit`` on the stored
        layout. int8: bitsandbytes' ``int8_vectorwise_quant`` of ``x`` and its ``int8_scaled_mm``
        (int8 x int8 -> int32 matmul), so ``x`` is quantized to int8 per row as well; on CPUs where
        bitsandbytes has no int8 CPU kernel (no AVX512) the dequantize path below.

        Args:
            x: activations ``[..., I]`` (float dtype, same device as the weight).
            bias: optional ``[O]``, added in the output dtype.
            use_kernel: None (default): automatic choice as above; True: the kernel for any row count
                where bitsandbytes has one; False: the dequantize path, ``x @ self.dequantize().T`` up
                to rounding in ``x.dtype`` (4-bit: ``F.linear(x, self.dequantize(x.dtype))``; int8:
                ``x`` stays unquantized and the row scales apply to the output).

        Returns:
            ``[..., O]`` in ``x.dtype``.

        Raises:
            ValueError: when ``x`` is not a float tensor with last dim ``I`` or ``bias`` is not ``[O]``.
            BitsandbytesNotInstalledError: when bitsandbytes cannot be imported.
        """
        o, i = self.shape
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point tensor, got {got}")
        if x.dim() == 0 or x.shape[-1] != i:
            raise ValueError(f"x must have last dim {i} (in features), got shape {tuple(x.shape)}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (o,)):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({o},), got {got}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the weight is on {self.device}")
        lead = x.shape[:-1]
        with torch.no_grad():
            x2 = x.detach().reshape(-1, i).contiguous()
            if x2.shape[0] == 0:
                out = x2.new_zeros(0, o)
            elif self.btype.kind == "int8":
                out = self._linear_int8(x2, use_kernel)
            else:
                out = self._linear_4bit(x2, use_kernel)
            if bias is not None:
                out = out + bias.detach().to(out.dtype)
        return out.reshape(*lead, o)


class BnbLinear(nn.Module):
    """``y = x @ W_hat.T + bias`` with ``W_hat`` a ``BnbTensor``; a drop-in for ``nn.Linear`` (inference).

    The stored tensors and the bias are buffers, so ``state_dict()``, ``load_state_dict()`` and
    ``.to()`` work as for any module; the type and shape are constructor arguments. Dtype casts
    (``.half()``, ``.to(dtype)``) only reach the bias: the quantization statistics keep their dtypes.

    Attributes:
        in_features: ``I``.
        out_features: ``O``.
        btype: the bitsandbytes type.
        use_kernel: passed to ``BnbTensor.linear`` (None: automatic choice).
    """

    bias: torch.Tensor | None

    def __init__(self, weight: BnbTensor, bias: torch.Tensor | None = None) -> None:
        """Wrap a quantized weight.

        Args:
            weight: the quantized weight ``[O, I]``.
            bias: optional ``[O]`` float bias (kept in its dtype).

        Raises:
            ValueError: when ``weight`` is not a ``BnbTensor`` or ``bias`` is not a float ``[O]`` tensor.
        """
        super().__init__()
        if not isinstance(weight, BnbTensor):
            raise ValueError(f"weight must be a BnbTensor, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.btype = weight.btype
        self.use_kernel: bool | None = None
        if bias is not None and not (
            isinstance(bias, torch.Tensor)
            and bias.is_floating_point()
            and tuple(bias.shape) == (self.out_features,)
        ):
            raise ValueError(f"bias must be a float tensor of shape ({self.out_features},)")
        self._names = tuple(weight.tensors())
        for name, t in weight.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._cached: tuple[tuple[tuple[int, int, str], ...], BnbTensor] | None = (
            self._key(),
            weight,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, btype: BnbType | str) -> BnbLinear:
        """Quantize an ``nn.Linear``'s weight with bitsandbytes; its bias is kept unquantized.

        Args:
            linear: the layer to replace.
            btype: a ``BnbType`` or a type name such as ``"nf4"``.

        Returns:
            The quantized layer on the linear's device.

        Raises:
            ValueError: when ``linear`` is not an ``nn.Linear`` or its weight cannot be quantized.
            BitsandbytesNotInstalledError: when bitsandbytes cannot be imported.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantize_bnb(linear.weight.detach(), btype), bias)

    def _key(self) -> tuple[tuple[int, int, str], ...]:
        bufs = [getattr(self, name) for name in self._names]
        return tuple((t.data_ptr(), t._version, str(t.device)) for t in bufs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> BnbLinear:
        # Module.to(dtype) / .half() cast every float buffer; the statistics must keep their dtypes.
        kept = {name: getattr(self, name) for name in self._names if getattr(self, name).is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def quantized(self) -> BnbTensor:
        """View the current buffers as a ``BnbTensor``.

        Returns:
            A cached ``BnbTensor`` sharing the buffers, rebuilt (with a fresh kernel cache) whenever a
            buffer is replaced or modified in place, e.g. by ``load_state_dict`` or ``.to(device)``.
        """
        key = self._key()
        if self._cached is None or self._cached[0] != key:
            tensors = {name: getattr(self, name) for name in self._names}
            self._cached = (key, BnbTensor(tensors, (self.out_features, self.in_features), self.btype))
        return self._cached[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the weight.

        Args:
            dtype: output float dtype.

        Returns:
            ``W_hat`` ``[O, I]`` in ``dtype``.
        """
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: ``[..., I]`` float activations.

        Returns:
            ``[..., O]`` in ``x.dtype``.
        """
        return self.quantized().linear(x, self.bias, use_kernel=self.use_kernel)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, btype={self.btype}"
        )
