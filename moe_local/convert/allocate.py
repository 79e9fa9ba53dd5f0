"""Mixed precision by measured error: the scheme of each layer's expert parts under a bit budget.

A choice rule (``choose = [schemes]``, ``bits = N`` in a recipe) leaves the scheme of every expert
part it matches (``gate_up`` or ``up``, ``down``) of every MoE layer to this module. Each such
*unit* is measured under every scheme listed, on a sample of its layer's experts (those calibration
routed the most tokens to), quantized exactly as the real run will quantize it (``--imatrix``
included):

* with calibration text, the error is the experts' *output* error on their routed tokens with only
  that part quantized, per token and relative to the residual stream the output is added to:
  ``mean ||y_q - y||^2 / median ||h||^2`` (``h`` the layer's output in calibration; the median
  token, as a few attention-sink tokens carry residuals thousands of times larger). Relative to the
  residual, not to the experts' own output: a layer whose experts add little to the stream may be
  coarse, and a first layer whose stream is still small may not (measured: relative to their own
  output the first and last layers of the demo looked easiest and got ternary codes, and perplexity
  went from +224% to +682%). Both parts of a layer are measured on the same output, so their errors
  add up to the layer's;
* without, it is the weights' relative squared error ``||W_hat - W||^2 / ||W||^2``.

The allocation then minimizes the sum of the units' errors within ``N`` bits per weight over the
units' parameters: every unit starts at its cheapest scheme and the upgrade that saves the most
error per bit spent is taken while it fits (jumping past a scheme whose extra bits buy less). The
choice, the errors it was made from and the bits reached go into the manifest.
Legend: n=routed tokens, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_local.convert.tensor_quant import quantize_tensor
from moe_local.convert.workers import ordered_map
from moe_local.errors import MoeLocalError
from moe_local.experts.weights import apply_linear
from moe_local.quant import bits_per_weight
from moe_local.recipes import Recipe, _fit_group

SAMPLE_EXPERTS = 2  # experts per layer measured under each scheme (the most used ones)
_FIRST_PARTS = ("gate_up", "up")


@dataclass(frozen=True)
class Unit:
    """One layer's expert part, the thing a scheme is chosen for."""

    name: str  # SITE.experts.PART, the tensor name the recipe matches
    layer: int
    params: int  # parameters of the part over all the layer's experts
    errors: dict  # scheme -> measured relative error (lower is better)


@dataclass(frozen=True)
class Allocation:
    """What the allocation chose and why (written to the manifest as ``to_json``)."""

    target_bits: float
    bits: float  # reached: mean bits per weight over the units
    measured_on: str
    schemes: dict  # unit name -> scheme
    units: tuple[Unit, ...]

    def to_json(self) -> dict:
        """The manifest's record: target, reached, what was measured, and per unit its choice and errors."""
        return {
            "target_bits": self.target_bits,
            "bits": round(self.bits, 4),
            "measured_on": self.measured_on,
            "units": {
                u.name: {
                    "scheme": self.schemes[u.name].full_name,
                    "errors": {q.full_name: round(e, 6) for q, e in u.errors.items()},
                }
                for u in self.units
            },
        }

    def summary(self) -> str:
        """One line: ``2.60 of 2.60 bits/weight: tern-g64k-hqq x12, int2-g32k-hqq x40, ...``."""
        counts: dict[str, int] = {}
        for q in self.schemes.values():
            counts[q.full_name] = counts.get(q.full_name, 0) + 1
        mix = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
        parts = len(self.units)
        return f"{self.bits:.3f} of {self.target_bits:g} bits/weight over {parts} expert parts: {mix}"


