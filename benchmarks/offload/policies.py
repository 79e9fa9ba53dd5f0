"""A benchmark-side eviction policy to compare with moe-local's LRU/LFU and Belady on a routing trace.

``layer_distance`` knows only the order in which layers run (every decode step visits layer 0, 1, ...,
L-1), not the future routing: it evicts the cached expert whose layer comes up again last, which is
the expert of the layer just computed (needed one whole step later), ties broken by least recent use.
On a cyclic layer walk this is what Belady does when routing is unpredictable.
"""

from __future__ import annotations

from collections.abc import Sequence

Key = tuple[int, int]


def simulate_layer_distance(trace: Sequence[Key], slots: int) -> tuple[int, int]:
    """Replay ``trace`` through a ``slots``-expert cache with the layer-distance policy; (hits, misses)."""
    order = sorted({layer for layer, _ in trace})
    pos = {layer: i for i, layer in enumerate(order)}
    n_layers = len(order)
    last_use: dict[Key, int] = {}
    hits = misses = 0
    for t, key in enumerate(trace):
        here = pos[key[0]]
        if key in last_use:
            hits += 1
        else:
            misses += 1
            if len(last_use) >= slots:

                def rank(k: Key, here: int = here) -> tuple[int, int]:
                    ahead = (pos[k[0]] - here) % n_layers or n_layers  # same layer: a full step away
                    return ahead, -last_use[k]

                del last_use[max(last_use, key=rank)]
        last_use[key] = t
    return hits, misses
