"""OffloadedExperts: the drop-in for ``layer.mlp.experts`` that computes only selected experts.

The router, shared experts and routing rules stay transformers' own code; this module only
receives ``(hidden, top_k_index, top_k_weights)`` and asks an ExpertStore for each selected
expert. The family's own gate function (SwiGLU, GPT-OSS's clamped GLU, ...) is reused, so
every family computes exactly what transformers would.
Legend: T=tokens, K=experts per token, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import _default_apply_gate

from moe_local.experts.store import ExpertStore
from moe_local.experts.weights import apply_linear
from moe_local.quant import native
from moe_local.quant.tensor import NATIVE_MAX_TOKENS, QuantizedTensor

if TYPE_CHECKING:
    from moe_local.experts.sites import ExpertsSite

EXPERT_PARAM_NAMES = (
    "gate_up_proj",
    "gate_up_proj_bias",
    "up_proj",
    "up_proj_bias",
    "down_proj",
    "down_proj_bias",
)


def is_experts_module(module: nn.Module) -> bool:
    """True for a transformers experts module built on its experts interface (fused 3-D weights)."""
    return (
        hasattr(module, "has_gate") and hasattr(module, "num_experts") and "down_proj" in module._parameters
    )


class NextRouter:
    """The next MoE layer's router, applied to this layer's input to guess which experts it will need.

    Args:
        layer: the next MoE layer's index.
        weight: its router weight [E, H].
        bias: its router bias [E] (or None).
        top_k: experts per token.
    """

    def __init__(self, layer: int, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int) -> None:
        self.layer = layer
        self.weight = weight
        self.bias = bias
        self.top_k = top_k

    def guess(self, x: torch.Tensor) -> set[int]:
        """Experts the next layer will likely route ``x`` [T, H] to: each token's top-k, most voted first."""
        with torch.no_grad():
            logits = x.to(self.weight.dtype) @ self.weight.t()  # [T, E]
            if self.bias is not None:
                logits = logits + self.bias
            top = torch.topk(logits, self.top_k, dim=-1).indices  # [T, K]
        if top.shape[0] <= 4:  # decode: exactly the predicted experts
            return set(top.reshape(-1).tolist())
        votes = torch.bincount(top.reshape(-1), minlength=self.weight.shape[0])
        return set(torch.topk(votes, min(2 * self.top_k, votes.numel())).indices.tolist())


class _GateHolder:
    """Keeps the original experts module (weights removed) for its gate function and constants."""

    def __init__(self, original: nn.Module) -> None:
        for name in EXPERT_PARAM_NAMES:
            original._parameters.pop(name, None)
        self.original = original


