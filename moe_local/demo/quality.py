"""Measuring the demo: held-out token windows, and how its routers spread tokens over experts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


def text_ids(tokenizer, path: Path, tokens: int = 8192, chars: int = 200_000) -> torch.Tensor:
    """The first ``tokens`` token ids of a text file (no special tokens).

    Args:
        tokenizer: the model's tokenizer.
        path: a UTF-8 text file.
        tokens: how many ids to keep.
        chars: characters read (enough for ``tokens`` of English).

    Returns:
        A 1-D tensor of at most ``tokens`` ids.
    """
    with Path(path).open(encoding="utf-8") as fh:
        text = fh.read(chars)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:tokens], dtype=torch.long)


def windows_of(ids: torch.Tensor, window: int = 512) -> torch.Tensor:
    """Cut ids into whole, non-overlapping windows (the remainder is dropped).

    Args:
        ids: 1-D token ids.
        window: tokens per window.

    Returns:
        ``(n, window)`` ids.
    """
    usable = len(ids) // window * window
    return ids[:usable].reshape(-1, window)


@dataclass(frozen=True)
class LayerRouting:
    """How one layer's router spread a text's tokens.

    Attributes:
        shares: fraction of all expert picks each expert got (sums to 1).
        locality: fraction of a token's experts that the previous token also used.
        distinct_sets: distinct top-k expert sets seen.
    """

    shares: tuple[float, ...]
    locality: float
    distinct_sets: int

    @property
    def max_ratio(self) -> float:
        """The busiest expert's share over the fair share."""
        return max(self.shares) * len(self.shares)

    @property
    def min_ratio(self) -> float:
        """The idlest expert's share over the fair share."""
        return min(self.shares) * len(self.shares)


@dataclass(frozen=True)
class RoutingStats:
    """Routing over a text, layer by layer, with the chance level of locality."""

    layers: tuple[LayerRouting, ...]
    top_k: int

    @property
    def max_ratio(self) -> float:
        """The busiest expert's share over the fair share, worst layer."""
        return max(layer.max_ratio for layer in self.layers)

    @property
    def min_ratio(self) -> float:
        """The idlest expert's share over the fair share, worst layer."""
        return min(layer.min_ratio for layer in self.layers)

    @property
    def locality(self) -> float:
        """Mean over layers of the fraction of a token's experts the previous token used."""
        return sum(layer.locality for layer in self.layers) / len(self.layers)

    @property
    def chance_locality(self) -> float:
        """What ``locality`` would be if experts were drawn at random."""
        return self.top_k / len(self.layers[0].shares)

    def summary(self) -> str:
        """One line: worst-layer balance and mean locality against chance."""
        return (
            f"busiest expert {self.max_ratio:.2f}x fair share, idlest {self.min_ratio:.2f}x (worst layers); "
            f"the previous token used {self.locality:.0%} of a token's experts "
            f"(chance {self.chance_locality:.0%})"
        )


def layer_routing(picks: torch.Tensor, experts: int) -> LayerRouting:
    """Summarise one layer's picks.

    Args:
        picks: ``(sequences, length, top_k)`` expert indices.
        experts: experts in the layer.

    Returns:
        The layer's routing summary.
    """
    flat = picks.reshape(-1)
    shares = torch.bincount(flat, minlength=experts).double() / flat.numel()
    same = (picks[:, 1:, :, None] == picks[:, :-1, None, :]).any(-1).float().mean().item()
    distinct = len({tuple(sorted(row)) for row in picks.reshape(-1, picks.shape[-1]).tolist()})
    return LayerRouting(tuple(shares.tolist()), same, distinct)


@torch.no_grad()
def routing_stats(model, windows: torch.Tensor, batch: int = 2) -> RoutingStats:
    """Run a Mixtral-shaped model over token windows and record what every router picks.

    Args:
        model: a transformers Mixtral (or ``LoadedModel.model``).
        windows: ``(n, length)`` token ids.
        batch: windows per forward pass.

    Returns:
        The routing statistics.
    """
    config = model.config
    experts, top_k = int(config.num_local_experts), int(config.num_experts_per_tok)
    gates = []
    for layer in model.model.layers:
        for name, module in layer.named_modules():
            weight = getattr(module, "weight", None)
            if name.endswith("gate") and weight is not None and weight.shape[0] == experts:
                gates.append(module)
                break
    picks: list[list[torch.Tensor]] = [[] for _ in gates]

    def keep(index: int):
        def hook(_module, _inputs, output):
            logits = output[0] if isinstance(output, tuple) else output
            picks[index].append(torch.softmax(logits.float(), -1).topk(top_k, -1).indices)

        return hook

    hooks = [g.register_forward_hook(keep(i)) for i, g in enumerate(gates)]
    try:
        for start in range(0, len(windows), batch):
            model(input_ids=windows[start : start + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    length = windows.shape[1]
    layers = tuple(layer_routing(torch.cat(p).reshape(-1, length, top_k), experts) for p in picks)
    return RoutingStats(layers, top_k)
