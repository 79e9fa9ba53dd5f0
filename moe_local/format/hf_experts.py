"""Read experts from a Hugging Face checkpoint: per-expert tensors or fused 3-D ones.

Checkpoints store experts either one tensor set per expert
(``...experts.{e}.w1/w2/w3`` for Mixtral and Phi-MoE, ``...experts.{e}.gate_proj/up_proj/down_proj``
for Qwen, OLMoE, DeepSeek) or fused as 3-D tensors (``...experts.gate_up_proj`` [E, ...] for
GPT-OSS and others). Key renames between disk and memory come from transformers' own
conversion mapping (``moe_local.loading.families.checkpoint_renamer``), so names are never
guessed from file names.
Legend: E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_local.errors import CheckpointError, UnsupportedModelError
from moe_local.experts.module import EXPERT_PARAM_NAMES
from moe_local.experts.sites import ExpertsSite
from moe_local.experts.weights import ExpertWeights
from moe_local.format.expert_keys import join_gate_up, match_per_expert
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.format.source import ExpertSource

_FUSED_PARTS = {
    "gate_up_proj": "gate_up",
    "gate_up_proj_bias": "gate_up_bias",
    "up_proj": "up",
    "up_proj_bias": "up_bias",
    "down_proj": "down",
    "down_proj_bias": "down_bias",
}
# DBRX keeps a layer's experts in three flat tensors of E experts' rows each, [E*I, H], under the
# experts module's ``mlp``: gate, up, and the down projection stored [in, out]
FLAT_GLU = {"gate": "mlp.w1", "up": "mlp.v1", "down": "mlp.w2"}
# fused expert tensors that are scales of quantized ones (NVFP4 / MXFP8 releases: ``w13_weight_scale``)
_QUANT_SUFFIXES = ("_scale", "_scale_inv", "_amax", "_outer_scale_denominator")


@dataclass
class _SiteKeys:
    fused: dict[str, str]  # canonical part -> checkpoint key of the fused [E, ...] tensor
    per_expert: dict[int, dict[str, str]]  # expert -> canonical part -> checkpoint key
    flat: dict[str, str] | None = None  # FLAT_GLU part -> checkpoint key of the [E*I, H] tensor


class HfExperts(ExpertSource):
    """Reads any expert (layer, e) of a Hugging Face checkpoint into canonical ExpertWeights.

    Args:
        files: the checkpoint's safetensors files.
        sites: the model's experts modules.
        renamed: in-memory name -> checkpoint key, for every checkpoint key.
        dtype: dtype to cast float weights to (None keeps the checkpoint's).
        drop_cache: evict read bytes from the page cache (a RAM budget must hold).
    """

    def __init__(
        self,
        files: CheckpointFiles,
        sites: list[ExpertsSite],
        renamed: dict[str, str],
        dtype: torch.dtype | None,
        drop_cache: bool = False,
    ) -> None:
        super().__init__(dtype, drop_cache)
        self.files = files
        self.sites = {s.layer: s for s in sites}
        self.keys: dict[int, _SiteKeys] = {}
        # experts a publisher quantized in a format not read here: module name -> one scale's key
        self._scaled = {n.rpartition(".")[0]: k for n, k in renamed.items() if n.endswith(_QUANT_SUFFIXES)}
        for site in sites:
            self.keys[site.layer] = self._match(site, renamed)

    def _match(self, site: ExpertsSite, renamed: dict[str, str]) -> _SiteKeys:
        flat = {p: renamed[f"{site.name}.{n}"] for p, n in FLAT_GLU.items() if f"{site.name}.{n}" in renamed}
        if flat:
            return _SiteKeys({}, {}, self._check_flat(site, flat))
        fused: dict[str, str] = {}
        for pname in EXPERT_PARAM_NAMES:
            key = renamed.get(f"{site.name}.{pname}")
            if key is not None:
                fused[pname] = key
                self.claimed.add(key)
        per: dict[int, dict[str, str]] = {}
        for e, parts in match_per_expert(site.name, renamed, ("weight", "bias")).items():
            for part, kinds in parts.items():
                for kind, key in kinds.items():
                    per.setdefault(e, {})[part if kind == "weight" else part + "_bias"] = key
                    self.claimed.add(key)
        if not fused and not per:
            raise UnsupportedModelError(f"no expert weights found for {site.name} in the checkpoint")
        if site.name in self._scaled:
            raise UnsupportedModelError(
                f"{self._scaled[site.name]}: these experts are stored quantized with per-block scales "
                "in a format moe-local does not read yet (it reads fp8 and mxfp4 checkpoints)"
            )
        if not fused:
            missing = [e for e in range(site.num_experts) if "down" not in per.get(e, {})]
            if missing:
                raise UnsupportedModelError(f"{site.name}: checkpoint lacks experts {missing[:8]}")
            self._check_alike(site, per)
        elif "down_proj" not in fused:
            raise UnsupportedModelError(f"{site.name}: fused experts lack down_proj in the checkpoint")
        return _SiteKeys(fused, per)

    def _check_flat(self, site: ExpertsSite, flat: dict[str, str]) -> dict[str, str]:
        """The three flat tensors of a DBRX layer, all [E*I, H] (headers only), claimed.

        Raises:
            CheckpointError: one is missing, or shaped otherwise.
        """
        if len(flat) != len(FLAT_GLU):
            missing = sorted(FLAT_GLU[p] for p in FLAT_GLU.keys() - flat.keys())
            raise CheckpointError(f"{site.name}: checkpoint lacks {', '.join(missing)}")
        shapes = {k: tuple(self.files.info(k).shape) for k in flat.values()}
        for k, shape in shapes.items():
            if len(shape) != 2 or shape[0] % site.num_experts or shape != shapes[flat["gate"]]:
                raise CheckpointError(
                    f"{k} has shape {shape}; the experts need [{site.num_experts} * I, H] like the others"
                )
        self.claimed.update(flat.values())
        return flat

    def _read_rows(self, key: str, start: int, count: int) -> torch.Tensor:
        """Rows ``start`` to ``start + count`` of a 2-D tensor (one expert's rows of a flat one)."""
        return torch.stack([self._read(key, r) for r in range(start, start + count)])

    def _check_alike(self, site: ExpertsSite, per: dict[int, dict[str, str]]) -> None:
        """Every expert of a layer has expert 0's tensors with expert 0's shapes (headers only).

        Raises:
            CheckpointError: naming the first expert tensor that is missing or shaped differently.
        """
        first = {p: self.files.info(k).shape for p, k in per[0].items()}
        if "up" not in first and "gate" in first:
            raise CheckpointError(f"{site.name}: checkpoint has a gate but no up projection for expert 0")
        for e in range(site.num_experts):
            parts = per[e]
            for p in first.keys() - parts.keys():
                raise CheckpointError(f"{site.name}: checkpoint lacks the {p} tensor of expert {e}")
            for p, k in parts.items():
                shape = self.files.info(k).shape
                if p not in first or shape != first[p]:
                    raise CheckpointError(
                        f"{k} has shape {tuple(shape)}; the other experts' {p} is {tuple(first.get(p, ()))}"
                    )

    def _read(self, key: str, index: int | None = None) -> torch.Tensor:
        if index is None:
            t = self.files.read(key, drop_cache=self.drop_cache)
        else:
            t = self.files.read_slice(key, index, drop_cache=self.drop_cache)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` in the checkpoint's dtype."""
        keys = self.keys[layer]
        if keys.flat:
            return sum(self.files.info(k).nbytes for k in keys.flat.values()) // self.sites[layer].num_experts
        if keys.fused:
            return sum(self.files.info(k).nbytes // self.files.info(k).shape[0] for k in keys.fused.values())
        first = next(iter(keys.per_expert.values()))
        return sum(self.files.info(k).nbytes for k in first.values())

    def _read_gate_up(self, per: dict[str, str]) -> torch.Tensor | None:
        """gate and up read straight into the two halves of one [2I, H] tensor (no concatenation)."""
        if "gate" not in per or "up" not in per:
            return None
        gate, up = self.files.info(per["gate"]), self.files.info(per["up"])
        if gate.dtype != up.dtype or gate.shape[1:] != up.shape[1:] or (self.dtype not in (None, gate.dtype)):
            return None  # a cast or odd shapes: the general path
        shape = (gate.shape[0] + up.shape[0], *gate.shape[1:])
        if self.drop_cache and type(self.files) is CheckpointFiles:
            # past the page cache, straight into place where the file's layout allows (a wrapper
            # such as the FP8 reader's dequantized files reads its own way)
            joined = self.files.read_joined([per["gate"], per["up"]])
            if joined is not None:
                return joined.reshape(shape)
        out = torch.empty(shape, dtype=gate.dtype)
        self.files.read(per["gate"], drop_cache=self.drop_cache, out=out[: gate.shape[0]])
        self.files.read(per["up"], drop_cache=self.drop_cache, out=out[gate.shape[0] :])
        return out

    def part_shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Canonical shape and dtype of each part of one expert of ``layer``, from the headers only.

        Args:
            layer: the layer.

        Returns:
            ``{part: (shape, dtype)}`` as ``read`` would return them (``gate_up`` [2I, H], ...).
        """
        site, keys = self.sites[layer], self.keys[layer]
        infos: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if keys.flat:
            info = self.files.info(keys.flat["gate"])
            rows, width = info.shape[0] // site.num_experts, info.shape[1]
            infos = {"gate_up": ((2 * rows, width), info.dtype), "down": ((width, rows), info.dtype)}
        elif keys.fused:
            for p, k in keys.fused.items():
                info = self.files.info(k)
                shape = tuple(info.shape[1:])
                if site.is_transposed and len(shape) == 2:
                    shape = (shape[1], shape[0])
                infos[_FUSED_PARTS[p]] = (shape, info.dtype)
        else:
            for p, k in keys.per_expert[0].items():
                info = self.files.info(k)
                infos[p] = (tuple(info.shape), info.dtype)
            for gate, up, joined in (("gate", "up", "gate_up"), ("gate_bias", "up_bias", "gate_up_bias")):
                if gate in infos:
                    (g_shape, dtype), (u_shape, _) = infos.pop(gate), infos.pop(up)
                    infos[joined] = ((g_shape[0] + u_shape[0], *g_shape[1:]), dtype)
        if self.dtype is None:
            return infos
        return {p: (shape, self.dtype if dt.is_floating_point else dt) for p, (shape, dt) in infos.items()}

    def read(self, layer: int, expert: int) -> ExpertWeights:
        """Read expert ``expert`` of ``layer`` into canonical weights."""
        site = self.sites[layer]
        keys = self.keys[layer]
        if keys.flat:
            rows = self.files.info(keys.flat["gate"]).shape[0] // site.num_experts
            gate, up, down = (
                self._read_rows(keys.flat[p], expert * rows, rows) for p in ("gate", "up", "down")
            )
            return ExpertWeights(gate_up=torch.cat([gate, up]), down=down.t().contiguous())
        if keys.fused:
            parts = {_FUSED_PARTS[p]: self._read(k, expert) for p, k in keys.fused.items()}
            if site.is_transposed:  # [in, out] -> [out, in]
                for p in ("gate_up", "up", "down"):
                    if p in parts:
                        parts[p] = parts[p].t().contiguous()
            return ExpertWeights(**parts)
        per = keys.per_expert[expert]
        gate_up = self._read_gate_up(per) if site.is_concatenated else None
        src = {p: self._read(k) for p, k in per.items() if gate_up is None or p not in ("gate", "up")}
        w = ExpertWeights(down=src["down"], down_bias=src.get("down_bias"))
        if gate_up is not None:
            w.gate_up = gate_up
        elif "gate_up" in src:  # stored fused per expert
            w.gate_up, w.gate_up_bias = src["gate_up"], src.get("gate_up_bias")
        elif "gate" in src:
            w.gate_up = join_gate_up(src["gate"], src["up"], site.is_concatenated)
            if "gate_bias" in src:
                w.gate_up_bias = join_gate_up(src["gate_bias"], src["up_bias"], site.is_concatenated)
        else:
            w.up, w.up_bias = src["up"], src.get("up_bias")
        return w