class OffloadedExperts(nn.Module):
    """Computes the selected experts of one layer from weights an ExpertStore hands out.

    Args:
        original: the family's experts module (its fused weights are dropped here).
        layer: index of the decoder layer.
        store: where the experts live.
    """

    def __init__(self, original: nn.Module, layer: int, store: ExpertStore) -> None:
        super().__init__()
        self.layer = layer
        self.store = store
        self.num_experts = int(original.num_experts)
        self.has_gate = bool(original.has_gate)
        self.has_bias = bool(getattr(original, "has_bias", False))
        self.has_post_expert_norm = bool(getattr(original, "has_post_expert_norm", False))
        if self.has_post_expert_norm:
            self.post_expert_norm = original.post_expert_norm
        self._holder = _GateHolder(original)
        # SwiGLU experts (transformers' default gate, SiLU, gate rows before up rows) can run as one
        # native call per expert: the same values as the three steps below (see _fused_call)
        self._fusable = (
            self.has_gate
            and not self.has_post_expert_norm
            and getattr(type(original), "_apply_gate", None) is _default_apply_gate
            and getattr(original, "is_concatenated", False)
            and type(getattr(original, "act_fn", None)) in (nn.SiLU, SiLUActivation)
        )
        self.trace: list[list[int]] | None = None  # set to a list to record routed experts per call
        self.next_router: NextRouter | None = None  # set by the loader to enable prefetch

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, store={type(self.store).__name__}"

    def _gate(self, proj: torch.Tensor) -> torch.Tensor:
        orig = self._holder.original
        if self.has_gate:
            return orig._apply_gate(proj)
        return orig.act_fn(proj)

    def expert_forward(self, x: torch.Tensor, w) -> torch.Tensor:
        """One expert on its tokens: [n, H] -> [n, H]."""
        if self._fusable and x.dtype is torch.bfloat16 and x.device.type == "cpu" and w.gate_up_bias is None:
            fused = _fused_call(x, w)
            if fused is not None:
                return fused
        if self.has_gate:
            h = self._gate(apply_linear(x, w.gate_up, w.gate_up_bias))  # [n, I]
        else:
            h = self._gate(apply_linear(x, w.up, w.up_bias))  # [n, I]
        y = apply_linear(h, w.down, w.down_bias)  # [n, H]
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y.to(self.post_expert_norm.weight.device)).to(y.device)
        return y

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Mix the selected experts' outputs by their routing weights.

        Args:
            hidden_states: [T, H] (or [..., H]).
            top_k_index: [T, K] expert ids.
            top_k_weights: [T, K] routing weights.

        Returns:
            [T, H] weighted sum of the selected experts' outputs.
        """
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        idx = top_k_index.reshape(x.shape[0], -1)  # [T, K]
        wts = top_k_weights.reshape(x.shape[0], -1)  # [T, K]
        out = torch.zeros_like(x)  # [T, H]
        flat = idx.reshape(-1)  # [T*K]
        spans = _spans_by_expert(flat)
        needed = [e for e in spans if 0 <= e < self.num_experts]
        self._announce(x, needed)
        k, w_flat = idx.shape[1], wts.reshape(-1)  # [T*K] weights in the order of ``flat``
        for e in self.store.order(self.layer, needed):
            span = spans[e]
            if isinstance(span, int):  # one (token, slot) pair, the decode step's usual case: slices
                t = span // k
                rows, w_e = x[t : t + 1], w_flat[span : span + 1, None]  # [1, H], [1, 1]
            else:
                tok = span // k  # [n] tokens routed to e (each once: a token's k experts differ)
                rows, w_e = x[tok], w_flat[span, None]  # [n, H], [n, 1]
            y = self._weighted(e, rows, w_e)
            if isinstance(span, int):
                out[t : t + 1] += y.to(out.dtype)  # one rounding, as index_add_ rounds it
            else:
                out.index_add_(0, tok, y.to(out.dtype))
        return out.reshape(shape)

    def decode_token(self, x: torch.Tensor, experts: list[int], weights: torch.Tensor) -> torch.Tensor:
        """``forward`` for one token whose routing is already a list (the lean decode step's call).

        Args:
            x: [1, H].
            experts: the token's K distinct expert ids, in routing order.
            weights: [K] their routing weights.

        Returns:
            [1, H], the values ``forward`` returns for the same routing.
        """
        needed = [e for e in experts if 0 <= e < self.num_experts]
        self._announce(x, needed)
        slot = {e: j for j, e in enumerate(experts)}
        resident = self.store.resident(self.layer)
        order = self.store.order(self.layer, needed, resident)
        fetched, pairs = self._fused_pairs(x, order, resident)
        if pairs is not None:  # one native call, the loop's roundings
            return native.experts_bf16(x.contiguous(), pairs, weights[[slot[e] for e in order]])
        out = torch.zeros_like(x)  # [1, H]
        for i, e in enumerate(order):
            j = slot[e]
            w = None if fetched is None else fetched[i]
            out += self._weighted(e, x, weights[j : j + 1, None], w).to(out.dtype)
        return out

    def decode_rows(
        self, x: torch.Tensor, experts: list[list[int]], weights: list[torch.Tensor]
    ) -> torch.Tensor:
        """``decode_token`` for the newest tokens of several sequences (the batched lean step).

        Each expert is computed once for every row routed to it (one read of its weights serves
        them all), and each row's weighted outputs are added in the order ``decode_token`` adds
        them, so a row's values are those of decoding it alone while the store holds the same.

        Args:
            x: [B, H].
            experts: each row's K distinct expert ids, in routing order.
            weights: each row's [K] routing weights.

        Returns:
            [B, H].
        """
        if len(experts) == 1:
            return self.decode_token(x, experts[0], weights[0])
        needed = [[e for e in ids if 0 <= e < self.num_experts] for ids in experts]
        union = list(dict.fromkeys(e for ids in needed for e in ids))
        self._announce(x, union)
        resident = self.store.resident(self.layer)
        order = self.store.order(self.layer, union, resident)
        fetched, pairs = self._fused_pairs(x, order, resident)
        if pairs is not None:  # one native call, the loop's roundings
            return self._rows_call(x, experts, weights, needed, order, resident, pairs)
        products: dict[tuple[int, int], torch.Tensor] = {}  # (row, expert) -> [1, H] weighted output
        for i, e in enumerate(order):
            rows = [b for b, ids in enumerate(needed) if e in ids]
            w_e = torch.stack([weights[b][experts[b].index(e)] for b in rows])[:, None]  # [n, 1]
            y = self._weighted(e, x[rows], w_e, None if fetched is None else fetched[i])  # [n, H]
            for j, b in enumerate(rows):
                products[b, e] = y[j : j + 1]
        out = torch.zeros_like(x)  # [B, H]
        for b, ids in enumerate(needed):
            for e in self.store.order(self.layer, ids, resident):
                out[b : b + 1] += products[b, e].to(out.dtype)
        return out

    def _rows_call(self, x, experts, weights, needed, order, resident, pairs) -> torch.Tensor:
        """``decode_rows`` of resident fused experts as one ``native.experts_rows_bf16`` call."""
        rows = [[b for b, ids in enumerate(needed) if e in ids] for e in order]
        slot: dict[tuple[int, int], int] = {}  # (row, expert) -> its output's place in the call
        for e, routed in zip(order, rows, strict=True):
            for b in routed:
                slot[b, e] = len(slot)
        mix, mixed = [], []
        for b, ids in enumerate(needed):
            adds = self.store.order(self.layer, ids, resident)  # decode_token's order for this row
            mix.append([slot[b, e] for e in adds])
            mixed.append([float(weights[b][experts[b].index(e)]) for e in adds])
        k = max(len(m) for m in mix)
        w = torch.tensor([m + [0.0] * (k - len(m)) for m in mixed], dtype=torch.float32)  # [B, K]
        return native.experts_rows_bf16(x.contiguous(), pairs, rows, mix, w)

    def _fused_pairs(
        self, x: torch.Tensor, order: list[int], resident: set[int]
    ) -> tuple[list | None, list | None]:
        """The weights of ``order`` taken at once (``_fetch_all``) and their native calls: the calls
        are None where any of them cannot run natively, the weights None where they were not taken."""
        fetched = self._fetch_all(x, order, resident)
        if fetched is None:
            return None, None
        pairs = [_native_pair(w, dense=True) for w in fetched]
        return fetched, pairs if all(p is not None for p in pairs) else None

    def _fetch_all(self, x: torch.Tensor, order: list[int], resident: set[int]) -> list | None:
        """Every expert of ``order`` at once, for one native call, or None where that cannot run.

        Only SwiGLU experts all resident on the CPU: each ``get`` is then a hit that evicts nothing,
        so holding them all at once stays inside the budget.
        """
        if not (self._fusable and order and x.dtype is torch.bfloat16 and x.device.type == "cpu"):
            return None
        if any(e not in resident or self.store.compute_on_host(self.layer, e, 1) is not None for e in order):
            return None
        return [self.store.get(self.layer, e) for e in order]  # hits, counted once

    def _announce(self, x: torch.Tensor, needed: list[int]) -> None:
        """Record the routed experts, score the last guess, and prefetch the next layer's guess."""
        if self.trace is not None:
            self.trace.append(needed)
        self.store.check_guess(self.layer, set(needed))
        if self.next_router is not None:
            guess = self.next_router.guess(x)
            self.store.note_guess(self.next_router.layer, guess)
            self.store.prefetch(self.next_router.layer, guess)

    def _weighted(self, e: int, rows: torch.Tensor, w_e: torch.Tensor, fetched=None) -> torch.Tensor:
        """Expert ``e`` on ``rows`` [n, H] times their weights ``w_e`` [n, 1]: [n, H].

        ``fetched``: its weights, already taken from the store (``_fetch_all``), not asked for again.
        """
        if fetched is not None:
            y = self.expert_forward(rows, fetched)
        elif (host_w := self.store.compute_on_host(self.layer, e, rows.shape[0])) is not None:
            y = self.expert_forward(rows.to("cpu"), host_w).to(rows.device)  # cheaper where it lies
        else:
            y = self.expert_forward(rows, self.store.get(self.layer, e))  # [n, H]
        return y * w_e.to(y.dtype)


def _native_pair(w, dense: bool = False) -> tuple[native.FusedWeight, native.FusedWeight] | None:
    """An expert's ``(gate_up, down)`` native calls, or None where its weights do not run there.

    ``dense``: plain bf16 CPU matrices too (the decode token's call: one row, where the dense kernel
    is what ``dense_linear`` runs anyway; many rows keep torch's GEMM).
    """
    gate_up, down = w.gate_up, w.down
    if w.down_bias is not None or w.gate_up_bias is not None:
        return None
    if dense and all(_dense_cpu_bf16(t) for t in (gate_up, down)) and native.available():
        return native.DenseWeight(gate_up), native.DenseWeight(down)
    if not (isinstance(gate_up, QuantizedTensor) and isinstance(down, QuantizedTensor)):
        return None
    gu, d = gate_up.native_weight(), down.native_weight()
    return None if gu is None or d is None else (gu, d)


def _dense_cpu_bf16(t) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.dtype is torch.bfloat16
        and t.device.type == "cpu"
        and t.dim() == 2
        and t.is_contiguous()
    )


