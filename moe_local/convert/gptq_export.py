"""``export_gptq``: stream a Hugging Face MoE checkpoint into a GPTQ checkpoint (vLLM, SGLang, GPTQModel).

The tensors are GPTQModel's (checkpoint format ``gptq``, i.e. v1; ``desc_act`` false, int32 words;
symmetric by default): ``qweight``/``qzeros``/``scales``/``g_idx`` for every expert projection and
every linear of the decoder layers (attention, shared experts, dense MLPs); routers, embeddings, norms and
``lm_head`` are copied as they are. Each tensor keeps the name it has in the source checkpoint, which
is what vLLM and SGLang load: ``model.layers.0.block_sparse_moe.experts.3.w1.qweight`` for Mixtral,
``model.layers.0.mlp.experts.3.gate_proj.qweight`` for Qwen. (GPTQModel 7.6 on transformers 5 loads by
transformers' module names: the same as the disk names for Qwen-style families; for Mixtral it wants
``mlp.experts.3.gate_proj``.) config.json gains ``quantization_config``; ``quantize_config.json`` holds
the same, as GPTQModel writes it.

Symmetric (``sym: true``, the default): every zero point is ``2**(bits - 1)`` (8 at 4 bits, stored
``zero - 1`` = 7 in each field: words of ``0x77777777``), which is what vLLM's and SGLang's Marlin
kernels assume (their ``uint4b8``/``uint8b128`` types ignore ``qzeros``). Asymmetric (``sym: false``)
keeps a zero per group; vLLM and SGLang then need ``--quantization moe_wna16`` for the experts
(their Marlin path takes symmetric weights only, and their plain-GPTQ MoE fallback assumes ``sym``,
dropping the zero points without an error) and fp16 activations. ``serving_notes`` says so.

Weights are quantized round-to-nearest with INTEGER zero points in ``[1, 2**bits - 1]``: GPTQ stores
integer zeros, and v1 stores ``zero - 1``, which for a zero of 0 would borrow from the neighbouring
field and decode differently in different runtimes; from 1 up every reader agrees.
A tensor whose width the group size does not divide (an ``o_proj`` of 252 inputs) never stops the
export: it takes the largest smaller group vLLM's Marlin kernels take (64 or 32) that divides it, or
stays unquantized (as stored) when none does, and ``quantization_config.dynamic`` says so per module
in the form vLLM's and GPTQModel's GPTQ loaders read (``"+:regex": {"group_size": 32}``; ``"-:regex"``
skips quantizing the module). vLLM runs q/k/v and gate/up as one fused linear and a layer's experts
as one fused MoE with one scheme each: those are decided together. ``serving_notes`` lists them.
Works a layer at a time (one safetensors shard per decoder layer), in ``OUT.partial/``, renamed to OUT
when everything is written.
Legend: O=out features, I=in features, G=groups (I / group size).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_local.convert.outdir import (
    check_not_source,
    check_output,
    check_partial,
    clear_partial,
    make_partial,
    os_error_line,
    publish,
)
from moe_local.convert.source import open_source
from moe_local.errors import MoeLocalError
from moe_local.experts.sites import ExpertsSite
from moe_local.format.gptq_layout import GPTQ_BITS, pack_rows, qzeros_to_v1
from moe_local.format.hf_experts import HfExperts
from moe_local.format.paths import file_inside
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.loading.resolve import resolve_model_path
from moe_local.recipes import forward_weight_reads

Progress = Callable[[str, int, int, int], None]  # (stage, done, total, bytes of input so far)
_COPY = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
         "added_tokens.json")  # fmt: skip
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ROUTERS = ("gate", "router", "shared_expert_gate")  # linears that route: kept in float, as GPTQModel does
_PROJ_PARTS = ("gate", "up", "down")
# GPTQModel loads a sym=False checkpoint in format "gptq" only when its quantizer list names
# gptqmodel >= 0.9.0 (older AutoGPTQ v1 files lost zero points of 0 to an underflow). The layout
# written here is the one GPTQModel 7.6 writes, and zeros of at least 1 cannot underflow.
_GPTQMODEL_LAYOUT = "gptqmodel:7.6.0"
_MIN_SCALE = 2.0**-24  # smallest positive fp16
_FALLBACK_GROUPS = (64, 32)  # smaller groups for a width the group size misses (Marlin takes no 16)
# the linears vLLM fuses into one (its packed_modules_mapping): one scheme for all of them
_VLLM_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}  # fmt: skip


def rtn_int_zero(
    w: torch.Tensor, bits: int, group_size: int, *, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise quantization with integer zero points in ``[1, 2**bits - 1]``.

    Each group's range is widened to include 0 (as GPTQ does); the zero is ``round(-min / step)``
    with ``step = (max - min) / qmax``, moved up to 1 when it rounds to 0 (``sym``: always
    ``2**(bits - 1)``), and the scale is then the smallest that keeps the group's min and max
    representable with that zero. ``W_hat = (q - zero) * scale``, exactly what GPTQ runtimes compute.

    Args:
        w: float weight ``[O, I]``; ``I`` divisible by ``group_size``.
        bits: 2, 3, 4 or 8.
        group_size: consecutive inputs sharing a scale and zero.
        sym: the symmetric grid ``[-2**(bits - 1), 2**(bits - 1) - 1] * scale`` of symmetric GPTQ.

    Returns:
        ``(codes [O, I] uint8, scales [O, G] fp16, zeros [O, G] int64)``.

    Raises:
        ValueError: a malformed weight or NaN/inf values.
    """
    from moe_local.quant.rtn import check_weight, row_chunks

    o, i = check_weight(w, group_size)
    qmax = (1 << bits) - 1
    groups = i // group_size
    codes = torch.empty(o, i, dtype=torch.uint8)
    scales = torch.empty(o, groups, dtype=torch.float16)
    zeros = torch.empty(o, groups, dtype=torch.int64)
    for start, end in row_chunks(o, i):
        wg = w[start:end].float().view(end - start, groups, group_size)
        lo, hi = wg.amin(dim=-1).clamp(max=0.0), wg.amax(dim=-1).clamp(min=0.0)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError("weight contains NaN or inf values")
        step = (hi - lo) / qmax
        if sym:
            zero = torch.full_like(step, float(1 << (bits - 1)))
        else:
            zero = torch.where(step > 0, torch.round(-lo / step.clamp(min=_MIN_SCALE)), 1.0).clamp(1, qmax)
        above = torch.where(zero < qmax, hi / (qmax - zero).clamp(min=1.0), 0.0)
        scale = torch.maximum(above, -lo / zero)
        scale = torch.where(scale > 0, scale, 1.0).clamp(_MIN_SCALE, 65504.0).to(torch.float16)
        q = torch.round(wg / scale.float()[..., None] + zero[..., None]).clamp_(0, qmax)
        codes[start:end] = q.to(torch.uint8).view(end - start, i)
        scales[start:end] = scale
        zeros[start:end] = zero.to(torch.int64)
    return codes, scales, zeros


