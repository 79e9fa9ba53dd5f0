"""Float (unquantized) weights computed in bfloat16 on the CPU, at the speed the CPU allows.

torch's CPU bf16 matmul converts the weight on the fly: without AVX-512 BF16 it runs a
matrix-vector product at about half the memory bandwidth one needs (a decode step is almost only
those), and many rows several times slower than float32 (measured on the 2-core AVX2 machine,
[3584, 1024] weight: 1 row 948 us against 622 us here; 512 rows 377 ms against 59 ms here).

``dense_linear`` therefore sends few bf16 rows to the native kernel (``native.dense_bf16``: float32
products and sums, rounded once, as torch rounds them) and many rows through float32 (the weight
converted a block of rows at a time, one float32 GEMM per block, rounded once to bf16). On a CPU
with bf16 dot-product instructions (AVX-512 BF16 or AMX) torch's own bf16 GEMM is the fast one
(2.4-3x float32's on a 2-core AVX-512 BF16 machine, float32 sums of the same exact products), so
many rows run there as they are (``native.BF16_GEMM``). Anything else, or a machine without the native
kernel, stays ``F.linear``.

``NativeDenseLinear`` is ``nn.Linear`` with that forward; ``use_native_dense`` swaps it in for every
``nn.Linear`` of a bf16 model on the CPU, sharing the parameters (tied weights stay tied).

Shapes: ``x [..., I]``, ``weight [O, I]``, ``bias [O]``, out ``[..., O]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.quant import native
from moe_local.quant.rtn import row_chunks
from moe_local.quant.scratch import float32_rows

NATIVE_DENSE_MAX_ROWS = 16  # above this many rows the float32 GEMM beats the native kernel

CONVERT_CHUNK_ELEMS = 1 << 22  # weights converted to float32 at once by the many-row path (16 MiB)


def _cpu_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype is torch.bfloat16
        and weight.dtype is torch.bfloat16
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[-1]
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))  # no autograd here
        and native.available()
    )


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on the fast path for bf16 on the CPU (see the module docstring).

    Args:
        x: ``[..., I]``.
        weight: ``[O, I]``.
        bias: ``[O]`` or None.

    Returns:
        ``[..., O]`` in ``x.dtype``.
    """
    if not _cpu_bf16(x, weight):
        return F.linear(x, weight, bias)
    o, i = weight.shape
    x2 = x.reshape(-1, i)
    rows = x2.shape[0]
    if rows == 0:
        return F.linear(x, weight, bias)
    if bias is None and rows <= NATIVE_DENSE_MAX_ROWS:
        out = native.dense_bf16(x2, weight)
    elif native.BF16_GEMM:
        out = F.linear(x2, weight, bias)
    else:
        xf = x2.float()
        bf = None if bias is None else bias.float()
        parts = [
            F.linear(xf, _widened(weight, start, end), None if bf is None else bf[start:end])
            for start, end in row_chunks(o, i, CONVERT_CHUNK_ELEMS)
        ]
        out = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(torch.bfloat16)
    return out.reshape(*x.shape[:-1], o)


def _widened(weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``[start, end)`` of ``weight`` in float32, in this thread's reused buffer (``scratch``)."""
    out = float32_rows(end - start, weight.shape[1], CONVERT_CHUNK_ELEMS)
    return out.copy_(weight[start:end])


class NativeDenseLinear(nn.Linear):
    """``nn.Linear`` whose forward is ``dense_linear`` (the same parameters, the same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer (``dense_linear``)."""
        return dense_linear(x, self.weight, self.bias)

    @classmethod
    def sharing(cls, linear: nn.Linear) -> NativeDenseLinear:
        """A ``NativeDenseLinear`` over ``linear``'s own parameters (nothing copied).

        Args:
            linear: the layer to take the parameters of.

        Returns:
            The new layer.
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.__dict__.update({k: v for k, v in linear.__dict__.items() if k not in new.__dict__})
        return new


def use_native_dense(model: nn.Module) -> int:
    """Swap every plain bf16 CPU ``nn.Linear`` of ``model`` for a ``NativeDenseLinear`` (in place).

    Args:
        model: a model on the CPU.

    Returns:
        How many layers were swapped (0 without the native kernel).
    """
    if not native.available():
        return 0
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.dtype is torch.bfloat16 and m.weight.device.type == "cpu"
    ]
    for name in names:
        model.set_submodule(name, NativeDenseLinear.sharing(model.get_submodule(name)))
    return len(names)
