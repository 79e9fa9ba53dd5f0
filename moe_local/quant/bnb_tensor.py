"""``BnbTensor``: a weight quantized by bitsandbytes, with bitsandbytes' dequantization and matmul.

A ``BnbTensor`` is a weight ``[O, I]`` quantized with bitsandbytes' own functions (see
``moe_local.quant.bnb.quantize_bnb``) and multiplied with its kernels (``bitsandbytes.matmul_4bit`` /
the ``int8_scaled_mm`` op). It round-trips through a flat dict of plain tensors (``tensors()`` /
``from_tensors``) plus the JSON-able metadata ``shape`` and ``btype.full_name``, so it can live in the
same blobs as ``QuantizedTensor``.

On CPU the fast 4-bit kernel needs its own weight layout, which ``linear`` builds from the stored layout
on first use and caches (``kernel_cache_nbytes``; about the size of the packed codes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from moe_local.quant.base import QuantizedWeight, check_shape
from moe_local.quant.bnb_backend import (
    BNB_FLOAT_DTYPES,
    CPU_PACK_BLOCK_N,
    clone_state,
    cpu_4bit_packer,
    has_cpu_kernel,
    import_bnb,
)
from moe_local.quant.bnb_type import NESTED_BLOCKSIZE, BnbType, as_btype
from moe_local.quant.rtn import row_chunks

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

# Shapes: [O, I] weight, [..., I] activations, [..., O] outputs; B = blocks = ceil(O * I / blocksize).

KERNEL_MAX_TOKENS = 256  # above this many rows of x, dequantize + dense matmul beats the CPU 4-bit kernel
QUANT_CHUNK_ELEMS = 1 << 22  # weights quantized / dequantized at once (bounds the fp32 temporaries)
INT8_DEQUANT_SCALE = 7.874015718698502e-3  # 1 / 127 as bitsandbytes' int8_vectorwise_dequant writes it

TENSOR_NAMES_4BIT: tuple[str, ...] = ("weight", "absmax", "quant_map")
TENSOR_NAMES_NESTED: tuple[str, ...] = ("nested_absmax", "nested_quant_map", "nested_offset")
TENSOR_NAMES_INT8: tuple[str, ...] = ("weight", "SCB")


def expected_tensors(
    shape: tuple[int, int], btype: BnbType
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored tensors of a ``btype`` weight of ``shape``: name -> (shape, dtype), in storage order."""
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


class BnbTensor(QuantizedWeight):
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
        self.shape: tuple[int, int] = check_shape(shape)
        self.btype = btype
        expected = expected_tensors(self.shape, btype)
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
    def scheme(self) -> BnbType:
        """The scheme, ``btype``."""
        return self.btype

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self._tensors["weight"].device

    def _kernel_cache_tensors(self) -> tuple[torch.Tensor, ...]:
        # the CPU 4-bit layout: packed codes and bf16 absmax (its QuantState holds the same tensors)
        return self._kernel.get("cpu4bit_tensors", ())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name the stored tensors for serialization.

        Returns:
            The tensors listed in the class docstring (not copies).
        """
        return dict(self._tensors)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: BnbType | str
    ) -> BnbTensor:
        """Rebuild a ``BnbTensor`` from ``tensors()`` output.

        Args:
            tensors: exactly the keys ``tensors()`` returns for ``scheme``.
            shape: ``(O, I)``.
            scheme: the ``BnbType`` (or its name) the tensors were made with.

        Returns:
            The quantized tensor (sharing memory with ``tensors``).

        Raises:
            ValueError: on missing or extra keys, or tensors of the wrong dtype, shape or device.
        """
        return cls(dict(tensors), shape, as_btype(scheme))

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
        _, bnbf = import_bnb()
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

    def _absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax as fp32 ``[B]`` (undoing double quantization)."""
        if not self.btype.double_quant:
            return self._tensors["absmax"]
        _, bnbf = import_bnb()
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
        _, bnbf = import_bnb()
        o, i = self.shape
        if self.btype.kind == "int8":
            out = torch.empty(o, i, dtype=dtype, device=self.device)
            codes, scb = self._tensors["weight"], self._tensors["SCB"]
            for start, end in row_chunks(o, i, QUANT_CHUNK_ELEMS):
                out[start:end] = bnbf.int8_vectorwise_dequant(codes[start:end], scb[start:end])
            return out
        direct = dtype in BNB_FLOAT_DTYPES
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
            packer = cpu_4bit_packer()
            if packer is None:
                return None
            qs = self.quant_state()
            if qs.nested:
                qs.absmax, qs.state2, qs.offset, qs.nested = self._absmax_fp32(), None, None, False
            packed, cpu_state = packer(self._tensors["weight"], clone_state(qs))
            self._kernel["cpu4bit"] = (packed, cpu_state)
            self._kernel["cpu4bit_tensors"] = (packed, cpu_state.absmax)
        return self._kernel["cpu4bit"]

    def _linear_4bit(self, x2: torch.Tensor, use_kernel: bool | None) -> torch.Tensor:
        bnb, _ = import_bnb()
        if use_kernel is False:
            return F.linear(x2, self.dequantize(x2.dtype))
        if self.device.type == "cpu" and (use_kernel or x2.shape[0] <= KERNEL_MAX_TOKENS):
            cpu = self._cpu_kernel_tensors()
            if cpu is not None:
                return bnb.matmul_4bit(x2, cpu[0], cpu[1]).to(x2.dtype)
        # The stored layout: bitsandbytes' own kernels on CUDA / XPU; on CPU its generic path
        # (dequantize_4bit into x's dtype, then a dense matmul).
        dtype = x2.dtype if x2.dtype in BNB_FLOAT_DTYPES else torch.float32
        return bnb.matmul_4bit(x2.to(dtype), self._tensors["weight"], self.quant_state(dtype)).to(x2.dtype)

    def _linear_int8(self, x2: torch.Tensor, use_kernel: bool | None) -> torch.Tensor:
        _, bnbf = import_bnb()
        on_cpu = self.device.type == "cpu"
        fast = not on_cpu or has_cpu_kernel("bitsandbytes::int8_linear_matmul")
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
        xq = x2 if on_cpu and x2.dtype in BNB_FLOAT_DTYPES else x2.half()
        ca, sca, _ = bnbf.int8_vectorwise_quant(xq)
        out_dtype = x2.dtype if x2.dtype in BNB_FLOAT_DTYPES else torch.float32
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
        self._check_linear_args(x, bias)
        o, i = self.shape
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