def choose_schemes(units: list[Unit], target_bits: float) -> tuple[dict, float]:
    """The scheme per unit of least total error within ``target_bits`` per weight.

    Args:
        units: the units, each with its measured error per candidate scheme.
        target_bits: mean bits per weight over all the units' parameters.

    Returns:
        (unit name -> scheme, the mean bits per weight reached).

    Raises:
        MoeLocalError: when even the cheapest scheme of every unit is over the budget.
    """
    total = sum(u.params for u in units)
    budget = target_bits * total
    pick = {u.name: min(u.errors, key=lambda q: (bits_per_weight(q), u.errors[q])) for u in units}
    spent = sum(u.params * bits_per_weight(pick[u.name]) for u in units)
    if spent > budget * (1 + 1e-9):
        raise MoeLocalError(
            f"the cheapest schemes already cost {spent / total:.3f} bits/weight, over bits = {target_bits:g}"
        )
    while True:
        best = None  # (error saved per bit, unit, scheme, extra bits)
        for u in units:
            now = pick[u.name]
            for q, err in u.errors.items():
                extra = u.params * (bits_per_weight(q) - bits_per_weight(now))
                saved = u.errors[now] - err
                if extra <= 0 or saved <= 0 or spent + extra > budget * (1 + 1e-9):
                    continue
                if best is None or saved / extra > best[0]:
                    best = (saved / extra, u, q, extra)
        if best is None:
            return pick, spent / max(total, 1)
        _, u, q, extra = best
        pick[u.name] = q
        spent += extra


def _sample(seen: list[int] | None, num_experts: int) -> list[int]:
    """The experts measured: the most routed in calibration, else the first ones."""
    order = sorted(range(num_experts), key=lambda e: -seen[e]) if seen else list(range(num_experts))
    return order[: min(SAMPLE_EXPERTS, num_experts)]


@dataclass(frozen=True)
class _Probe:
    """One sampled expert and what its unquantized parts give on its tokens (shared by every candidate)."""

    w: object  # ExpertWeights
    first: str  # "gate_up" or "up"
    x: torch.Tensor | None  # [n, H] routed tokens (None: measure on the weights)
    act: torch.Tensor | None  # [n, I] gated activations, down's input
    y: torch.Tensor | None  # [n, H] the expert's output
    gate_fn: object


def _probe(w, first: str, x: torch.Tensor | None, layer_cal) -> _Probe:
    if x is None:
        return _Probe(w, first, None, None, None, None)
    bias = getattr(w, f"{first}_bias")
    act = layer_cal.gate_fn(apply_linear(x, getattr(w, first).float(), _f32(bias)).float())  # [n, I]
    return _Probe(w, first, x, act, apply_linear(act, w.down.float(), _f32(w.down_bias)), layer_cal.gate_fn)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _error(probe: _Probe, part: str, q, imatrix: bool, act_order: bool) -> tuple[float, float, int]:
    """(squared error, squared reference, tokens) of one part of one probed expert quantized with ``q``.

    On calibration tokens: the expert's output with only ``part`` quantized against its output;
    without: the part's weights (tokens 0).
    """
    w, first = probe.w, probe.first
    if probe.x is None:
        t = getattr(w, part).float()
        qt = quantize_tensor(getattr(w, part), q, part, None, False, False)
        return float((qt.dequantize().float() - t).square().sum()), float(t.square().sum()), 0
    if part == "down":
        qt = quantize_tensor(w.down, q, "down", probe.act, imatrix, act_order)
        y_q = apply_linear(probe.act, qt, _f32(w.down_bias))
    else:
        qt = quantize_tensor(getattr(w, first), q, first, probe.x, imatrix, act_order)
        act_q = probe.gate_fn(apply_linear(probe.x, qt, _f32(getattr(w, f"{first}_bias"))).float())
        y_q = apply_linear(act_q, w.down.float(), _f32(w.down_bias))
    err, ref = float((y_q.float() - probe.y).square().sum()), float(probe.y.square().sum())
    return err, ref, int(probe.x.shape[0])


