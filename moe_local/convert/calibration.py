"""Calibration for GPTQ and importance-weighted rounding: run the source model on real text and
record what each weight sees.

Dense linears get a Hessian of their inputs (GPTQ) or the mean square of each input channel (the
importance that ``--imatrix`` rtn/hqq rules weight their rounding by) accumulated on the fly.
Each MoE layer records its inputs and routing; at quantize time every expert takes the tokens
routed to it, and an expert that received fewer than ``min_tokens`` also takes the tokens its
router row scores highest, so no expert is quantized blind. How many tokens each expert saw is reported.
Legend: N=calibration tokens, H=hidden size, K=experts per token, E=experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moe_local.config import LoadOptions
from moe_local.errors import MoeLocalError
from moe_local.experts.module import OffloadedExperts
from moe_local.loading.families import router_of
from moe_local.seq2seq import teacher_forced


@dataclass
class LayerCalibration:
    """One MoE layer's calibration inputs and routing."""

    x: torch.Tensor  # [N, H]
    idx: torch.Tensor  # [N, K]
    router_w: torch.Tensor | None  # [E, H]
    router_b: torch.Tensor | None  # [E]
    gate_fn: object  # the family's own gate function (maps [n, 2I] -> [n, I])
    has_gate: bool
    residual_sq: float | None = None  # median ||h||^2 of a token's residual stream after the layer

    def tokens_for(self, expert: int, min_tokens: int) -> tuple[torch.Tensor, int]:
        """Inputs for ``expert``: its routed tokens, topped up with its best-scoring ones.

        Returns:
            (inputs [n, H], number of tokens actually routed to it).
        """
        routed = (self.idx == expert).any(dim=-1)  # [N]
        count = int(routed.sum())
        if count >= min_tokens or self.router_w is None:
            return self.x[routed], count
        scores = self.x @ self.router_w[expert]  # [N]
        if self.router_b is not None:
            scores = scores + self.router_b[expert]
        scores = scores.masked_fill(routed, float("-inf"))
        extra = torch.topk(scores, min(min_tokens - count, int((~routed).sum()))).indices
        return torch.cat([self.x[routed], self.x[extra]]), count


@dataclass
class Calibration:
    """Everything GPTQ and importance weighting need: dense statistics and per-layer MoE inputs."""

    tokens: int
    dense: dict[str, object] = field(default_factory=dict)  # weight name -> HessianAccumulator
    importance: dict[str, object] = field(default_factory=dict)  # weight name -> ImportanceAccumulator
    layers: dict[int, LayerCalibration] = field(default_factory=dict)
    seen: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens routed per expert


def collect_calibration(
    src: Path,
    text_file: Path,
    dense_names: set[str],
    *,
    max_tokens: int = 4096,
    seq_len: int = 512,
    expert_memory: int | None = None,
    importance_names: set[str] | frozenset[str] = frozenset(),
) -> Calibration:
    """Run the source model over ``text_file`` and record calibration data.

    Args:
        src: the source checkpoint folder.
        text_file: plain text to calibrate on.
        dense_names: weight names of the dense linears that need a Hessian.
        importance_names: weight names of the dense linears that need only the mean squared input
            per channel (importance-weighted rtn/hqq); a name in both gets the Hessian, whose
            diagonal is the same statistic.
        max_tokens: most calibration tokens.
        seq_len: tokens per forward pass.
        expert_memory: RAM budget for the source experts while calibrating (None: all resident).

    Returns:
        The calibration data.
    """
    from moe_local.loading.loader import load
    from moe_local.quant.gptq import HessianAccumulator
    from moe_local.quant.importance import ImportanceAccumulator

    try:
        text = Path(text_file).read_text(errors="replace")
    except OSError as exc:
        raise MoeLocalError(f"cannot read calibration text {text_file}: {exc.strerror}") from exc
    lm = load(src, LoadOptions(dtype="float32", expert_memory=expert_memory))
    ids = list(lm.tokenizer.encode(text))[:max_tokens]
    if len(ids) < 16:
        raise MoeLocalError(
            f"calibration text {text_file} has only {len(ids)} tokens; give it at least a page"
        )
    cal = Calibration(tokens=len(ids))
    hooks = []
    for name, mod in lm.model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if f"{name}.weight" in dense_names:
            acc = cal.dense[f"{name}.weight"] = HessianAccumulator(mod.in_features)
        elif f"{name}.weight" in importance_names:
            acc = cal.importance[f"{name}.weight"] = ImportanceAccumulator(mod.in_features)
        else:
            continue
        hooks.append(
            mod.register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0].reshape(-1, a[0].shape[-1])))
        )
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    experts_mods = {m.layer: m for m in lm.model.modules() if isinstance(m, OffloadedExperts)}
    for layer, mod in experts_mods.items():
        rows = captured[layer] = []

        def grab(m, args, rows=rows):
            x, idx = args[0], args[1]
            rows.append(
                (
                    x.reshape(-1, x.shape[-1]).detach().float().clone(),
                    idx.reshape(x.numel() // x.shape[-1], -1),
                )
            )

        hooks.append(mod.register_forward_pre_hook(grab))
    residual: dict[int, list] = {}  # layer -> ||h||^2 of each token: how large an error there is
    for site in lm.sites:
        path = site.name.rpartition(".")[0].rpartition(".")[0]  # SITE = LAYER.BLOCK.experts
        try:
            layer_mod = lm.model.get_submodule(path) if path else None
        except AttributeError:  # a family nesting its experts otherwise: errors fall back to the output's
            layer_mod = None
        if layer_mod is not None:
            norms = residual[site.layer] = []

            def energy(m, args, out, norms=norms):
                h = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(h, torch.Tensor) and h.dim() >= 2:
                    norms.append(h.reshape(-1, h.shape[-1]).float().square().sum(dim=-1))

            hooks.append(layer_mod.register_forward_hook(energy))
    try:
        with torch.inference_mode():
            seq2seq = getattr(lm.model.config, "is_encoder_decoder", False)
            for start in range(0, len(ids), seq_len):
                window = torch.tensor([ids[start : start + seq_len]])
                if seq2seq:  # the encoder and the decoder both see the window (every sparse layer)
                    teacher_forced(lm.model, window)
                else:
                    lm.model(input_ids=window, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for site in lm.sites:
        mod = experts_mods[site.layer]
        x = torch.cat([r[0] for r in captured[site.layer]])
        idx = torch.cat([r[1] for r in captured[site.layer]])
        block = lm.model.get_submodule(site.name.rpartition(".")[0])
        w, b = router_of(block, site.num_experts, x.shape[-1])
        # the median token: a few attention-sink tokens carry residuals thousands of times larger
        norms = residual.get(site.layer)
        res = float(torch.cat(norms).median()) if norms else None
        res = res if res is not None and res > 0 else None
        cal.layers[site.layer] = LayerCalibration(x, idx, w, b, mod._gate, mod.has_gate, res)
        cal.seen[site.layer] = [int((idx == e).any(-1).sum()) for e in range(site.num_experts)]
    return cal
