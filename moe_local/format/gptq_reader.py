"""Read the experts and dense weights of a GPTQ checkpoint (GPTQModel / AutoGPTQ layout).

How GPTQ stores a linear, and its conversion to moe-local's ``QuantizedTensor``, is
``moe_local.format.gptq_layout``. Experts come out as ``ExpertWeights`` with a quantized
``gate_up`` ``[2I, H]`` and ``down`` ``[H, I]``; GPTQ dense linears become ``QuantLinear``.
Legend: E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_local.errors import CheckpointError, UnsupportedModelError
from moe_local.experts.sites import ExpertsSite, find_expert_sites
from moe_local.experts.weights import ExpertWeights, WeightLike
from moe_local.format.dense import linear_named, read_dense_tensor
from moe_local.format.expert_keys import join_gate_up, match_per_expert
from moe_local.format.gptq_layout import (
    GPTQ_TENSORS,
    bits_of,
    gptq_to_quantized,
    quantized_nbytes,
    read_gptq_config,
)
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.format.source import ExpertSource

# ----------------------------------------------------------------------------- experts


@dataclass
class _Proj:
    """One expert projection in the checkpoint: a GPTQ prefix or a plain weight key, and its bias."""

    prefix: str | None = None  # checkpoint key without ".qweight" when quantized
    weight: str | None = None  # checkpoint key of a float weight when not quantized
    bias: str | None = None


class GptqExperts(ExpertSource):
    """Reads expert (layer, e) of a GPTQ checkpoint into moe-local ``ExpertWeights``.

    ``gate_up`` is one ``QuantizedTensor`` ``[2I, H]`` (gate and up rows joined the way the family's
    experts module expects), ``down`` one ``[H, I]``.

    Args:
        folder: the checkpoint folder (its config.json holds the quantization_config).
        files: the checkpoint's safetensors files.
        sites: the model's experts modules.
        renamed: in-memory name -> checkpoint key, for every checkpoint key.
        dtype: dtype for unquantized expert tensors (biases, weights left in float).
        drop_cache: evict read bytes from the page cache (a RAM budget must hold).
    """

    def __init__(
        self,
        folder: str | Path,
        files: CheckpointFiles,
        sites: list[ExpertsSite],
        renamed: dict[str, str],
        dtype: torch.dtype,
        drop_cache: bool = False,
    ) -> None:
        super().__init__(dtype, drop_cache)
        self.config = read_gptq_config(folder)
        self.files = files
        self.sites = {s.layer: s for s in sites}
        self.keys: dict[int, dict[int, dict[str, _Proj]]] = {s.layer: self._match(s, renamed) for s in sites}

    def _match(self, site: ExpertsSite, renamed: dict[str, str]) -> dict[int, dict[str, _Proj]]:
        per: dict[int, dict[str, _Proj]] = {}
        for e, parts in match_per_expert(site.name, renamed, ("qweight", "weight", "bias")).items():
            for part, kinds in parts.items():
                prefix = kinds["qweight"].removesuffix(".qweight") if "qweight" in kinds else None
                per.setdefault(e, {})[part] = _Proj(prefix, kinds.get("weight"), kinds.get("bias"))
                if prefix is not None:
                    self.claimed.update(f"{prefix}.{t}" for t in GPTQ_TENSORS)
                self.claimed.update(kinds.values())
        missing = [e for e in range(site.num_experts) if "down" not in per.get(e, {})]
        if missing:
            raise UnsupportedModelError(f"{site.name}: GPTQ checkpoint lacks experts {missing[:8]}")
        if site.has_gate and any({"gate", "up"} - set(per[e]) for e in range(site.num_experts)):
            raise UnsupportedModelError(f"{site.name}: GPTQ checkpoint lacks gate or up projections")
        return per

    def _read(self, key: str) -> torch.Tensor:
        return self.files.read(key, drop_cache=self.drop_cache)

    def _proj(self, proj: _Proj) -> tuple[WeightLike, torch.Tensor | None]:
        if proj.prefix is not None:
            tensors = {
                t: self._read(f"{proj.prefix}.{t}")
                for t in GPTQ_TENSORS
                if f"{proj.prefix}.{t}" in self.files.key_to_file
            }
            weight = gptq_to_quantized(tensors, self._bits(proj.prefix), self.config.version, proj.prefix)
        elif proj.weight is not None:
            weight = self._read(proj.weight)
            weight = weight.to(self.dtype) if weight.is_floating_point() else weight
        else:
            raise CheckpointError(f"expert projection with bias {proj.bias} has no weight")
        bias = self._read(proj.bias).to(self.dtype) if proj.bias is not None else None
        return weight, bias

    def _bits(self, prefix: str) -> int:
        """Bits of one GPTQ linear from its shapes (per-module ``dynamic`` overrides may differ)."""
        g_idx = f"{prefix}.g_idx"
        if g_idx not in self.files.key_to_file:
            return self.config.bits
        return bits_of(
            self.files.info(f"{prefix}.qweight").shape[0], self.files.info(g_idx).shape[0], self.config
        )

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` once read (codes, fp16 scales and zeros, biases)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for proj in self.keys[layer][0].values():
            if proj.prefix is not None:
                total += quantized_nbytes(self.files, proj.prefix, self._bits(proj.prefix))
            elif proj.weight is not None:
                total += (
                    self.files.info(proj.weight).nbytes // self.files.info(proj.weight).dtype.itemsize * size
                )
            if proj.bias is not None:
                total += self.files.info(proj.bias).shape[0] * size
        return total

    def read(self, layer: int, expert: int) -> ExpertWeights:
        """Read expert ``expert`` of ``layer``."""
        site = self.sites[layer]
        projs = self.keys[layer][expert]
        down, down_bias = self._proj(projs["down"])
        w = ExpertWeights(down=down, down_bias=down_bias)
        if "gate" in projs:
            (gate, gate_bias), (up, up_bias) = self._proj(projs["gate"]), self._proj(projs["up"])
            w.gate_up = join_gate_up(gate, up, site.is_concatenated)
            if isinstance(w.gate_up, torch.Tensor):
                w.gate_up = w.gate_up.to(self.dtype)
            if gate_bias is not None and up_bias is not None:
                w.gate_up_bias = join_gate_up(gate_bias, up_bias, site.is_concatenated)
        else:
            w.up, w.up_bias = self._proj(projs["up"])
        return w


# ----------------------------------------------------------------------------- dense weights


def load_gptq_dense(
    lm: nn.Module, files: CheckpointFiles, renamed: dict[str, str], dtype: torch.dtype
) -> int:
    """Load the non-expert tensors of a GPTQ checkpoint into a model built on meta; return their bytes.

    Every ``nn.Linear`` stored as GPTQ tensors becomes a ``QuantLinear`` computing the same ``W_hat``;
    other tensors (embeddings, norms, routers, unquantized linears) are read as they are and cast to
    ``dtype`` (float tensors). Tensors of experts modules are left to ``GptqExperts``.

    Args:
        lm: the model, parameters on meta.
        files: the checkpoint's safetensors files.
        renamed: in-memory name -> checkpoint key, for every checkpoint key.
        dtype: compute dtype for float tensors.

    Returns:
        Bytes of the dense weights as loaded.

    Raises:
        CheckpointError: a tensor's shape does not match the model, or a quantized tensor has no linear.
        UnsupportedModelError: act-order or a group size moe-local cannot express.
    """
    from moe_local.quant import QuantLinear

    config = read_gptq_config(files.folder)
    expert_prefixes = tuple(f"{s.name}." for s in find_expert_sites(lm))
    wanted = lm.state_dict(keep_vars=True)
    quantized = {
        name.removesuffix(".qweight"): key.removesuffix(".qweight")
        for name, key in renamed.items()
        if name.endswith(".qweight") and not name.startswith(expert_prefixes)
    }
    total, state = 0, {}
    biases = {f"{mod}.bias" for mod in quantized}
    for name, key in renamed.items():
        if name not in wanted or name in biases or name.startswith(expert_prefixes):
            continue
        t = read_dense_tensor(files, key, wanted[name], dtype)
        state[name] = t
        total += t.numel() * t.element_size()
    for mod_name, prefix in quantized.items():
        linear = linear_named(lm, mod_name)
        if linear is None:
            raise CheckpointError(f"{prefix}.qweight is not the weight of a linear layer of this model")
        tensors = {
            t: files.read(f"{prefix}.{t}") for t in GPTQ_TENSORS if f"{prefix}.{t}" in files.key_to_file
        }
        bits = bits_of(tensors["qweight"].shape[0], linear.in_features, config)
        qt = gptq_to_quantized(tensors, bits, config.version, prefix)
        if qt.shape != (linear.out_features, linear.in_features):
            raise CheckpointError(
                f"{prefix} is {qt.shape[0]}x{qt.shape[1]}; the config implies "
                f"{linear.out_features}x{linear.in_features}"
            )
        bias_key = renamed.get(f"{mod_name}.bias")
        bias = files.read(bias_key).to(dtype) if bias_key is not None else None
        lm.set_submodule(mod_name, QuantLinear(qt, bias))
        total += qt.nbytes + (bias.numel() * bias.element_size() if bias is not None else 0)
    lm.load_state_dict(state, strict=False, assign=True)
    return total