def _unit_error(sums: tuple[float, float, int], residual: float | None) -> float:
    """Squared error per token over the residual's energy per token, else over the reference's."""
    err, ref, tokens = sums
    if residual is not None and tokens:
        return err / tokens / residual
    return err / max(ref, 1e-30)


def allocate(
    recipe: Recipe,
    experts,
    sites,
    cal=None,
    *,
    min_tokens: int = 64,
    imatrix: bool = False,
    act_order: bool = False,
    progress: Callable[[str, int, int, int], None] | None = None,
) -> Allocation | None:
    """Measure every unit of the recipe's choice rules and choose their schemes.

    Args:
        recipe: the recipe; only tensors its choice rules decide are allocated.
        experts: the source's expert reader (``read(layer, e)`` -> ``ExpertWeights``).
        sites: the MoE layers.
        cal: calibration (``collect_calibration``), or None to measure on the weights.
        min_tokens: experts routed fewer tokens take their router's best scorers too (as GPTQ's).
        imatrix: measure (and so choose) with importance-weighted rounding, as the run quantizes.
        act_order: gptq candidates visit columns by decreasing Hessian diagonal.
        progress: called as ``progress(stage, done, total, 0)`` per layer.

    Returns:
        The allocation, or None when the recipe has no choice rule deciding any expert part.

    Raises:
        MoeLocalError: two choice rules with different budgets, or a budget nothing fits in.
    """
    units: list[Unit] = []
    targets: set[float] = set()
    measured_on = "weights (no calibration text)"
    for done, site in enumerate(sites):
        probe = experts.read(site.layer, 0)
        first = "gate_up" if probe.gate_up is not None else "up"
        schemes, names = {}, {}
        for part in (first, "down"):
            name = f"{site.name}.{part}"
            rule = recipe.choice_rule_for(name)
            if rule is None:
                continue
            width = getattr(probe, part).shape[-1]
            fits = [q for q in (_fit_group(c, width) for c in rule.choices) if q is not None]
            if len(fits) >= 2:
                schemes[part], names[part] = tuple(dict.fromkeys(fits)), name
                targets.add(rule.bits)
        if not schemes:
            continue
        layer_cal = cal.layers.get(site.layer) if cal is not None else None
        seen = cal.seen.get(site.layer) if cal is not None else None
        sums: dict = {}
        for e in _sample(seen, site.num_experts):
            w = probe if e == 0 else experts.read(site.layer, e)
            x = layer_cal.tokens_for(e, min_tokens)[0] if layer_cal is not None else None  # [n, H]
            shared = _probe(w, first, x, layer_cal)
            keys = [(part, q) for part, choices in schemes.items() for q in choices]
            # one candidate per worker thread, one torch thread each (``workers``: no OpenMP barriers)
            items = ((shared, part, q, imatrix, act_order) for part, q in keys)
            for key, got in zip(keys, ordered_map(_error, items), strict=True):
                sums[key] = tuple(a + b for a, b in zip(sums.get(key, (0.0, 0.0, 0)), got, strict=True))
        residual = layer_cal.residual_sq if layer_cal is not None else None
        if residual is not None:
            measured_on = f"expert outputs on {cal.tokens} calibration tokens, against the residual stream"
        elif layer_cal is not None:
            measured_on = f"expert outputs on {cal.tokens} calibration tokens"
        for part, choices in schemes.items():
            numel = getattr(probe, part).numel() * site.num_experts
            errors = {q: _unit_error(sums[(part, q)], residual) for q in choices}
            units.append(Unit(names[part], site.layer, numel, errors))
        if progress:
            progress("measuring schemes", done + 1, len(sites), 0)
    if not units:
        return None
    if len(targets) > 1:
        given = ", ".join(map(str, sorted(targets)))
        raise MoeLocalError(f"choice rules give different bits ({given}): give one")
    target = targets.pop()
    schemes, bits = choose_schemes(units, target)
    return Allocation(target, bits, measured_on, schemes, tuple(units))
