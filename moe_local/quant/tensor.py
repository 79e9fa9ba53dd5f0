"""``QuantizedTensor``: a group-wise quantized weight matrix, its dequantization and its matmul."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moe_local.quant import kernels
from moe_local.quant.base import QuantizedWeight, check_shape
from moe_local.quant.pack import packed_size, unpack_codes
from moe_local.quant.rtn import row_chunks
from moe_local.quant.schemes import QType

# Shapes: [O, I] weight, [O, P] packed codes, [O, G] scales/zeros, [..., I] activations.
# Legend: O=out features, I=in features, P=packed bytes per row (I * bits / 8), G=groups (I / group size).

DEQUANT_CHUNK_ELEMS = 1 << 20  # weights dequantized at once by linear() (4 MiB of fp32)
KERNEL_MAX_TOKENS = 96  # above this many rows of x, dequantize + dense matmul beats the int4 kernel
TENSOR_NAMES: tuple[str, ...] = ("packed", "scales", "zeros")


@dataclass(eq=False)
class QuantizedTensor(QuantizedWeight):
    """A weight ``[O, I]`` stored as packed codes plus per-group fp16 scale and zero.

    ``W_hat = (q - zero) * scale`` per group of ``qtype.group_size`` weights along ``I``.

    Attributes:
        packed: ``[O, I * bits / 8]`` uint8 codes, packed with ``pack_codes``.
        scales: ``[O, G]`` fp16.
        zeros: ``[O, G]`` fp16 (float zero points, not rounded to integers).
        shape: ``(O, I)``.
        qtype: the scheme.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple[int, int]
    qtype: QType
    _kernel: dict[Any, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.qtype, QType):
            raise ValueError(f"qtype must be a QType, got {type(self.qtype).__name__}")
        self.shape = check_shape(self.shape)
        o, i = self.shape
        if i % self.qtype.group_size:
            raise ValueError(f"in features I={i} is not divisible by group size {self.qtype.group_size}")
        expected = {
            "packed": ((o, packed_size(i, self.qtype.bits)), torch.uint8),
            "scales": ((o, i // self.qtype.group_size), torch.float16),
            "zeros": ((o, i // self.qtype.group_size), torch.float16),
        }
        for name, (want_shape, want_dtype) in expected.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != want_dtype or tuple(t.shape) != want_shape:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be {want_dtype} {want_shape} for {self.qtype}, got {got}")
        if not (self.packed.device == self.scales.device == self.zeros.device):
            raise ValueError("packed, scales and zeros must be on the same device")

    def __repr__(self) -> str:
        return f"QuantizedTensor(shape={self.shape}, qtype={self.qtype}, device={self.device})"

    @property
    def scheme(self) -> QType:
        """The scheme, ``qtype``."""
        return self.qtype

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name the stored tensors for serialization.

        Returns:
            ``{"packed": [O, P] uint8, "scales": [O, G] fp16, "zeros": [O, G] fp16}`` (not copies).
        """
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: QType
    ) -> QuantizedTensor:
        """Rebuild a ``QuantizedTensor`` from ``tensors()`` output.

        Args:
            tensors: mapping with exactly the keys ``packed``, ``scales``, ``zeros``.
            shape: ``(O, I)``.
            scheme: the ``QType`` the tensors were made with.

        Returns:
            The quantized tensor (sharing memory with ``tensors``).

        Raises:
            ValueError: on missing or extra keys, or tensors of the wrong dtype or shape.
        """
        if set(tensors) != set(TENSOR_NAMES):
            raise ValueError(f"expected tensors {sorted(TENSOR_NAMES)}, got {sorted(tensors)}")
        return cls(tensors["packed"], tensors["scales"], tensors["zeros"], tuple(shape), scheme)

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
        codes = unpack_codes(self.packed[start:end], self.qtype.bits, i)
        w = codes.view(rows, i // g, g).to(torch.float32)
        w.sub_(self.zeros[start:end, :, None].to(torch.float32)).mul_(self.scales[start:end, :, None])
        return w.view(rows, i).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the whole weight.

        Args:
            dtype: output float dtype.

        Returns:
            ``W_hat`` ``[O, I]`` in ``dtype``.
        """
        return self.dequantize_rows(0, self.shape[0], dtype)

    def _kernel_ok(self, x2: torch.Tensor, use_kernel: bool | None) -> bool:
        if use_kernel is False or x2.dtype not in kernels.KERNEL_DTYPES:
            return False
        if use_kernel is None and x2.shape[0] > KERNEL_MAX_TOKENS:
            return False
        return kernels.int4_kernel_supports(self.shape, self.qtype.bits, self.qtype.group_size, self.device)

    def _kernel_tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if "weight" not in self._kernel:
            self._kernel["weight"] = kernels.pack_int4_weight(self.packed, self.qtype.bits, self.shape)
        if dtype not in self._kernel:
            self._kernel[dtype] = kernels.int4_scale_bias(self.scales, self.zeros, self.qtype.bits, dtype)
        return self._kernel["weight"], self._kernel[dtype]

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, *, use_kernel: bool | None = None
    ) -> torch.Tensor:
        """Compute ``x @ W_hat.T + bias`` without materializing all of ``W_hat`` at once.

        The reference path dequantizes at most ``DEQUANT_CHUNK_ELEMS`` weights at a time into
        ``x.dtype`` and runs a dense matmul per row chunk. bf16 inputs on CPU can instead run torch's
        int4 kernel straight from the codes; the first such call builds and caches a kernel-layout
        copy of the codes (``O * I / 2`` bytes, see ``clear_kernel_cache``).

        Args:
            x: activations ``[..., I]`` (float dtype, same device as the weight).
            bias: optional ``[O]``, added in ``x.dtype``.
            use_kernel: None (default): the int4 kernel for 2/3/4-bit weights (2- and 3-bit codes
                fit its 4-bit lanes; the cached copy then costs more than the codes, but the call
                is 20-40x faster than dequantizing) and at most ``KERNEL_MAX_TOKENS`` bf16 rows;
                True: any row count when supported; False: always the dequantize path.

        Returns:
            ``[..., O]`` in ``x.dtype``.

        Raises:
            ValueError: when ``x`` is not a float tensor with last dim ``I`` or ``bias`` is not ``[O]``.
        """
        self._check_linear_args(x, bias)
        o, i = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, i)
        if x2.shape[0] == 0:
            out = x2.new_zeros(0, o)
        elif self._kernel_ok(x2, use_kernel):
            weight, scale_bias = self._kernel_tensors(x2.dtype)
            out = kernels.int4_linear(x2, weight, self.qtype.group_size, scale_bias)
        else:
            parts = [
                F.linear(x2, self.dequantize_rows(start, end, x2.dtype))
                for start, end in row_chunks(o, i, DEQUANT_CHUNK_ELEMS)
            ]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*lead, o)
