"""Mixed precision by measured error: the scheme of each layer's expert parts under a bit budget.

A choice rule (``choose = [schemes]``, ``bits = N`` in a recipe) leaves the scheme of every expert
part it matches (``gate_up`` or ``up``, ``down``) of every MoE layer to this module. Each such
*unit* is measured under every scheme listed, on a sample of its layer's experts (those calibration
routed the most tokens to), quantized exactly as the real run will quantize it (``--imatrix``
included):

* with calibration text, the error is the experts' *output* error on their routed tokens with only
  that part quantized, relative to the output: ``sum ||y_q - y||^2 / sum ||y||^2``; both parts of a
  layer are measured on the same output, so their errors add up to the layer's;
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


def _output_errors(w, x: torch.Tensor, layer_cal, first: str, schemes: dict, cal_opts) -> dict:
    """Per part and scheme, (squared output error, squared output) of one expert on its tokens x [n, H]."""
    imatrix, act_order = cal_opts
    w_first, b_first = getattr(w, first).float(), getattr(w, f"{first}_bias")
    b_first = None if b_first is None else b_first.float()
    b_down = None if w.down_bias is None else w.down_bias.float()
    act = layer_cal.gate_fn(apply_linear(x, w_first, b_first).float())  # [n, I]
    y = apply_linear(act, w.down.float(), b_down)  # [n, H]
    ref = float(y.square().sum())
    out = {}
    for part, choices in schemes.items():
        for q in choices:
            if part == "down":
                qt = quantize_tensor(w.down, q, "down", act, imatrix, act_order)
                y_q = apply_linear(act, qt, b_down)
            else:
                qt = quantize_tensor(getattr(w, first), q, first, x, imatrix, act_order)
                act_q = layer_cal.gate_fn(apply_linear(x, qt, b_first).float())
                y_q = apply_linear(act_q, w.down.float(), b_down)
            out[(part, q)] = (float((y_q.float() - y).square().sum()), ref)
    return out


def _weight_errors(w, schemes: dict) -> dict:
    """Per part and scheme, (squared weight error, squared weight) of one expert."""
    out = {}
    for part, choices in schemes.items():
        t = getattr(w, part).float()
        for q in choices:
            qt = quantize_tensor(getattr(w, part), q, part, None, False, False)
            out[(part, q)] = (float((qt.dequantize().float() - t).square().sum()), float(t.square().sum()))
    return out


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
            if layer_cal is not None:
                x = layer_cal.tokens_for(e, min_tokens)[0]  # [n, H]
                errs = _output_errors(w, x, layer_cal, first, schemes, (imatrix, act_order))
                measured_on = f"expert outputs on {cal.tokens} calibration tokens"
            else:
                errs = _weight_errors(w, schemes)
            for key, (err, ref) in errs.items():
                prev = sums.get(key, (0.0, 0.0))
                sums[key] = (prev[0] + err, prev[1] + ref)
        for part, choices in schemes.items():
            numel = getattr(probe, part).numel() * site.num_experts
            errors = {q: sums[(part, q)][0] / max(sums[(part, q)][1], 1e-30) for q in choices}
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