def gptq_tensors(
    w: torch.Tensor, bits: int, group_size: int, *, sym: bool = False
) -> dict[str, torch.Tensor]:
    """Quantize ``w [O, I]`` with ``rtn_int_zero`` into GPTQ v1 tensors.

    Returns:
        ``{"qweight": int32 [I * bits / 32, O], "qzeros": int32 [G, O * bits / 32],
        "scales": fp16 [G, O], "g_idx": int32 [I]}``.
    """
    codes, scales, zeros = rtn_int_zero(w, bits, group_size, sym=sym)
    i = codes.shape[1]
    return {
        "qweight": pack_rows(codes.t(), bits),
        "qzeros": qzeros_to_v1(zeros.t(), bits),
        "scales": scales.t().contiguous(),
        "g_idx": (torch.arange(i, dtype=torch.int32) // group_size).contiguous(),
    }


def quantization_config(bits: int, group_size: int, sym: bool = True, dynamic: dict | None = None) -> dict:
    """The ``quantization_config`` written to config.json and quantize_config.json.

    ``dynamic``: per-module overrides (``"+:regex": {"group_size": g}``, ``"-:regex": {}``), written
    only when there are some.
    """
    from moe_local._version import __version__

    extra = {"dynamic": dynamic} if dynamic else {}
    return {
        **extra,
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": sym,
        "lm_head": False,
        "method": "gptq",
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"moe-local:{__version__}", _GPTQMODEL_LAYOUT]},
    }


