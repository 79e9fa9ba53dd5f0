"""moe-local's own CPU kernel (``qlinear.c``): quantized matmul straight from the stored codes.

torch's CPU int4 kernel reaches about 1.8 GB/s of codes on one AVX2 core and needs the codes in
its own layout (a conversion at load, or a second copy); llama.cpp's Q4_0 x Q8_0 dot reaches
about 9 GB/s. ``qlinear.c`` does what llama.cpp does (activations quantized to int8 per chunk,
integer multiply-adds with AVX2) on moe-local's packing as it is stored, for 8-, 4- and 2-bit
codes; see its header for the arithmetic. The result differs from ``W_hat @ x`` only by the
activations' int8 rounding (relative error about 0.4%, bounded in ``tests/quant/test_native.py``).

The C source is compiled once per machine with the system's C compiler (``cc``, or ``$CC``) into
``MOE_LOCAL_HOME/kernels`` and loaded with ctypes. Without a compiler, AVX2/FMA/F16C, or with
``MOE_LOCAL_NATIVE=0``, ``available()`` is False and the weights run on torch's kernels as before.

Shapes: ``x2 [M, I]``, codes ``[O, I * bits / 8]``, scales/zeros ``[O, G]``, out ``[M, O]``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from moe_local import env

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qlinear.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared", "-fopenmp")
NATIVE_BITS: tuple[int, ...] = (8, 4, 2)
_CHUNK_BYTES = 32  # codes per chunk: 32 bytes of them (see qlinear.c)
_ABI = 12
# Multiply-adds of one call from which the rows are split over torch's threads: below it, waking
# the second thread (and waiting for it when another process holds that core) costs more than it saves.
# 2^19 splits a decode step's 1024 x 1024 attention projections too: at 2 threads the lean step of the
# 8-layer benchmark model went from 12.0-12.7 to 8.2-10.0 ms (2^21 kept them on one thread).
THREADED_MACS = 1 << 19
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty off x86-64 Linux)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    lines = (line for line in text.splitlines() if line.startswith("flags"))
    return frozenset(next((line.split(":", 1)[1].split() for line in lines), []))


def _cpu_has_flags() -> bool:
    return all(f in cpu_flags() for f in _REQUIRED_CPU_FLAGS)


# torch's bf16 GEMM is the fast one for many rows where the CPU multiplies bf16 pairs itself (AVX-512
# BF16, AMX: 2.4-3x float32's on a 2-core AVX-512 BF16 machine); elsewhere float32 is (3-7x on AVX2)
BF16_GEMM = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, source: Path, out: Path) -> bool:
    """Compile ``source`` into ``out`` (atomically: a half-written library is never loaded)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        for flags in (FLAGS, tuple(f for f in FLAGS if f != "-fopenmp")):  # without OpenMP: one thread
            cmd = [cc, *flags, str(source), "-o", str(target), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                os.replace(target, out)
                return True
            log.debug("native kernel build failed: %s\n%s", " ".join(cmd), done.stderr[-2000:])
    return False


def compile_and_load(source: Path, abi_symbol: str, abi: int) -> ctypes.CDLL | None:
    """Build ``source`` once per machine into ``MOE_LOCAL_HOME/kernels`` and load it.

    Args:
        source: a C file of moe-local's.
        abi_symbol: its function returning the ABI number.
        abi: the number the Python side was written for.

    Returns:
        The library, or None with ``MOE_LOCAL_NATIVE=0``, without AVX2/FMA/F16C or a C compiler, when
        it does not compile or load, or when its ABI differs.
    """
    if env.NATIVE.get().strip() == "0" or not _cpu_has_flags():
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: %s is not used", source.name)
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    path = env.home_dir() / "kernels" / f"{source.stem}-{key}.so"
    try:
        if not path.exists() and not _build(cc, source, path):
            log.info("%s did not compile: torch's kernels run instead", source.name)
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.info("%s cannot be loaded (%s): torch's kernels run instead", source.name, exc)
        return None
    return lib if getattr(lib, abi_symbol)() == abi else None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = compile_and_load(SOURCE, "moe_local_qlinear_abi", _ABI)
    if lib is None:
        return None
    fn = lib.moe_local_qlinear
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, i32, i32, ptr, i32, ptr, i32]
    fn.restype = i32
    fn16 = lib.moe_local_qlinear_bf16
    fn16.argtypes = fn.argtypes
    fn16.restype = i32
    dense = lib.moe_local_linear_bf16
    dense.argtypes = [ptr, i32, i32, ptr, i32, ptr, i32]
    dense.restype = i32
    mx = lib.moe_local_mxfp4_bf16
    mx.argtypes = [ptr, ptr, i32, i32, ptr, i32, ptr, i32]
    mx.restype = i32
    ex = lib.moe_local_expert_bf16
    ex.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, ptr, ptr, ptr, i32, i32, i32, i32]
    ex.argtypes += [i32, i32, ptr, i32, ptr, i32, i32]
    ex.restype = i32
    mix = lib.moe_local_experts_rows_bf16
    mix.argtypes = [i32, ptr, ptr, i32, i32, ptr, ptr, ptr, i32, i32, ptr, ptr, ptr, i32, i32]
    mix.restype = i32
    deq = lib.moe_local_dequantize
    deq.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, i32, i32, i32, ptr, i32]
    deq.restype = None
    tern = lib.moe_local_ternary_to_2bit
    tern.argtypes = [ptr, ctypes.c_int64, i32, i32, ptr]
    tern.restype = i32
    return lib


