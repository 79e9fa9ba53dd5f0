"""The bitsandbytes backend: importing it lazily, checking its kernels, and its CPU 4-bit layout.

bitsandbytes is optional and imported lazily (importing it costs seconds): importing this module never
needs it; ``import_bnb`` raises ``BitsandbytesNotInstalledError`` without it.

CPU notes (bitsandbytes 0.50): the fast 4-bit CPU kernel (AVX512-BF16) needs its own weight layout,
which ``pack_4bit_for_cpu`` / ``cpu_4bit_packer`` build from the stored layout; it computes in bf16
with bf16 block scales. The int8 kernel quantizes the activations row-wise to int8 too
(``torch._int_mm`` on AVX512 CPUs).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

# Shapes: [O, I] weight, [..., I] activations.  O=out features, I=in features.

CPU_PACK_BLOCK_N = 32  # output rows interleaved by bitsandbytes' CPU 4-bit layout
BNB_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # dtypes bitsandbytes' kernels take
INSTALL_HINT = "bitsandbytes is not installed: pip install bitsandbytes"

_CPU_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"

logger = logging.getLogger(__name__)


class BitsandbytesNotInstalledError(ImportError, ValueError):
    """bitsandbytes is needed but cannot be imported (catchable as ImportError or ValueError)."""


def import_bnb() -> tuple[ModuleType, ModuleType]:
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
        import_bnb()
    except BitsandbytesNotInstalledError:
        return False
    return True


def has_cpu_kernel(op: str) -> bool:
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


def cpu_4bit_packer() -> Callable[[torch.Tensor, QuantState], tuple[torch.Tensor, QuantState]] | None:
    """The CPU-layout converter once checked against bitsandbytes on a small matrix, or None.

    The fast path needs bitsandbytes' CPU ``gemv_4bit`` kernel (registered only on AVX512-BF16 CPUs).
    The first call verifies ``pack_4bit_for_cpu`` bit-exactly against bitsandbytes' own converter and
    the kernel's output against ``x @ dequantize().T``; on a mismatch it falls back to bitsandbytes'
    converter, and when even that disagrees the 4-bit kernel path is disabled.
    """
    if "packer" in _CPU_4BIT_STATE:
        return _CPU_4BIT_STATE["packer"]
    packer = None
    bnb, bnbf = import_bnb()
    if has_cpu_kernel("bitsandbytes::gemv_4bit"):
        gen = torch.Generator().manual_seed(0)
        o, i = 64, 256
        w = torch.randn(o, i, generator=gen)
        x = torch.randn(3, i, generator=gen)
        q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        ref = x @ bnbf.dequantize_4bit(q, state).T
        bnb_convert = getattr(bnbf, "_convert_weight_packed_for_cpu", None)

        def fast(weight: torch.Tensor, qs: QuantState) -> tuple[torch.Tensor, QuantState]:
            return pack_4bit_for_cpu(weight, tuple(qs.shape)), cpu_quant_state(qs)

        candidates = [fast] if bnb_convert is None else [fast, bnb_convert]
        expected = None
        for convert in candidates:
            try:
                packed, cpu_state = convert(q.clone(), clone_state(state))
                if expected is None and bnb_convert is not None:
                    expected = bnb_convert(q.clone(), clone_state(state))[0]
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


def clone_state(qs: QuantState) -> QuantState:
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


def cpu_quant_state(qs: QuantState) -> QuantState:
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
