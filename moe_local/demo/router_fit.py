"""Routers for the upcycled experts, fitted to the dense model's real FFN inputs.

Each layer's router is a bias-free linear map (Mixtral's ``gate``), so it is built from
directions only:

1. centre the layer's FFN inputs and drop the mean direction, and the ``domain_directions``
   along which whole passages differ most (the leading principal axes of 64-token means):
   text of another kind (1960s news rather than plays) shifts along those, and a router that
   keys on them sends it all to the same experts;
2. balanced spherical k-means in what is left: every expert gets an equal share of the fitting
   tokens, the centroids become the router's rows;
3. rescale each row until plain top-k routing (no capacity constraint, as at inference) is
   balanced on the fitting tokens.

Routing then depends on the token and its context, is near-balanced on held-out text, and keeps
some temporal locality (neighbouring tokens' states are close, so they share experts more often
than chance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RouterFit:
    """How routers are fitted.

    Attributes:
        experts: experts per layer.
        top_k: experts each token uses.
        domain_directions: passage-level principal axes the router is made blind to.
        span: tokens per passage mean when finding those axes.
        kmeans_iters: balanced k-means rounds.
        balance_iters: row-rescaling rounds after k-means.
        seed: k-means initialisation seed.
    """

    experts: int = 8
    top_k: int = 2
    domain_directions: int = 8
    span: int = 64
    kmeans_iters: int = 25
    balance_iters: int = 100
    seed: int = 0


@torch.no_grad()
def capture_ffn_inputs(model, windows: torch.Tensor, batch: int = 4, progress: Progress | None = None):
    """Run a Llama-shaped model over token windows and keep every layer's FFN input.

    Args:
        model: a transformers causal LM whose layers have ``post_attention_layernorm``.
        windows: ``(n, length)`` token ids.
        batch: windows per forward pass.
        progress: called as ``progress(stage, done, total)`` per batch.

    Returns:
        One ``(n * length, hidden)`` float32 tensor per layer.
    """
    layers = model.model.layers
    store: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep(index: int):
        def hook(_module, _inputs, output):
            store[index].append(output.detach().reshape(-1, output.shape[-1]).float())

        return hook

    hooks = [layer.post_attention_layernorm.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(windows), batch):
            model.model(input_ids=windows[start : start + batch], use_cache=False)
            if progress:
                progress("reading fitting text", min(start + batch, len(windows)), len(windows))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks) for chunks in store]


def fit_router(x: torch.Tensor, fit: RouterFit = RouterFit()) -> torch.Tensor:
    """Fit one layer's router to its FFN inputs.

    Args:
        x: ``(tokens, hidden)`` FFN inputs, in passage order (``fit.span`` tokens per passage
            mean; a multiple of ``fit.span`` tokens is best).
        fit: the fitting settings.

    Returns:
        The ``(experts, hidden)`` router weight (float32).
    """
    x = x.float()
    basis = _blind_basis(x, fit)
    mean = x.mean(0)

    def project(y: torch.Tensor) -> torch.Tensor:
        return y - (y @ basis) @ basis.T

    z = project(x - mean)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    centroids = project(_balanced_kmeans(z, fit))
    return _balance_rows(centroids, x, fit)


def _blind_basis(x: torch.Tensor, fit: RouterFit) -> torch.Tensor:
    """Orthonormal columns spanning the mean direction and the passage-level axes."""
    mean = x.mean(0)
    usable = len(x) // fit.span * fit.span
    axes = [mean / mean.norm().clamp_min(1e-12)]
    if fit.domain_directions and usable >= 2 * fit.span:
        passages = x[:usable].reshape(-1, fit.span, x.shape[1]).mean(1) - mean
        _, _, v = torch.linalg.svd(passages, full_matrices=False)
        axes.extend(v[: fit.domain_directions])
    q, _ = torch.linalg.qr(torch.stack(axes).T)
    return q


def _balanced_kmeans(z: torch.Tensor, fit: RouterFit) -> torch.Tensor:
    """Spherical k-means where each cluster takes an equal share of the points.

    The capacity constraint is met with per-cluster offsets, adjusted until every cluster
    holds about ``len(z) / experts`` points; centroids are the unit means of their points.
    """
    gen = torch.Generator().manual_seed(fit.seed)
    n, k = len(z), fit.experts
    centroids = z[torch.randperm(n, generator=gen)[:k]].clone()
    offsets = torch.zeros(k)  # carried over between rounds: a few nudges a round then suffice
    for _ in range(fit.kmeans_iters):
        scores = z @ centroids.T
        step = 0.5 * scores.std()
        for _ in range(20):
            share = torch.bincount((scores + offsets).argmax(1), minlength=k).float() / n
            offsets -= step * (share - 1 / k)
        assign = (scores + offsets).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, z)
        norms = sums.norm(dim=1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centroids)
    return centroids


def _balance_rows(rows: torch.Tensor, x: torch.Tensor, fit: RouterFit) -> torch.Tensor:
    """Rescale router rows until plain top-k routing of ``x`` is balanced.

    A bigger row wins more of the tokens it points at, so each expert's scale is nudged
    against its excess share (multiplicatively, damped).
    """
    logits = x.float() @ rows.T  # a row's scale scales its logits; softmax keeps their order
    scale = torch.ones(len(rows))
    for _ in range(fit.balance_iters):
        picks = (logits * scale).topk(fit.top_k, dim=-1).indices.flatten()
        share = torch.bincount(picks, minlength=len(rows)).float() / picks.numel()
        scale *= torch.exp(-0.3 * (share * len(rows) - 1))
    return rows * scale[:, None]


def route(weight: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral's routing: softmax over the router logits, then the top-k experts.

    Args:
        weight: ``(experts, hidden)`` router weight.
        x: ``(tokens, hidden)`` FFN inputs.
        top_k: experts per token.

    Returns:
        ``(tokens, top_k)`` expert indices.
    """
    probs = torch.softmax((x.float() @ weight.float().T), dim=-1)
    return probs.topk(top_k, dim=-1).indices


def expert_shares(weight: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Fraction of all expert picks each expert gets (sums to 1).

    Args:
        weight: ``(experts, hidden)`` router weight.
        x: ``(tokens, hidden)`` FFN inputs.
        top_k: experts per token.

    Returns:
        ``(experts,)`` shares.
    """
    picks = route(weight, x, top_k).flatten()
    return torch.bincount(picks, minlength=len(weight)).float() / picks.numel()


def fit_routers(
    states: list[torch.Tensor], fit: RouterFit = RouterFit(), progress: Progress | None = None
) -> list[torch.Tensor]:
    """Fit every layer's router.

    Args:
        states: per-layer FFN inputs from ``capture_ffn_inputs``.
        fit: the fitting settings.
        progress: called as ``progress(stage, done, total)`` per layer.

    Returns:
        One ``(experts, hidden)`` router weight per layer.
    """
    routers = []
    for i, x in enumerate(states):
        routers.append(fit_router(x, fit))
        if progress:
            progress("fitting routers", i + 1, len(states))
    return routers
