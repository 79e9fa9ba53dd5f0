"""The decode step's small bf16 operations in one native call each (``ops.c``), with torch's values.

Built and loaded like the quantized-matmul kernel (``moe_local.quant.native.compile_and_load``);
``available()`` is False where that kernel is unavailable, and the lean decode step is then not used.
Every function takes and returns contiguous bfloat16 CPU tensors; shapes are in each docstring
(H hidden size, D head size, S cached positions, E experts, K experts per token).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from moe_local.quant import native

SOURCE = Path(__file__).with_name("ops.c")
_ABI = 3
MAX_HEAD_DIM = 512  # ops.c's stack buffers
MAX_ROUTER_WIDTH = 16384


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.compile_and_load(SOURCE, "moe_local_lean_abi", _ABI)
    if lib is None:
        return None
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.moe_local_rmsnorm_bf16.argtypes = [ptr, ptr, i32, i32, f32, ptr]
    lib.moe_local_rmsnorm_bf16.restype = None
    lib.moe_local_rope_bf16.argtypes = [ptr, i32, i32, ptr, ptr]
    lib.moe_local_rope_bf16.restype = None
    lib.moe_local_attend_bf16.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, i32, f32, ptr, ptr, i32]
    lib.moe_local_attend_bf16.restype = None
    lib.moe_local_route_bf16.argtypes = [ptr, ptr, i32, i32, i32, i32, ptr, ptr, ptr]
    lib.moe_local_route_bf16.restype = None
    return lib


def available() -> bool:
    """Whether the operations are built (or buildable) and loadable on this machine."""
    return _library() is not None


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the lean decode operations are not available (check ops.available() first)")
    return lib


def _bf16(*tensors: torch.Tensor) -> None:
    """The C side reads raw pointers: anything but contiguous bf16 CPU memory would be read wrong."""
    for t in tensors:
        if t.dtype is not torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("the lean operations take contiguous bfloat16 CPU tensors")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of bf16 rows: ``weight * bf16(x * rsqrt(mean(x^2) + eps))`` per row.

    Args:
        x: [H] or [rows, H] bfloat16 (a per-head norm: [heads, D]).
        weight: [H] bfloat16.
        eps: the norm's epsilon.

    Returns:
        ``x``'s shape, bfloat16.
    """
    _bf16(x, weight)
    width = x.shape[-1]
    if weight.numel() != width:
        raise ValueError(f"a norm weight of {weight.numel()} values for rows of {width}")
    out = torch.empty_like(x)
    rows = x.numel() // width
    _lib().moe_local_rmsnorm_bf16(x.data_ptr(), weight.data_ptr(), rows, width, eps, out.data_ptr())
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place: ``x * cos + rotate_half(x) * sin`` with bf16 roundings.

    Args:
        x: [heads, D] bfloat16, changed in place.
        cos: [D] bfloat16.
        sin: [D] bfloat16.

    Returns:
        ``x``.
    """
    _bf16(x, cos, sin)
    heads, d = x.shape
    if d % 2 or cos.numel() != d or sin.numel() != d:
        raise ValueError(f"rotation tables of {cos.numel()} values for heads of {d}")
    _lib().moe_local_rope_bf16(x.data_ptr(), heads, d, cos.data_ptr(), sin.data_ptr())
    return x


def scores_size(heads: int, kv_heads: int, length: int) -> int:
    """Float32 values of scratch ``attend`` needs: 4 lanes per group of up to 4 query heads per position."""
    return kv_heads * -(-(heads // kv_heads) // 4) * 4 * length


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, scale: float, scores: torch.Tensor
) -> torch.Tensor:
    """One query's grouped-query attention over the first ``length`` cached positions, in float32.

    Args:
        q: [Hq, D] bfloat16.
        k: [Hkv, capacity, D] bfloat16 keys.
        v: [Hkv, capacity, D] bfloat16 values.
        length: positions to attend to (the query's own included).
        scale: the scores' factor (``head_dim ** -0.5``).
        scores: float32 scratch of at least ``scores_size(Hq, Hkv, length)`` values.

    Returns:
        [Hq * D] bfloat16.
    """
    _bf16(q, k, v)
    hq, d = q.shape
    hkv, capacity, _ = k.shape
    if d > MAX_HEAD_DIM or k.shape != v.shape or k.shape[2] != d or hq % hkv or not 0 < length <= capacity:
        raise ValueError(f"attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, {length} positions")
    need = scores_size(hq, hkv, length)
    if scores.dtype is not torch.float32 or not scores.is_contiguous() or scores.numel() < need:
        raise ValueError(f"scores must be contiguous float32 of at least {need} values")
    # split across threads once the call is worth it (q k and p v: 2 Hq S D multiply-adds)
    threads = torch.get_num_threads() if 2 * hq * length * d >= native.THREADED_MACS else 1
    out = torch.empty(hq * d, dtype=torch.bfloat16)
    _lib().moe_local_attend_bf16(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), hq, hkv, d, length, capacity, scale,
        scores.data_ptr(), out.data_ptr(), threads,
    )  # fmt: skip
    return out


class Router:
    """A top-k softmax router (Mixtral's) on one token, with its buffers made once.

    Args:
        weight: [E, H] bfloat16 router weight.
        top_k: experts per token.
        renormalize: divide the chosen probabilities by their sum.
    """

    def __init__(self, weight: torch.Tensor, top_k: int, renormalize: bool) -> None:
        self.weight = weight.contiguous()
        _bf16(self.weight)
        self.experts, self.width = self.weight.shape
        if not 1 <= top_k <= self.experts or self.width > MAX_ROUTER_WIDTH:
            raise ValueError(f"top-{top_k} of {self.experts} experts, width {self.width}: not routable here")
        self.top_k, self.renormalize = top_k, renormalize
        self._logits = torch.empty(self.experts, dtype=torch.float32)
        self._ids = torch.empty(top_k, dtype=torch.int32)
        self._weights = torch.empty(top_k, dtype=torch.float32)

    def __call__(self, h: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Route ``h`` [H] bfloat16.

        Returns:
            (expert ids, most probable first; their routing weights [K] float32).
        """
        _bf16(h)
        if h.numel() != self.width:
            raise ValueError(f"a router of width {self.width} given {h.numel()} values")
        _lib().moe_local_route_bf16(
            h.data_ptr(), self.weight.data_ptr(), self.experts, self.width, self.top_k,
            int(self.renormalize), self._logits.data_ptr(), self._ids.data_ptr(), self._weights.data_ptr(),
        )  # fmt: skip
        return self._ids.tolist(), self._weights.clone()
