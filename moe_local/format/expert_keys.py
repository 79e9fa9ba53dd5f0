"""Matching checkpoint keys to experts, and joining gate and up rows: written once for every reader.

Per-expert checkpoints name a projection ``{site}.{e}.{proj}.{kind}`` in memory (after
transformers' renames), where ``proj`` is Mixtral's ``w1/w3/w2`` or the ``gate_proj/up_proj/
down_proj`` of the others, and ``kind`` is ``weight``/``bias`` (plus ``qweight`` for GPTQ).
Legend: I=expert intermediate size, H=hidden size.
"""

from __future__ import annotations

import re

import torch

from moe_local.errors import UnsupportedModelError
from moe_local.experts.weights import WeightLike

# checkpoint projection name -> canonical part
PART_OF_PROJ = {
    "w1": "gate",
    "gate_proj": "gate",
    "w3": "up",
    "up_proj": "up",
    "w2": "down",
    "down_proj": "down",
    "gate_up_proj": "gate_up",  # one [gate; up] tensor per expert (Yuan's w1, renamed on load)
}


def match_per_expert(
    site_name: str, renamed: dict[str, str], kinds: tuple[str, ...]
) -> dict[int, dict[str, dict[str, str]]]:
    """Find every per-expert tensor of one experts module.

    Args:
        site_name: the experts module's name in memory (``model.layers.3.mlp.experts``).
        renamed: in-memory name -> checkpoint key, for every checkpoint key.
        kinds: the tensor kinds to collect (``("weight", "bias")``, GPTQ adds ``"qweight"``).

    Returns:
        ``{expert: {part: {kind: checkpoint key}}}`` with parts ``gate``/``up``/``down``.

    Raises:
        UnsupportedModelError: a per-expert tensor of an unknown projection.
    """
    pat = re.compile(re.escape(site_name) + r"\.(\d+)\.(\w+)\.(" + "|".join(map(re.escape, kinds)) + r")$")
    per: dict[int, dict[str, dict[str, str]]] = {}
    for mem_name, key in renamed.items():
        m = pat.match(mem_name)
        if m is None:
            continue
        part = PART_OF_PROJ.get(m.group(2))
        if part is None:
            expected = "w1/w2/w3, gate_up_proj or *_proj"
            raise UnsupportedModelError(f"unknown expert tensor {key} (expected {expected})")
        per.setdefault(int(m.group(1)), {}).setdefault(part, {})[m.group(3)] = key
    return per


def join_gate_up(gate: WeightLike, up: WeightLike, concatenated: bool) -> WeightLike:
    """Stack gate ``[I, ...]`` and up ``[I, ...]`` rows into ``[2I, ...]``, concatenated or interleaved.

    Tensors join as they are; group-wise quantized rows of one scheme join code for code (rows are
    independent); anything else is dequantized to float32 first.
    """
    from moe_local.quant import QuantizedTensor

    def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if concatenated:
            return torch.cat([a, b], dim=0)
        return torch.stack([a, b], dim=1).reshape(-1, *a.shape[1:])

    if isinstance(gate, torch.Tensor) and isinstance(up, torch.Tensor):
        return cat(gate, up)
    if isinstance(gate, QuantizedTensor) and isinstance(up, QuantizedTensor) and gate.qtype == up.qtype:
        gate_parts, up_parts = gate.tensors(), up.tensors()  # rows are independent in every layout
        parts = {k: cat(gate_parts[k], up_parts[k]) for k in gate_parts}
        shape = (gate.shape[0] + up.shape[0], gate.shape[1])
        return QuantizedTensor.from_tensors(parts, shape, gate.qtype)
    dense = [w if isinstance(w, torch.Tensor) else w.dequantize() for w in (gate, up)]
    return cat(dense[0].float(), dense[1].float())
