"""``QuantizedTensor``: a group-wise quantized weight matrix, its dequantization and its matmul.

On the CPU with bf16 activations, 8-, 4- and 2-bit codes in groups of whole 32-byte chunks run on
moe-local's own kernel (``native``, AVX2) straight from the stored codes: nothing is converted and
the stored codes stay the one copy; it also dequantizes them, bit-identically to the torch path,
for the many-token (prefill) path, which then runs a float32 matmul. Where it is not built (no C
compiler, no AVX2, ``MOE_LOCAL_NATIVE=0``) or the group is smaller, the codes run on torch's
kernels: 2-, 3- and 4-bit codes on the
int4 kernel (``kernels``); 8-bit codes as their two nibbles on the int4 kernel when the weight is
small, else on the int8 kernel one group at a time (``int8_kernel``). Each needs the codes in its own
layout; the first kernel call (or ``prepare_kernel``) converts them and the kernel layout becomes
the ONE copy of the codes in memory: ``packed`` (and ``tensors()``, saving, moving) rebuilds our
packing from it, exactly, when asked. Two copies are kept only where the conversion cannot be undone
on this machine or the codes are pinned for device copies. ``nbytes`` counts the stored tensors
still held, ``kernel_cache_nbytes`` the layout and the kernel's per-group parameters.

Ternary schemes (``tern-g64k``) are held as 2-bit codes (their values 0..2), so every path above runs
them; only ``tensors()`` (what is saved) packs them five to a byte, and ``from_tensors`` unpacks them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moe_local.quant import int8_kernel, kernels, native, superblock
from moe_local.quant.base import QuantizedWeight, check_shape
from moe_local.quant.pack import pack_ternary, packed_size, ternary_to_2bit, unpack_codes
from moe_local.quant.rtn import row_chunks
from moe_local.quant.schemes import QType
from moe_local.quant.scratch import bf16_rows, float32_rows

# Shapes: [O, I] weight, [O, P] packed codes, [O, G] scales/zeros, [..., I] activations.
# Legend: O=out features, I=in features, P=packed bytes per row (I * bits / 8), G=groups (I / group size).

DEQUANT_CHUNK_ELEMS = 1 << 20  # weights dequantized at once by linear() (4 MiB of fp32)
KERNEL_MAX_TOKENS = 96  # above this many rows of x, dequantize + dense matmul beats the int4 kernel
TENSOR_NAMES: tuple[str, ...] = ("packed", "scales", "zeros")
SUPERBLOCK_TENSOR_NAMES: tuple[str, ...] = ("packed", "scale_codes", "offset_codes", "superscales")
_INT4, _INT8, _SPLIT = "int4", "int8", "int8-split"  # _kernel keys of the codes in a kernel layout
_NATIVE = "native"  # moe-local's C kernel (``native``): it reads the packed codes as stored
NATIVE_MAX_TOKENS = 32  # above this many rows of x, dequantize + dense matmul beats the native kernel


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy when it is a view into a larger buffer (an expert's blob) it would keep alive."""
    return t.clone() if t.untyped_storage().nbytes() > _nbytes(t) else t


