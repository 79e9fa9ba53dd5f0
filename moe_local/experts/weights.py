"""One expert's weights in the canonical moe-local layout.

Every family is reduced to the same shape: ``gate_up`` [2I, H] (or ``up`` [I, H] for
ungated experts), ``down`` [H, I], optional biases; rows of ``gate_up`` keep the order the
family's own gate function expects (concatenated or interleaved).
Legend: H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_local.quant.base import QuantizedWeight
from moe_local.quant.dense import dense_linear

WeightLike = torch.Tensor | QuantizedWeight


def apply_linear(x: torch.Tensor, weight: WeightLike, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Compute ``x @ weight^T + bias`` for a dense tensor or a quantized weight.

    Args:
        x: input [T, in].
        weight: dense [out, in] tensor or an object with ``linear``.
        bias: optional [out].

    Returns:
        Output [T, out].
    """
    if isinstance(weight, torch.Tensor):
        return dense_linear(x, weight, bias)  # F.linear, on the native kernel for bf16 on the CPU
    return weight.linear(x, bias)


def weight_nbytes(weight: WeightLike | None) -> int:
    """Bytes of storage a weight occupies (0 for None)."""
    if weight is None:
        return 0
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    # a quantized weight may also hold a kernel-layout copy built on first use: count it
    return int(weight.nbytes) + int(weight.kernel_cache_nbytes)


@dataclass
class ExpertWeights:
    """The tensors of one expert (layer, e), ready to compute."""

    down: WeightLike  # [H, I]
    gate_up: WeightLike | None = None  # [2I, H] for gated experts
    up: WeightLike | None = None  # [I, H] for ungated experts
    gate_up_bias: torch.Tensor | None = None  # [2I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors of this expert."""
        parts = (self.down, self.gate_up, self.up, self.gate_up_bias, self.up_bias, self.down_bias)
        return sum(weight_nbytes(p) for p in parts)

    def prepare_kernel(self, dtype: torch.dtype) -> ExpertWeights:
        """Convert the quantized parts to this CPU's kernel layout now (see ``QuantizedWeight``).

        A reader calls it as the expert arrives, off the decode path (in the prefetch thread where
        there is one), so the first forward that routes to the expert does not pay the conversion,
        and the kernel layout is then the one copy of its codes. Dense parts are left as they are.

        Args:
            dtype: the activations' dtype the expert will see.

        Returns:
            ``self``.
        """
        for part in (self.gate_up, self.up, self.down):
            if isinstance(part, QuantizedWeight):
                part.prepare_kernel(dtype)
        return self

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> ExpertWeights:
        """Return a copy on ``device``; dense float tensors are cast to ``dtype`` when given.

        ``non_blocking``: asynchronous copies from pinned host memory to a GPU (the caller
        synchronizes before the weights are used on another stream).
        """

        def move(t):
            if t is None:
                return None
            if isinstance(t, torch.Tensor):
                cast = dtype if dtype is not None and t.is_floating_point() else None
                return t.to(device=device, dtype=cast, non_blocking=non_blocking)
            return t.to(device, non_blocking=non_blocking) if device is not None else t

        return ExpertWeights(
            down=move(self.down),
            gate_up=move(self.gate_up),
            up=move(self.up),
            gate_up_bias=move(self.gate_up_bias),
            up_bias=move(self.up_bias),
            down_bias=move(self.down_bias),
        )