def serving_notes(out: str | Path, bits: int, group_size: int, sym: bool) -> list[str]:
    """How vLLM and SGLang serve an export: the commands, or why they cannot.

    vLLM and SGLang load GPTQ MoE experts with their Marlin kernels (4 or 8 bits, symmetric only)
    or with ``moe_wna16`` (4 bits with zero points; 8 bits only per channel). Asymmetric weights
    reach ``moe_wna16`` only when asked for, and it computes in fp16 or bf16 (fp16 is GPTQ's).

    Returns:
        Lines to print after the export: first the per-module fallbacks it recorded, if any.
    """
    return fallback_notes(out) + _serving_lines(out, bits, group_size, sym)


def fallback_notes(out: str | Path) -> list[str]:
    """The per-module fallbacks an export recorded in ``quantize_config.json`` (``dynamic``), as lines."""
    try:
        dynamic = json.loads((Path(out) / "quantize_config.json").read_text()).get("dynamic") or {}
    except (OSError, ValueError, AttributeError):
        return []
    lines = []
    for pattern, override in dynamic.items():
        module = _readable(pattern)
        if pattern.startswith("-:"):
            lines.append(f"kept unquantized (no GPTQ group fits its shape, or its .weight is read): {module}")
        else:
            lines.append(
                f"groups of {override.get('group_size')} (the group size does not divide its width): {module}"
            )
    return lines


def _serving_lines(out: str | Path, bits: int, group_size: int, sym: bool) -> list[str]:
    if bits not in (4, 8):
        return [f"vLLM and SGLang serve 4- and 8-bit GPTQ MoE models; this {bits}-bit one loads in moe-local "
                "and GPTQModel"]  # fmt: skip
    if group_size < 32:
        return [f"vLLM and SGLang take GPTQ groups of 32, 64 or 128; export with --group-size 32 or more "
                f"to serve this one there (it has {group_size})"]  # fmt: skip
    if sym:
        return [f"serve with vLLM:   vllm serve {out}",
                f"serve with SGLang: python -m sglang.launch_server --model-path {out}"]  # fmt: skip
    if bits == 8:
        return ["vLLM and SGLang serve asymmetric 8-bit GPTQ experts only per channel (moe_wna16); "
                f"export with --sym to serve groups of {group_size}"]  # fmt: skip
    return [
        "asymmetric: vLLM's and SGLang's Marlin kernels take symmetric weights only, so the experts need "
        "moe_wna16 and fp16:",
        f"serve with vLLM:   vllm serve {out} --quantization moe_wna16 --dtype float16",
        f"serve with SGLang: python -m sglang.launch_server --model-path {out} --quantization moe_wna16 "
        "--dtype float16",
    ]


def _unpackable(shape: tuple[int, ...], bits: int, group_size: int) -> str | None:
    """Why a weight ``[O, I]`` cannot be packed as ``bits``-bit GPTQ in groups of ``group_size``, or None."""
    o, i = shape
    if i % group_size:
        return f"{i} inputs are not divisible by the group size"
    if bits == 3 and (i % 32 or o % 32):
        return "3-bit GPTQ packs 32 values per 3 words: both dims must be multiples of 32"
    if (o * bits) % 32:
        return f"{o} outputs do not fill whole 32-bit words of zero points"
    return None


def _check_packable(name: str, shape: tuple[int, ...], bits: int, group_size: int) -> None:
    reason = _unpackable(shape, bits, group_size)
    if reason:
        o, i = shape
        raise MoeLocalError(
            f"cannot export {name} {o}x{i} as {bits}-bit GPTQ with group size {group_size}: {reason}"
        )