class QuantizedTensor(QuantizedWeight):
    """A weight ``[O, I]`` stored as packed codes plus per-group fp16 scale and zero.

    ``W_hat = (q - zero) * scale`` per group of ``qtype.group_size`` weights along ``I``.

    Attributes:
        scales: ``[O, G]`` fp16.
        zeros: ``[O, G]`` fp16 (float zero points, not rounded to integers).
        shape: ``(O, I)``.
        qtype: the scheme.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        shape: tuple[int, int],
        qtype: QType,
        superscales: torch.Tensor | None = None,
    ) -> None:
        """Check and keep the tensors (not copied).

        Args:
            packed: ``[O, I * bits / 8]`` uint8 codes, packed with ``pack_codes``.
            scales: ``[O, G]`` fp16 (for a super-block scheme: what its codes expand to).
            zeros: ``[O, G]`` fp16 (likewise).
            shape: ``(O, I)``.
            qtype: the scheme.
            superscales: ``[O, S, 2]`` fp16 super-block pairs, for super-block schemes only
                (``moe_local.quant.superblock``).

        Raises:
            ValueError: on a scheme that is not a ``QType``, a bad shape, or tensors of the wrong
                dtype, shape or device.
        """
        if not isinstance(qtype, QType):
            raise ValueError(f"qtype must be a QType, got {type(qtype).__name__}")
        self.shape = check_shape(shape)
        self.qtype = qtype
        o, i = self.shape
        if i % qtype.group_size:
            raise ValueError(f"in features I={i} is not divisible by group size {qtype.group_size}")
        expected = {
            "packed": (packed, (o, packed_size(i, qtype.bits)), torch.uint8),
            "scales": (scales, (o, i // qtype.group_size), torch.float16),
            "zeros": (zeros, (o, i // qtype.group_size), torch.float16),
        }
        for name, (t, want_shape, want_dtype) in expected.items():
            if not isinstance(t, torch.Tensor) or t.dtype != want_dtype or tuple(t.shape) != want_shape:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be {want_dtype} {want_shape} for {qtype}, got {got}")
        if qtype.superblock:
            want = (o, superblock.superblocks(i // qtype.group_size, qtype.group_size), 2)
            if (
                not isinstance(superscales, torch.Tensor)
                or superscales.dtype != torch.float16
                or tuple(superscales.shape) != want
            ):
                ok = isinstance(superscales, torch.Tensor)
                got = (tuple(superscales.shape), superscales.dtype) if ok else type(superscales).__name__
                raise ValueError(f"superscales must be torch.float16 {want} for {qtype}, got {got}")
            if superscales.device != packed.device:
                raise ValueError("packed and superscales must be on the same device")
        elif superscales is not None:
            raise ValueError(f"superscales belong to super-block schemes ('k'), not {qtype}")
        if not (packed.device == scales.device == zeros.device):
            raise ValueError("packed, scales and zeros must be on the same device")
        self.superscales = superscales
        self._scale_codes: tuple[torch.Tensor, torch.Tensor] | None = None  # kept where not recoverable
        self._packed: torch.Tensor | None = packed
        self.scales = scales
        self.zeros = zeros
        self._device = packed.device
        self._kernel: dict[Any, torch.Tensor] = {}
        self._fast: native.NativeWeight | bool | None = False  # False: not decided yet (see linear)

    def __repr__(self) -> str:
        return f"QuantizedTensor(shape={self.shape}, qtype={self.qtype}, device={self.device})"

    @property
    def scheme(self) -> QType:
        """The scheme, ``qtype``."""
        return self.qtype

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self._device

    @property
    def packed(self) -> torch.Tensor:
        """``[O, I * bits / 8]`` uint8 codes packed with ``pack_codes``.

        Rebuilt from the kernel layout (a new tensor each time) once that holds the only copy.
        """
        if self._packed is not None:
            return self._packed
        if _INT4 not in self._kernel:
            return self._codes(0, self.shape[0])  # 8-bit packing is one code per byte
        return kernels.unpack_int4_weight(self._kernel[_INT4], self.qtype.bits, self.shape)

    def held_tensors(self) -> list[torch.Tensor]:
        """The stored tensors held now: ``scales``, ``zeros`` and ``packed`` (unless its layout replaced it).

        Returns:
            The tensors (not copies); ``nbytes`` sums them, ``kernel_cache_nbytes`` the kernel layout.
        """
        kept = self._scale_codes or ()
        return [t for t in (self._packed, self.scales, self.zeros, self.superscales, *kept) if t is not None]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name the stored tensors for serialization.

        Returns:
            ``{"packed": [O, P] uint8, "scales": [O, G] fp16, "zeros": [O, G] fp16}`` (not copies,
            except ``packed`` rebuilt from a kernel layout); for super-block schemes
            ``{"packed", "scale_codes": [O, G] uint8, "offset_codes": [O, G] int8,
            "superscales": [O, S, 2] fp16}``, the codes recovered from the expanded scales.
        """
        packed = self.packed
        if self.qtype.ternary:  # saved five codes a byte; held as 2-bit codes
            packed = pack_ternary(unpack_codes(packed, 2, self.shape[1]))
        if not self.qtype.superblock:
            return {"packed": packed, "scales": self.scales, "zeros": self.zeros}
        codes = self._scale_codes or superblock.recover_codes(
            self.scales, self.zeros, self.superscales, self.qtype.group_size
        )
        return {
            "packed": packed,
            "scale_codes": codes[0],
            "offset_codes": codes[1],
            "superscales": self.superscales,
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: QType
    ) -> QuantizedTensor:
        """Rebuild a ``QuantizedTensor`` from ``tensors()`` output.

        Args:
            tensors: mapping with exactly the keys ``packed``, ``scales``, ``zeros`` (super-block
                schemes: ``packed``, ``scale_codes``, ``offset_codes``, ``superscales``).
            shape: ``(O, I)``.
            scheme: the ``QType`` the tensors were made with.

        Returns:
            The quantized tensor (sharing memory with ``tensors`` until a kernel layout replaces
            the codes).

        Raises:
            ValueError: on missing or extra keys, or tensors of the wrong dtype or shape.
        """
        names = SUPERBLOCK_TENSOR_NAMES if scheme.superblock else TENSOR_NAMES
        if set(tensors) != set(names):
            raise ValueError(f"expected tensors {sorted(names)}, got {sorted(tensors)}")
        if scheme.ternary:  # five codes a byte as saved -> the 2-bit codes every kernel reads
            packed = tensors["packed"]
            if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.shape[0] != shape[0]:
                raise ValueError(f"packed must be a uint8 [O, ceil(I / 5)] tensor for {scheme}")
            tensors = {**tensors, "packed": ternary_to_2bit(packed, int(shape[1]))}
        if not scheme.superblock:
            return cls(tensors["packed"], tensors["scales"], tensors["zeros"], tuple(shape), scheme)
        return cls._from_codes(tensors, tuple(shape), scheme)

    @classmethod
    def _from_codes(
        cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: QType
    ) -> QuantizedTensor:
        """A super-block weight from its stored codes: expanded, the codes kept only if not recoverable."""
        o, i = check_shape(shape)
        groups = i // scheme.group_size if i % scheme.group_size == 0 else -1
        sc, oc, sup = tensors["scale_codes"], tensors["offset_codes"], tensors["superscales"]
        for name, t, dtype in (("scale_codes", sc, torch.uint8), ("offset_codes", oc, torch.int8)):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != (o, groups):
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be {dtype} {(o, groups)} for {scheme}, got {got}")
        if not isinstance(sup, torch.Tensor) or sup.dtype != torch.float16 or sup.dim() != 3:
            raise ValueError(f"superscales must be a float16 [O, S, 2] tensor for {scheme}")
        if bool((sc == 0).any()):
            raise ValueError(f"scale codes of {scheme} are 1..255; a stored code is 0")
        scales, zeros = superblock.expand(sc, oc, sup, scheme.group_size)
        qt = cls(tensors["packed"], scales, zeros, (o, i), scheme, sup)
        # every expert read from disk comes through here: the cheap test first
        if not superblock.surely_recoverable(scales, zeros) and not superblock.exact_recovery(
            sc, oc, sup, scheme.group_size
        ):
            qt._scale_codes = (sc, oc)
        elif not qt._packed.is_pinned():
            # the codes are views into an expert's blob, whose scale codes are now dead bytes that
            # nbytes would not count: own packed and superscales so the blob can go
            qt._packed, qt.superscales = _own(qt._packed), _own(sup)
        return qt

    def dequantize_index(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the rows named by ``rows`` (an embedding lookup), in that order.

        Args:
            rows: int64 row indices ``[n]``, each in ``[0, O)``.
            dtype: output dtype.

        Returns:
            ``[n, I]`` of ``dtype``, equal to ``dequantize()[rows]``.
        """
        i = self.shape[1]
        g = self.qtype.group_size
        if self._packed is not None:  # the stored codes are held: gather them
            codes = unpack_codes(self._packed[rows], self.qtype.bits, i)
        else:  # a kernel layout holds them: rebuild the few rows asked for
            uniq, inverse = torch.unique(rows, return_inverse=True)
            codes = torch.cat([self._codes(int(r), int(r) + 1) for r in uniq])[inverse]
        scales, zeros = self.scales[rows].float().unsqueeze(-1), self.zeros[rows].float().unsqueeze(-1)
        w = (codes.float().view(-1, i // g, g) - zeros).mul_(scales)
        return w.view(-1, i).to(dtype)

    def _codes(self, start: int, end: int) -> torch.Tensor:
        """Codes of rows ``[start, end)``, one per byte, from wherever they are held."""
        if self._packed is not None:
            return unpack_codes(self._packed[start:end], self.qtype.bits, self.shape[1])
        if _INT8 in self._kernel:
            return int8_kernel.unpack_int8_rows(self._kernel[_INT8], start, end)
        if _SPLIT in self._kernel:
            return int8_kernel.unpack_split_rows(self._kernel[_SPLIT], self.shape, start, end)
        return kernels.unpack_int4_rows(self._kernel[_INT4], self.qtype.bits, self.shape, start, end)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize output rows ``[start, end)``.

        Args:
            start: first row.
            end: one past the last row.
            dtype: output float dtype (the arithmetic runs in float32).

        Returns:
            ``[end - start, I]`` in ``dtype``.

        Raises:
            ValueError: when the range is not inside ``[0, O]``.
        """
        o, i = self.shape
        if not 0 <= start <= end <= o:
            raise ValueError(f"row range [{start}, {end}) is outside [0, {o})")
        g = self.qtype.group_size
        rows = end - start
        if self._kernel_kind() == _NATIVE:  # the same arithmetic in C, 5-10x faster: bit-identical
            codes = (self._packed, self.scales, self.zeros)
            return native.dequantize_rows(*codes, self.shape, self.qtype.bits, g, start, end).to(dtype)
        w = self._codes(start, end).view(rows, i // g, g).to(torch.float32)
        w.sub_(self.zeros[start:end, :, None].to(torch.float32)).mul_(self.scales[start:end, :, None])
        return w.view(rows, i).to(dtype)

    def _bf16_gemm(self, x2: torch.Tensor) -> bool:
        """Whether many bf16 rows of ``x2`` run torch's bf16 GEMM on ``W_hat`` rounded to bf16.

        Where the CPU multiplies bf16 pairs (``native.BF16_GEMM``), and for codes of 4 bits or fewer:
        rounding ``W_hat`` to bf16 moves a weight by at most 2^-9 of itself, a few percent of what
        4-bit codes already move it; 8-bit codes, whose own error is that small, stay in float32.
        """
        return (
            native.BF16_GEMM
            and self.qtype.bits <= 4
            and x2.dtype is torch.bfloat16
            and self.device.type == "cpu"
            and not torch.is_grad_enabled()
        )

    def _rows_for_matmul(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """``dequantize_rows`` for an immediate matmul: on the native kernel in float32, written into
        this thread's reused buffer (``scratch``)."""
        if dtype != torch.float32 or self._kernel_kind() != _NATIVE:
            return self.dequantize_rows(start, end, dtype)
        out = float32_rows(end - start, self.shape[1], DEQUANT_CHUNK_ELEMS)
        codes, g = (self._packed, self.scales, self.zeros), self.qtype.group_size
        return native.dequantize_rows(*codes, self.shape, self.qtype.bits, g, start, end, out)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the whole weight.

        Args:
            dtype: output float dtype.

        Returns:
            ``W_hat`` ``[O, I]`` in ``dtype``.
        """
        return self.dequantize_rows(0, self.shape[0], dtype)

    def _kernel_kind(self) -> str | None:
        """Which CPU kernel this weight runs on (None: only the dequantize path)."""
        held = [kind for kind in (_INT4, _INT8, _SPLIT) if kind in self._kernel]
        if held:  # converted already: stay with it
            return held[0]
        bits, group = self.qtype.bits, self.qtype.group_size
        if self._packed is not None and native.supports(self.shape, bits, group, self.device):
            return _NATIVE
        if bits == 8:
            if int8_kernel.split_supported(self.shape, group, self.device):
                return _SPLIT
            return _INT8 if int8_kernel.int8_kernel_supports(self.device) else None
        return _INT4 if kernels.int4_kernel_supports(self.shape, bits, group, self.device) else None

    def native_weight(self) -> native.NativeWeight | None:
        """This weight's prebuilt native call (what a fused caller passes to the kernel), or None
        where it runs another path or its tensors were replaced since the call was built."""
        fast = self._fast
        if fast is False:
            fast = self._fast = self._native_weight()
        if fast is None or not fast.reads(self._packed, self.scales, self.zeros):
            return None
        return fast

    def _native_weight(self) -> native.NativeWeight | None:
        """The prebuilt native call of this weight, or None where it runs another path."""
        if self._kernel_kind() != _NATIVE:
            return None
        held = (self._packed, self.scales, self.zeros)
        if any(t is None for t in held) or native.row_strides(*held) is None:
            return None
        bits, group = self.qtype.bits, self.qtype.group_size
        return native.NativeWeight(*held, self.shape, bits, group)

    def _kernel_ok(self, x2: torch.Tensor, use_kernel: bool | None) -> str | None:
        kind = self._kernel_kind()
        # bf16 activations only, as torch's kernels: float32 compute stays the exact reference path
        if use_kernel is False or kind is None or x2.dtype not in kernels.KERNEL_DTYPES:
            return None
        if kind == _NATIVE:
            return kind if use_kernel or x2.shape[0] <= NATIVE_MAX_TOKENS else None
        # many rows: dequantize + matmul beats the int4 kernel; the 8-bit kernels won at 1 to 512 rows
        if use_kernel is None and kind == _INT4 and x2.shape[0] > KERNEL_MAX_TOKENS:
            return None
        return kind

    def _release_codes(self) -> None:
        """Let the kernel layout be the one copy of the codes, when it converts back exactly."""
        if self._packed is None or self._packed.is_pinned():
            return  # pinned codes are what device copies read: they stay
        if _INT4 in self._kernel and not kernels.layout_reversible():
            return
        # scales and zeros may be views into an expert's blob: own them, so the blob can go
        self.scales, self.zeros = _own(self.scales), _own(self.zeros)
        self._packed = None

    def prepare_kernel(self, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Convert the codes to this machine's CPU kernel layout now, instead of on the first call.

        A reader thread can call it so the first forward finds the weight ready; afterwards the
        kernel layout is the one copy of the codes (see the module docstring).

        Args:
            dtype: the activations' dtype the weight will see.

        Returns:
            True when the weight will run on a kernel for ``dtype``; False (nothing done) otherwise.
        """
        kind = self._kernel_kind()
        if kind is None or dtype not in kernels.KERNEL_DTYPES:
            return False
        if kind == _NATIVE:
            return True  # it reads the codes as they are stored: nothing to convert
        self._kernel_tensors(kind, dtype)
        return True

    def _kernel_tensors(self, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        bits, group = self.qtype.bits, self.qtype.group_size
        if kind not in self._kernel:
            if kind == _INT8:
                self._kernel[kind] = int8_kernel.pack_int8_weight(self.packed, group)
            elif kind == _SPLIT:
                self._kernel[kind] = int8_kernel.pack_split_weight(self.packed, self.shape)
            else:
                self._kernel[kind] = kernels.pack_int4_weight(self.packed, bits, self.shape)
            self._release_codes()
        if (kind, dtype) not in self._kernel:
            with kernels.one_thread():
                if kind == _INT8:
                    params = int8_kernel.int8_group_params(self.scales, self.zeros, dtype)
                    self._kernel[(kind, dtype)], self._kernel[(kind, dtype, "zero")] = params
                elif kind == _SPLIT:
                    self._kernel[(kind, dtype)] = int8_kernel.split_scale_bias(self.scales, self.zeros, dtype)
                else:
                    self._kernel[(kind, dtype)] = kernels.int4_scale_bias(
                        self.scales, self.zeros, bits, dtype
                    )
        if kind == _INT8:
            return self._kernel[kind], self._kernel[(kind, dtype)], self._kernel[(kind, dtype, "zero")]
        return self._kernel[kind], self._kernel[(kind, dtype)]

    def clear_kernel_cache(self) -> None:
        """Drop the kernel layouts, first rebuilding the packed codes when those held the only copy."""
        if self._packed is None:
            self._packed = self.packed
        self._kernel.clear()
        self._fast = False

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, *, use_kernel: bool | None = None
    ) -> torch.Tensor:
        """Compute ``x @ W_hat.T + bias`` without materializing all of ``W_hat`` at once.

        The reference path dequantizes at most ``DEQUANT_CHUNK_ELEMS`` weights at a time into
        ``x.dtype`` and runs a dense matmul per row chunk. bf16 inputs on CPU can instead run a
        kernel straight from the codes: the first such call converts them into the kernel's layout,
        which then replaces them (see the module docstring and ``clear_kernel_cache``).

        Args:
            x: activations ``[..., I]`` (float dtype, same device as the weight).
            bias: optional ``[O]``, added in ``x.dtype``.
            use_kernel: None (default): the native kernel at most ``NATIVE_MAX_TOKENS`` bf16 rows
                where it applies (see the module docstring); else the int4 kernel for 2/3/4-bit
                weights (2- and 3-bit codes
                fit its 4-bit lanes; the layout then costs 4 bits a code, but the call is 20-40x
                faster than dequantizing) at most ``KERNEL_MAX_TOKENS`` bf16 rows, an 8-bit kernel
                for 8-bit weights at any row count; True: a kernel at any row count when supported;
                False: always the dequantize path.

        Returns:
            ``[..., O]`` in ``x.dtype``.

        Raises:
            ValueError: when ``x`` is not a float tensor with last dim ``I`` or ``bias`` is not ``[O]``.
        """
        fast = self._fast
        if fast is False:
            fast = self._fast = self._native_weight()
        # the decode path: a few bf16 rows on the native kernel, checked with a handful of compares
        if (
            fast is not None
            and bias is None
            and use_kernel is None
            and type(x) is torch.Tensor
            and x.dtype is torch.bfloat16
            and x.device.type == "cpu"
            and x.dim() > 0
            and x.shape[-1] == fast.in_features
            and fast.reads(self._packed, self.scales, self.zeros)
        ):
            x2 = x.reshape(-1, fast.in_features)
            if 0 < x2.shape[0] <= NATIVE_MAX_TOKENS:
                return fast.linear_bf16(x2.contiguous()).reshape(*x.shape[:-1], fast.out_features)
        self._check_linear_args(x, bias)
        o, i = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, i)
        kind = self._kernel_ok(x2, use_kernel) if x2.shape[0] else None
        if x2.shape[0] == 0:
            out = x2.new_zeros(0, o)
        elif kind == _NATIVE:
            bits, group = self.qtype.bits, self.qtype.group_size
            out = native.qlinear(x2, self._packed, self.scales, self.zeros, self.shape, bits, group)
            out = out.to(x2.dtype)
        elif kind == _INT8:
            out = int8_kernel.int8_linear(x2, *self._kernel_tensors(kind, x2.dtype))
        elif kind == _SPLIT:
            weight, scale_bias = self._kernel_tensors(kind, x2.dtype)
            out = int8_kernel.split_linear(x2, weight, self.qtype.group_size, scale_bias)
        elif kind == _INT4:
            weight, scale_bias = self._kernel_tensors(kind, x2.dtype)
            out = kernels.int4_linear(x2, weight, self.qtype.group_size, scale_bias)
        elif self._bf16_gemm(x2):
            # many bf16 rows where the CPU multiplies bf16 pairs: W_hat rounded to bf16, torch's bf16 GEMM
            parts = [
                F.linear(
                    x2,
                    bf16_rows(end - start, i, DEQUANT_CHUNK_ELEMS).copy_(
                        self._rows_for_matmul(start, end, torch.float32)
                    ),
                )
                for start, end in row_chunks(o, i, DEQUANT_CHUNK_ELEMS)
            ]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        else:
            # many bf16 rows on the CPU: a float32 matmul (bf16's is 3-7x slower without AVX-512 BF16)
            fp32 = x2.dtype == torch.bfloat16 and self.device.type == "cpu"
            xm = x2.to(torch.float32) if fp32 else x2
            parts = [
                F.linear(xm, self._rows_for_matmul(start, end, xm.dtype))
                for start, end in row_chunks(o, i, DEQUANT_CHUNK_ELEMS)
            ]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            out = out.to(x2.dtype)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*lead, o)