def _fused_call(x: torch.Tensor, w) -> torch.Tensor | None:
    """``down(silu(gate) * up)`` in one native call, or None where the weights do not allow it."""
    if not 0 < x.shape[0] <= NATIVE_MAX_TOKENS:
        return None
    pair = _native_pair(w)
    return None if pair is None else native.expert_bf16(x.contiguous(), *pair)


SMALL_ROUTING = 64  # (token, slot) pairs grouped in Python: cheaper than a sort below this many


def _spans_by_expert(flat: torch.Tensor) -> dict[int, int | torch.Tensor]:
    """Each expert's (token, slot) positions in ``flat`` [T*K], tokens in order within each.

    A position alone is an int (the decode step's usual case, served with slices); several are a
    tensor. Few pairs are grouped in Python, many with one stable sort (no ``torch.where`` per expert).
    """
    if flat.numel() <= SMALL_ROUTING:
        groups: dict[int, list[int]] = {}
        for p, e in enumerate(flat.tolist()):
            groups.setdefault(e, []).append(p)
        return {
            e: ps[0] if len(ps) == 1 else torch.tensor(ps, dtype=torch.long, device=flat.device)
            for e, ps in groups.items()
        }
    pos = torch.argsort(flat, stable=True)  # [T*K]
    ids, counts = torch.unique_consecutive(flat[pos], return_counts=True)
    spans: dict[int, int | torch.Tensor] = {}
    start = 0
    for e, n in zip(ids.tolist(), counts.tolist(), strict=True):
        spans[e], start = pos[start : start + n], start + n
    return spans


def swap_experts(model: nn.Module, sites: list[ExpertsSite], store: ExpertStore) -> list[OffloadedExperts]:
    """Replace every experts module named by ``sites`` with an ``OffloadedExperts`` over ``store``.

    Args:
        model: the model (its experts modules may still be on meta: their weights are dropped).
        sites: where the experts modules are.
        store: where their weights live.

    Returns:
        The new modules, in ``sites``' order.
    """
    swapped = []
    for site in sites:
        module = OffloadedExperts(model.get_submodule(site.name), site.layer, store)
        model.set_submodule(site.name, module)
        swapped.append(module)
    return swapped