def _fit_group(tensors: dict[str, tuple[int, ...]], bits: int, group_size: int) -> int | None:
    """The group size tensors that share one scheme are exported with (None: kept unquantized).

    ``group_size`` when it packs them all; else the largest of ``_FALLBACK_GROUPS`` below it that
    does (a width the group size misses); else None: the tensors stay as stored (a width no group
    fits, or outputs that fill no whole word of zero points). Only 3-bit's own rule (both dims
    multiples of 32) on a tensor whose width fits stays an error: the bits do not fit the model.

    Raises:
        MoeLocalError: a tensor 3-bit GPTQ cannot pack though the group size divides its width.
    """
    for key, shape in tensors.items():
        reason = _unpackable(shape, bits, group_size)
        if reason is not None and reason.startswith("3-bit"):
            _check_packable(key, shape, bits, group_size)
    for size in (group_size, *(g for g in _FALLBACK_GROUPS if g < group_size)):
        if not any(_unpackable(shape, bits, size) for shape in tensors.values()):
            return size
    return None


def _module_regex(modules: list[str], fused: bool = False) -> str:
    """An anchored regex for ``modules`` (siblings) as vLLM and GPTQModel match ``dynamic`` (``re.match``).

    ``fused``: a layer's experts, matched as vLLM's fused MoE module and as each expert's linears.
    Linears vLLM fuses (q/k/v, gate/up) are matched by their fused name too.
    """
    if fused:
        return "^" + re.escape(modules[0]) + "(?:\\.|$)"
    parent = modules[0].rpartition(".")[0]
    lasts = [m.rpartition(".")[2] for m in modules]
    names = sorted({*lasts, *(_VLLM_FUSED[n] for n in lasts if n in _VLLM_FUSED)})
    head = re.escape(parent) + "\\." if parent else ""
    tail = re.escape(names[0]) if len(names) == 1 else "(?:" + "|".join(map(re.escape, names)) + ")"
    return f"^{head}{tail}$"


def _readable(pattern: str) -> str:
    """A ``dynamic`` rule as module names: ``model.layers.0.self_attn.{k_proj,q_proj}``."""
    text = pattern[2:].removeprefix("^").removesuffix("(?:\\.|$)").removesuffix("$").replace("\\.", ".")
    return re.sub(r"\(\?:([^)]*)\)", lambda m: "{" + m.group(1).replace("|", ",") + "}", text)


def _plan_groups(source: _Source, bits: int, group_size: int, module_names: bool) -> tuple[dict, dict]:
    """Each quantizable tensor's group size (None: kept) and the ``dynamic`` overrides recording them.

    Returns:
        ``(groups, dynamic)``: ``groups`` maps dense in-memory names and expert layers to a group
        size or None; ``dynamic`` is the quantization_config entry.

    Raises:
        MoeLocalError: a shape the requested bits cannot pack though its width fits.
    """
    groups: dict = {}
    dynamic: dict[str, dict] = {}

    def record(modules: list[str], fused: bool, chosen: int | None) -> None:
        if chosen == group_size:
            return
        rule = _module_regex(modules, fused)
        dynamic[("-:" if chosen is None else "+:") + rule] = {} if chosen is None else {"group_size": chosen}

    units: dict[tuple[str, str], list[str]] = {}
    for name in sorted(source.quantized):
        parent, _, last = name.removesuffix(".weight").rpartition(".")
        units.setdefault((parent, _VLLM_FUSED.get(last, last)), []).append(name)
    for names in units.values():
        shapes = {source.dense[n]: tuple(source.files.info(source.dense[n]).shape) for n in names}
        chosen = _fit_group(shapes, bits, group_size)
        modules = [(n if module_names else source.dense[n]).removesuffix(".weight") for n in names]
        groups.update(dict.fromkeys(names, chosen))
        if len({m.rpartition(".")[0] for m in modules}) == 1:
            record(modules, False, chosen)
        else:  # renamed on disk into different parents: one rule each
            for m in modules:
                record([m], False, chosen)
    for name in sorted(source.weight_read):  # told to the loaders too, which would quantize them
        record([(name if module_names else source.dense[name]).removesuffix(".weight")], False, None)
    for site in source.sites:
        first = source.experts.keys[site.layer].per_expert[0]
        shapes = {k: tuple(source.files.info(k).shape) for p, k in first.items() if p in _PROJ_PARTS}
        chosen = groups[site.layer] = _fit_group(shapes, bits, group_size)
        key = next(iter(shapes))  # e.g. model.layers.0.block_sparse_moe.experts.0.w1.weight
        record([site.name if module_names else key.rpartition(".0.")[0]], True, chosen)
    return groups, dynamic


