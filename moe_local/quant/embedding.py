"""``QuantEmbedding``: a drop-in ``nn.Embedding`` over a group-wise quantized ``[V, H]`` table.

An embedding table is laid out as a linear weight is (one row per token, groups along ``H``),
so it is quantized with the same schemes and files; a lookup dequantizes only the rows asked for.
When the model ties its output projection to the embeddings, the loader gives the ``lm_head`` a
``QuantLinear`` over the same ``QuantizedTensor``: one copy of the table serves both.

Shapes: [...] token ids, [..., H] embeddings.  V=vocabulary rows, H=embedding width.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_local.quant.tensor import QuantizedTensor


class QuantEmbedding(nn.Module):
    """``embeddings = W_hat[ids]`` with ``W_hat`` stored quantized (inference).

    Attributes:
        num_embeddings: ``V``.
        embedding_dim: ``H``.
        out_dtype: the dtype lookups return (the model's compute dtype).
    """

    def __init__(self, weight: QuantizedTensor, dtype: torch.dtype, padding_idx: int | None = None) -> None:
        """Wrap a quantized table.

        Args:
            weight: the group-wise quantized table ``[V, H]``.
            dtype: the dtype lookups return.
            padding_idx: kept for ``repr`` and code that reads it (lookups do not treat it apart).

        Raises:
            ValueError: when ``weight`` is not a ``QuantizedTensor``.
        """
        super().__init__()
        if not isinstance(weight, QuantizedTensor):
            raise ValueError(
                f"an embedding table needs a group-wise quantized weight, got {type(weight).__name__}"
            )
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.out_dtype = dtype
        self._weight = weight

    def quantized(self) -> QuantizedTensor:
        """The quantized table (shared with a tied ``lm_head``)."""
        return self._weight

    def _apply(self, fn, recurse: bool = True) -> QuantEmbedding:
        # Only device moves reach the table (a dtype cast changes what lookups return instead).
        super()._apply(fn, recurse)
        probe = fn(self._weight.scales)
        if probe.device != self._weight.device:
            self._weight = self._weight.to(probe.device)
        elif probe.is_floating_point() and probe.dtype != self._weight.scales.dtype:
            self.out_dtype = probe.dtype
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name, t in self._weight.tensors().items():
            destination[prefix + name] = t if keep_vars else t.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up ``ids`` ``[...]`` -> ``[..., H]`` in ``dtype``."""
        flat = ids.reshape(-1).long()
        low, high = torch.aminmax(flat) if flat.numel() else (None, None)  # one pass over the ids
        if low is not None and (int(low) < 0 or int(high) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding table of {self.num_embeddings} rows")
        return self._weight.dequantize_index(flat, self.out_dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self._weight.qtype}"