def row_strides(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[int, int] | None:
    """The kernel's row strides of a weight's tensors: (code bytes, scale values) between rows.

    Rows may lie apart (``moe_local.quant.interleave`` puts each row's codes, scales and zeros side
    by side), but each row must be contiguous and scales and zeros must share a stride.

    Returns:
        The strides, or None where the kernel cannot read the tensors as they lie.
    """
    if packed.dim() != 2 or scales.dim() != 2 or zeros.dim() != 2:
        return None
    if any(t.shape[1] > 1 and t.stride(1) != 1 for t in (packed, scales, zeros)):
        return None
    code_stride, scale_stride = packed.stride(0), scales.stride(0)
    if zeros.stride(0) != scale_stride or code_stride < packed.shape[1] or scale_stride < scales.shape[1]:
        return None
    return code_stride, scale_stride


def _readable(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The tensors as the kernel can read them (copied only where their rows are not), and strides."""
    strides = row_strides(packed, scales, zeros)
    if strides is None:
        packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
        strides = (packed.shape[1], scales.shape[1])
    return packed, scales, zeros, strides


def available() -> bool:
    """Whether the native kernel is built (or buildable) and loadable on this machine."""
    return _library() is not None


def supports(shape: tuple[int, int], bits: int, group_size: int, device: torch.device) -> bool:
    """Whether a weight of this shape and scheme runs on the native kernel.

    Args:
        shape: ``(O, I)``.
        bits: code width.
        group_size: weights per group.
        device: where the weight lives.

    Returns:
        True for CPU weights of 8, 4 or 2 bits whose groups hold whole 32-byte chunks of codes or
        an eighth, a quarter or a half of one (int4 in groups of 16 or 32, int8 in groups of 16,
        2-bit in groups of 16 to 64), on rows of whole chunks.
    """
    if device.type != "cpu" or bits not in NATIVE_BITS:
        return False
    per_chunk = _CHUNK_BYTES * 8 // bits
    whole = group_size % per_chunk == 0 or (per_chunk % group_size == 0 and per_chunk // group_size <= 8)
    return whole and shape[1] % group_size == 0 and shape[1] % per_chunk == 0 and available()


def qlinear(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x2 @ W_hat.T`` from the stored codes.

    Args:
        x2: activations ``[M, I]``, any float dtype.
        packed: codes ``[O, I * bits / 8]`` uint8 as ``pack_codes`` writes them.
        scales: ``[O, G]`` fp16.
        zeros: ``[O, G]`` fp16.
        shape: ``(O, I)``.
        bits: 8, 4 or 2.
        group_size: weights per group (see ``supports``).

    Returns:
        ``[M, O]``: bfloat16 for bfloat16 ``x2`` (rounded as ``Tensor.to`` rounds), else float32.

    Raises:
        MemoryError: the kernel's temporaries (``M * I`` bytes and two small arrays) cannot be allocated.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernel is not available (check native.available() first)")
    o, i = shape
    m = x2.shape[0]
    bf16 = x2.dtype == torch.bfloat16
    x = x2.contiguous() if bf16 else x2.to(torch.float32).contiguous()
    out = torch.empty(m, o, dtype=torch.bfloat16 if bf16 else torch.float32)
    threads = torch.get_num_threads() if m * o * i >= THREADED_MACS else 1
    call = lib.moe_local_qlinear_bf16 if bf16 else lib.moe_local_qlinear
    packed, scales, zeros, strides = _readable(packed, scales, zeros)  # no copies as read
    rc = call(
        packed.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr(),
        o,
        i,
        bits,
        group_size,
        *strides,
        x.data_ptr(),
        m,
        out.data_ptr(),
        threads,
    )
    if rc != 0:
        raise MemoryError(f"the native kernel could not allocate its temporaries for a {m} x {i} input")
    return out


def dense_bf16(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x2 @ weight.T`` for a bf16 weight and bf16 activations, float32 inside, bf16 out.

    torch's CPU bf16 matmul of a few rows converts the weight at about half the memory bandwidth
    a matrix-vector product needs; this reads it at full speed (the decode path of a bf16 model).

    Args:
        x2: ``[M, I]`` bfloat16 (few rows: the kernel reads the weight once per 4 rows).
        weight: ``[O, I]`` bfloat16 on the CPU.

    Returns:
        ``[M, O]`` bfloat16: each output the float32 sum of float32 products, rounded once.

    Raises:
        MemoryError: the kernel's float32 copies of ``x2`` and the output cannot be allocated.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernel is not available (check native.available() first)")
    o, i = weight.shape
    m = x2.shape[0]
    x, w = x2.contiguous(), weight.contiguous()
    out = torch.empty(m, o, dtype=torch.bfloat16)
    threads = torch.get_num_threads() if m * o * i >= THREADED_MACS else 1
    if lib.moe_local_linear_bf16(w.data_ptr(), o, i, x.data_ptr(), m, out.data_ptr(), threads) != 0:
        raise MemoryError(f"the native kernel could not allocate its temporaries for a {m}-row input")
    return out


def mxfp4_bf16(
    x2: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """``x2 @ W.T`` for an MXFP4 weight, straight from its blocks (activations rounded to int8 per
    64 values, as the 4-bit kernel does; see ``qlinear.c``).

    Args:
        x2: ``[M, I]`` bfloat16 (few rows), ``I`` a multiple of 64.
        blocks: ``[O, I / 32, 16]`` uint8 e2m1 pairs.
        scales: ``[O, I / 32]`` uint8 e8m0 exponents.
        shape: ``(O, I)``.

    Returns:
        ``[M, O]`` bfloat16.

    Raises:
        MemoryError: the kernel's temporaries cannot be allocated.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernel is not available (check native.available() first)")
    o, i = shape
    m = x2.shape[0]
    x, b, s = x2.contiguous(), blocks.contiguous(), scales.contiguous()
    out = torch.empty(m, o, dtype=torch.bfloat16)
    threads = torch.get_num_threads() if m * o * i >= THREADED_MACS else 1
    rc = lib.moe_local_mxfp4_bf16(b.data_ptr(), s.data_ptr(), o, i, x.data_ptr(), m, out.data_ptr(), threads)
    if rc != 0:
        raise MemoryError(f"the native kernel could not allocate its temporaries for a {m}-row input")
    return out


class NativeWeight:
    """One weight's arguments to the kernel, built once: the decode path's call without re-checks.

    A decode step calls each weight with one row; converting and checking the same pointers and
    sizes at every call cost several times the C call itself. The tensors are kept referenced here,
    so the pointers stay valid as long as this object lives.

    Args:
        packed: codes ``[O, I * bits / 8]`` uint8, rows contiguous (``row_strides``).
        scales: ``[O, G]`` fp16, likewise.
        zeros: ``[O, G]`` fp16, with the stride of ``scales``.
        shape: ``(O, I)``.
        bits: 8, 4 or 2.
        group_size: weights per group (see ``supports``).
    """

    __slots__ = ("_args", "_lib", "_tensors", "in_features", "out_features")

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        shape: tuple[int, int],
        bits: int,
        group_size: int,
    ) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("the native kernel is not available (check native.available() first)")
        strides = row_strides(packed, scales, zeros)
        if strides is None:
            raise ValueError("the native kernel reads codes, scales and zeros of contiguous rows")
        self._lib = lib
        self._tensors = (packed, scales, zeros)
        self.out_features, self.in_features = shape
        pointers = (packed.data_ptr(), scales.data_ptr(), zeros.data_ptr())
        self._args = (*pointers, shape[0], shape[1], bits, group_size, *strides)

    def threads_for(self, rows: int) -> int:
        """Threads for ``rows`` rows of x: torch's, once the call is big enough to be worth splitting."""
        return torch.get_num_threads() if rows * self.out_features * self.in_features >= THREADED_MACS else 1

    def reads(self, packed: torch.Tensor | None, scales: torch.Tensor, zeros: torch.Tensor) -> bool:
        """Whether these are the tensors this call was built on (not replaced since)."""
        held = self._tensors
        return packed is held[0] and scales is held[1] and zeros is held[2]

    def linear_bf16(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W_hat.T`` for contiguous bfloat16 ``x2 [M, I]`` on the CPU (the caller checked).

        Returns:
            ``[M, O]`` bfloat16.
        """
        m = x2.shape[0]
        o = self.out_features
        out = torch.empty(m, o, dtype=torch.bfloat16)
        threads = torch.get_num_threads() if m * o * self.in_features >= THREADED_MACS else 1
        rc = self._lib.moe_local_qlinear_bf16(*self._args, x2.data_ptr(), m, out.data_ptr(), threads)
        if rc != 0:
            raise MemoryError(f"the native kernel could not allocate its temporaries for a {m}-row input")
        return out


class DenseWeight:
    """A plain bf16 weight's arguments to the fused expert calls (``expert_bf16``, ``experts_bf16``).

    The kernel takes it as a weight of 16 "bits": the matrix itself, computed as ``dense_bf16`` computes
    it, so the experts of a bf16 model run a decode token in one call like quantized ones.

    Args:
        weight: ``[O, I]`` bfloat16, contiguous, on the CPU.
    """

    __slots__ = ("_args", "_lib", "_tensors", "in_features", "out_features")

    def __init__(self, weight: torch.Tensor) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("the native kernel is not available (check native.available() first)")
        if weight.dtype is not torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
            raise ValueError("a dense weight of the fused calls is a contiguous bf16 matrix")
        if weight.device.type != "cpu":
            raise ValueError("a dense weight of the fused calls lies on the CPU")
        self._lib = lib
        self._tensors = (weight,)
        self.out_features, self.in_features = weight.shape
        self._args = (weight.data_ptr(), None, None, self.out_features, self.in_features, 16, 0, 0, 0)

    threads_for = NativeWeight.threads_for


def dequantize_rows(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    start: int,
    end: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W_hat`` rows ``[start, end)`` in float32, from the stored codes (exactly ``(q - zero) * scale``
    rounded once to float32, as ``QuantizedTensor.dequantize_rows`` computes it).

    Args:
        packed: codes ``[O, I * bits / 8]`` uint8.
        scales: ``[O, G]`` fp16.
        zeros: ``[O, G]`` fp16.
        shape: ``(O, I)``.
        bits: 8, 4 or 2.
        group_size: weights per group.
        start: first row.
        end: one past the last row.
        out: a contiguous float32 ``[end - start, I]`` to write into (default: a new tensor).

    Returns:
        ``[end - start, I]`` float32 (``out`` when given).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernel is not available (check native.available() first)")
    i = shape[1]
    packed, scales, zeros, strides = _readable(packed, scales, zeros)
    if out is None:
        out = torch.empty(end - start, i, dtype=torch.float32)
    elif out.dtype != torch.float32 or tuple(out.shape) != (end - start, i) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [{end - start}, {i}]")
    threads = torch.get_num_threads() if (end - start) * i >= THREADED_MACS else 1
    pointers = (packed.data_ptr(), scales.data_ptr(), zeros.data_ptr())
    lib.moe_local_dequantize(*pointers, i, bits, group_size, *strides, start, end, out.data_ptr(), threads)
    return out


FusedWeight = NativeWeight | DenseWeight


def expert_bf16(x2: torch.Tensor, gate_up: FusedWeight, down: FusedWeight) -> torch.Tensor:
    """One gated expert, ``down(silu(gate) * up)``, in one call (the values the separate calls give).

    Args:
        x2: contiguous bfloat16 ``[M, H]`` on the CPU (few rows).
        gate_up: the expert's ``[2I, H]`` weight, gate rows first.
        down: its ``[H, I]`` weight.

    Returns:
        ``[M, H]`` bfloat16.

    Raises:
        MemoryError: the kernel's temporaries cannot be allocated.
    """
    m = x2.shape[0]
    h, i = down.out_features, down.in_features
    out = torch.empty(m, h, dtype=torch.bfloat16)
    gu, d = gate_up._args, down._args  # (codes, scales, zeros, O, I, bits, group, code/scale strides)
    rc = gate_up._lib.moe_local_expert_bf16(
        *gu[:3],
        *gu[5:9],
        *d[:3],
        *d[5:9],
        h,
        i,
        x2.data_ptr(),
        m,
        out.data_ptr(),
        gate_up.threads_for(m),
        down.threads_for(m),
    )
    if rc != 0:
        raise MemoryError(f"the native kernel could not allocate its temporaries for a {m}-row input")
    return out


def experts_bf16(
    x2: torch.Tensor, experts: list[tuple[FusedWeight, FusedWeight]], weights: torch.Tensor
) -> torch.Tensor:
    """One token's gated experts mixed by their routing weights, in one call.

    The values of ``expert_bf16`` per expert, each times its weight rounded to bf16, added in the
    given order from zero with a bf16 rounding after each addition (``OffloadedExperts``' loop).

    Args:
        x2: contiguous bfloat16 ``[1, H]`` on the CPU.
        experts: ``(gate_up, down)`` of each expert, in the order to add them.
        weights: ``[n]`` float32 routing weights in the same order.

    Returns:
        ``[1, H]`` bfloat16.

    Raises:
        MemoryError: the kernel's temporaries cannot be allocated.
    """
    n = len(experts)
    return _rows_call(x2, experts, [0] * n, list(range(n + 1)), list(range(n)), weights.tolist(), 1, n, 1)


def experts_rows_bf16(
    x2: torch.Tensor,
    experts: list[tuple[FusedWeight, FusedWeight]],
    rows: list[list[int]],
    mix: list[list[int]],
    weights: torch.Tensor,
) -> torch.Tensor:
    """Several rows' gated experts, each expert computed once for all its rows, in one call.

    Args:
        x2: contiguous bfloat16 ``[B, H]`` on the CPU.
        experts: ``(gate_up, down)`` of each of n experts.
        rows: for each expert, the rows of ``x2`` it computes (its output "pairs", numbered in
            expert order: expert 0's rows first).
        mix: for each row, the pairs it adds, in order (at most K of them).
        weights: ``[B, K]`` float32: the routing weight of each of those pairs.

    Returns:
        ``[B, H]`` bfloat16: row b is the sum from zero of its pairs' outputs times their weights,
        a bf16 rounding after each product and addition (``OffloadedExperts``' loop).

    Raises:
        MemoryError: the kernel's temporaries cannot be allocated.
    """
    b, k = weights.shape
    if len(rows) != len(experts) or len(mix) != b or any(len(m) > k for m in mix):
        raise ValueError("rows, mix and weights must describe the same experts and rows")
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + len(r))
    if any(not 0 <= j < b for r in rows for j in r) or any(not 0 <= p < starts[-1] for m in mix for p in m):
        raise ValueError("a row or pair index outside the call")
    order = [p for m in mix for p in m + [-1] * (k - len(m))]  # [B * K]
    flat = [j for r in rows for j in r]
    most = max(map(len, rows))
    return _rows_call(x2, experts, flat, starts, order, weights.reshape(-1).tolist(), b, k, most)


def _rows_call(x2, experts, flat, starts, order, weights, b: int, k: int, most_rows: int) -> torch.Tensor:
    """The native call of ``experts_rows_bf16`` on checked arguments (ctypes arrays: a decode step
    makes this call once per layer, where building tensors for its six small arrays cost more)."""
    first_gu, first_d = experts[0]
    h, i = first_d.out_features, first_d.in_features
    n = len(experts)
    ptrs = (ctypes.c_int64 * (6 * n))(*(p or 0 for gu, d in experts for p in (*gu._args[:3], *d._args[:3])))
    meta = (ctypes.c_int32 * (8 * n))(*(v for gu, d in experts for v in (*gu._args[5:9], *d._args[5:9])))
    out = torch.empty(b, h, dtype=torch.bfloat16)
    rc = first_gu._lib.moe_local_experts_rows_bf16(
        n, ptrs, meta, h, i, x2.data_ptr(), (ctypes.c_int32 * len(flat))(*flat),
        (ctypes.c_int32 * len(starts))(*starts), b, k, (ctypes.c_int32 * len(order))(*order),
        (ctypes.c_float * len(weights))(*weights), out.data_ptr(),
        first_gu.threads_for(most_rows), first_d.threads_for(most_rows),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("the native kernel could not allocate its temporaries for the experts")
    return out


def ternary_to_2bit(packed: torch.Tensor, n: int) -> torch.Tensor | None:
    """``pack.ternary_to_2bit`` in C (one table lookup a byte), or None where the kernel is not built.

    Args:
        packed: contiguous CPU ``uint8`` ``[R, ceil(n / 5)]``, checked by the caller.
        n: codes per row, a multiple of 4.

    Returns:
        ``[R, n / 4]`` uint8, or None without the native library.

    Raises:
        ValueError: on a byte above 242 (the data is not ternary-packed).
    """
    lib = _library()
    if lib is None or packed.device.type != "cpu":
        return None
    packed = packed.contiguous()
    rows = packed.numel() // max(packed.shape[-1], 1)
    out = torch.empty(*packed.shape[:-1], n // 4, dtype=torch.uint8)
    if lib.moe_local_ternary_to_2bit(packed.data_ptr(), rows, packed.shape[-1], n, out.data_ptr()):
        raise ValueError("a ternary-packed byte is at most 242: the data is not ternary-packed")
    return out