def _quantizable_linears(meta: nn.Module) -> set[str]:
    """Module names of the decoder layers' plain linears, routers excepted."""
    return {
        name
        for name, m in meta.named_modules()
        if type(m) is nn.Linear and _LAYER_RE.search(name + ".") and name.rpartition(".")[2] not in _ROUTERS
    }


def _layer_of(name: str) -> int:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else -1


def _prepare(out: Path, partial: Path, overwrite: bool) -> None:
    if partial.exists() and not overwrite:
        raise MoeLocalError(f"{partial} holds an unfinished run; pass --overwrite to start over")
    try:
        clear_partial(partial)
        make_partial(partial, "gptq")
    except OSError as exc:
        raise MoeLocalError(os_error_line(partial, exc)) from exc


@dataclass
class _Source:
    """What the export reads: the checkpoint's files, its experts and which dense tensors get quantized."""

    path: Path
    files: CheckpointFiles
    sites: list[ExpertsSite]
    experts: HfExperts
    dense: dict[str, str]  # in-memory name -> checkpoint key, non-expert tensors
    quantized: set[str]  # in-memory names of the dense weights written as GPTQ
    weight_read: frozenset[str] = frozenset()  # linears kept because the model's forward reads their .weight

    def layers(self) -> dict[int, list[str]]:
        """Dense names by decoder layer (-1: outside the layers); every experts layer is present."""
        by_layer: dict[int, list[str]] = {}
        for name in self.dense:
            by_layer.setdefault(_layer_of(name), []).append(name)
        for site in self.sites:
            by_layer.setdefault(site.layer, [])
        return dict(sorted(by_layer.items()))


def export_gptq(
    src: str | Path,
    out: str | Path,
    bits: int = 4,
    group_size: int = 128,
    *,
    sym: bool = True,
    names: str = "source",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write SRC as a GPTQ checkpoint OUT (GPTQModel's layout for MoE models).

    Args:
        src: a Hugging Face checkpoint folder (or cached hub id) with per-expert tensors.
        out: the folder to create.
        bits: 2, 3, 4 or 8.
        group_size: 16, 32, 64 or 128 inputs per scale and zero.
        sym: symmetric GPTQ (zero points all ``2**(bits - 1)``), what vLLM's and SGLang's Marlin
            kernels take; False keeps a zero point per group (see ``serving_notes``).
        names: "source" keeps the checkpoint's tensor names (what vLLM and SGLang load);
            "gptqmodel" uses transformers' module names (``mlp.experts.3.gate_proj`` for Mixtral),
            which is how GPTQModel 7.6 writes and loads MoE checkpoints on transformers 5.
        overwrite: replace an existing OUT (and any unfinished OUT.partial).
        progress: called as ``progress(stage, done, total, input_bytes)``.

    Returns:
        OUT.

    Raises:
        MoeLocalError: bad SRC or options, fused experts, a shape GPTQ cannot pack, existing OUT, a full disk.
    """
    from moe_local.quant.schemes import VALID_GROUP_SIZES

    if names not in ("source", "gptqmodel"):
        raise MoeLocalError(f"unknown --gptq-names {names!r}; choose source or gptqmodel")
    if bits not in GPTQ_BITS:
        raise MoeLocalError(f"--format gptq supports bits {', '.join(map(str, GPTQ_BITS))}; got {bits}")
    if group_size not in VALID_GROUP_SIZES:
        valid = ", ".join(map(str, VALID_GROUP_SIZES))
        raise MoeLocalError(f"--format gptq supports group sizes {valid}; got {group_size}")
    src_path, out = resolve_model_path(src), Path(out)
    partial = out.with_name(out.name + ".partial")
    check_output(out, [src_path], overwrite=overwrite)
    check_not_source(partial, [src_path], "OUT.partial")
    check_partial(partial)
    source = _open_source(src_path)
    # every shape is checked, and every fallback chosen, before anything is written
    plan = _plan_groups(source, bits, group_size, names == "gptqmodel")
    _prepare(out, partial, overwrite)
    try:
        _write(source, partial, bits, group_size, plan, progress, names == "gptqmodel", sym)
        publish(partial, out)
    except BaseException as exc:  # nothing resumes an export: an unfinished folder is only in the way
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):
            raise MoeLocalError(os_error_line(partial, exc)) from exc
        raise
    return out


def _open_source(path: Path) -> _Source:
    ckpt = open_source(path, "export")
    files, sites, experts = ckpt.files, ckpt.sites, ckpt.experts
    if any(experts.keys[s.layer].fused for s in sites):
        raise MoeLocalError("--format gptq does not support fused experts yet")
    linears = _quantizable_linears(ckpt.meta)
    dense = ckpt.dense_keys()
    read = forward_weight_reads(ckpt.meta)  # a quantized linear has no .weight for them to read
    quantized = {
        n for n in dense if n.endswith(".weight") and n.removesuffix(".weight") in linears and n not in read
    }
    kept = {n for n in read if n in dense and n.removesuffix(".weight") in linears}
    return _Source(path, files, sites, experts, dense, quantized, frozenset(kept))


def _write(
    source: _Source,
    partial: Path,
    bits: int,
    group_size: int,
    plan: tuple[dict, dict],
    progress: Progress | None,
    module_names: bool,
    sym: bool,
) -> None:
    """Write the shards (one per decoder layer, one for the rest), the index and the configs.

    ``plan``: ``_plan_groups``' group sizes and ``dynamic`` overrides (``group_size`` is the config's).
    ``module_names``: name tensors by transformers' modules (GPTQModel) instead of as on disk.
    """
    groups, dynamic = plan
    from moe_local.convert.outdir import save_safetensors

    layers = source.layers()
    shards = [f"model-{n + 1:05d}-of-{len(layers):05d}.safetensors" for n in range(len(layers))]
    sites = {s.layer: s for s in source.sites}
    weight_map: dict[str, str] = {}
    total_size, done_bytes = 0, 0

    def add(tensors: dict[str, torch.Tensor], key: str, w: torch.Tensor, group: int | None) -> None:
        if group is not None:
            prefix = key.removesuffix(".weight")
            for t, v in _gptq(w, bits, group, key, sym).items():
                tensors[f"{prefix}.{t}"] = v
        else:
            tensors[key] = w

    for (layer, names), shard in zip(layers.items(), shards, strict=True):
        stage = "dense" if layer < 0 else f"layer {layer}"
        site = sites.get(layer)
        todo = len(names) + (site.num_experts if site else 0)
        tensors: dict[str, torch.Tensor] = {}
        for n, name in enumerate(names):
            w = source.files.read(source.dense[name], drop_cache=True)
            done_bytes += w.numel() * w.element_size()
            add(tensors, name if module_names else source.dense[name], w, groups.get(name))
            if progress:
                progress(stage, n + 1, todo, done_bytes)
        for e in range(site.num_experts if site else 0):
            for part, key in source.experts.keys[layer].per_expert[e].items():
                w = source.files.read(key, drop_cache=True)
                done_bytes += w.numel() * w.element_size()
                if module_names:  # e.g. model.layers.0.mlp.experts.3.gate_proj.weight
                    proj, _, kind = part.partition("_")
                    key = f"{site.name}.{e}.{proj}_proj.{kind or 'weight'}"
                add(tensors, key, w, groups[layer] if part in _PROJ_PARTS else None)  # biases stay in float
            if progress:
                progress(stage, len(names) + e + 1, todo, done_bytes)
        save_safetensors(tensors, partial / shard, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = shard
            total_size += v.numel() * v.element_size()
    _write_configs(source.path, partial, quantization_config(bits, group_size, sym, dynamic))
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _gptq(w: torch.Tensor, bits: int, group_size: int, key: str, sym: bool) -> dict[str, torch.Tensor]:
    try:
        return gptq_tensors(w, bits, group_size, sym=sym)
    except ValueError as exc:
        raise MoeLocalError(f"cannot quantize {key} {tuple(w.shape)}: {exc}") from exc


def _write_configs(src: Path, partial: Path, qcfg: dict) -> None:
    """config.json with ``quantization_config``, quantize_config.json, and the tokenizer/generation files."""
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qcfg
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (partial / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    for name in _COPY:
        if (src / name).exists():
            shutil.copyfile(file_inside(src, name, "SRC"), partial / name)
