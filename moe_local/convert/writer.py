"""``quantize_checkpoint``: stream a Hugging Face MoE checkpoint into the moe-local format.

Works a layer at a time (one expert in memory at once), in ``OUT.partial/``; each finished
layer leaves a progress record so ``resume`` continues at the next one; the folder is renamed
to OUT only when everything is written, so an unfinished folder never loads.
Legend: E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moe_local.convert.outdir import (
    check_not_source,
    check_output,
    os_error_line,
    publish,
    save_safetensors,
)
from moe_local.convert.resume import check_start, run_record, start_partial
from moe_local.convert.source import open_source
from moe_local.convert.tensor_quant import quantize_tensor as _quantize
from moe_local.convert.workers import ordered_map
from moe_local.errors import MoeLocalError
from moe_local.experts.weights import ExpertWeights
from moe_local.format.blob import ALIGN, checksum, layout_of, pack_blob, round_up, tensor_checksum
from moe_local.format.hf_experts import HfExperts
from moe_local.format.manifest import DENSE_FILE, FORMAT_VERSION, MANIFEST, write_json_atomic
from moe_local.format.mxfp4 import stored_expert_blocks
from moe_local.format.paths import file_inside
from moe_local.loading.resolve import resolve_model_path
from moe_local.recipes import Recipe, forward_weight_reads

Progress = Callable[[str, int, int, int], None]  # (stage, done, total, bytes of input so far)
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
         "added_tokens.json")  # fmt: skip
_PARTS = ("gate_up", "up", "down")
FALLBACK_ROW = "keep (for {})"  # the summary row of tensors kept because no group size fits them


@dataclass
class SchemeRow:
    """A group of tensors sharing one scheme, for the plan and the summary."""

    scheme: str
    tensors: int = 0
    params: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rel_error_sum: float = 0.0
    measured: int = 0


@dataclass
class QuantizeReport:
    """What ``quantize_checkpoint`` did (or would do, for a dry run)."""

    out: Path
    rows: dict[str, SchemeRow] = field(default_factory=dict)
    experts: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    calibration_tokens: int = 0
    tokens_per_expert: dict[int, list[int]] = field(default_factory=dict)  # layer -> routed tokens (GPTQ)
    dense_bytes_out: int = 0  # of ``bytes_out``, the dense part (everything but the experts)
    allocation: object | None = None  # a choice rule's ``Allocation`` (``moe_local.convert.allocate``)

    def add(self, scheme: str, params: int, bytes_in: int, bytes_out: int, err: float | None = None) -> None:
        row = self.rows.setdefault(scheme, SchemeRow(scheme))
        row.tensors += 1
        row.params += params
        row.bytes_in += bytes_in
        row.bytes_out += bytes_out
        if err is not None:
            row.rel_error_sum += err
            row.measured += 1

    @property
    def bytes_in(self) -> int:
        """Bytes of the source tensors."""
        return sum(r.bytes_in for r in self.rows.values())

    @property
    def bytes_out(self) -> int:
        """Bytes written (before alignment padding)."""
        return sum(r.bytes_out for r in self.rows.values())


def _qbytes(shape: tuple[int, int], qtype, name: str = "") -> int:
    o, i = shape
    if hasattr(qtype, "stored_nbytes"):  # mxfp4: 4-bit elements and one exponent byte per 32
        return qtype.stored_nbytes(shape)
    if not hasattr(qtype, "group_size"):  # bitsandbytes: codes + one fp32 absmax per block
        return o * i * qtype.bits // 8 + 4 * (o * i // qtype.blocksize)
    if i % qtype.group_size:
        raise MoeLocalError(
            f"cannot quantize {name} {tuple(shape)} as {qtype}: {i} is not divisible by the group size"
        )
    groups = i // qtype.group_size
    if getattr(qtype, "ternary", False):  # five codes a byte, each row padded to whole bytes
        from moe_local.quant.pack import ternary_packed_size

        codes = o * ternary_packed_size(i)
    else:
        codes = o * i * qtype.bits // 8
    if getattr(qtype, "superblock", False):  # two 8-bit codes per group, two fp16 per super-block
        from moe_local.quant.superblock import superblocks

        return codes + 2 * o * groups + 4 * o * superblocks(groups, qtype.group_size)
    return codes + 2 * 2 * o * groups


def _stored_nbytes(qt) -> int:
    """Bytes a quantized weight writes (its ``tensors()``; in memory a super-block scheme holds more)."""
    return sum(t.numel() * t.element_size() for t in qt.tensors().values())


def _rel_err(w: torch.Tensor, q) -> float:
    return float((w.float() - q.dequantize().float()).norm() / w.float().norm().clamp_min(1e-12))


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    calibration: str | Path | None = None,
    calibration_tokens: int = 4096,
    min_expert_tokens: int = 64,
    staged: bool = False,
    imatrix: bool = False,
    act_order: bool = False,
) -> QuantizeReport:
    """Quantize SRC into a moe-local folder OUT following ``recipe``.

    Args:
        src: a Hugging Face checkpoint folder (or cached hub id).
        out: the folder to create.
        recipe: which scheme each tensor gets.
        overwrite: replace an existing OUT (and any unfinished OUT.partial).
        resume: continue an interrupted run in OUT.partial at the next unfinished layer.
        dry_run: plan only: compute sizes per scheme, write nothing.
        progress: called as ``progress(stage, done, total, input_bytes)``.
        calibration: plain-text file for GPTQ rules (and for ``imatrix``).
        calibration_tokens: most calibration tokens.
        min_expert_tokens: GPTQ tops up experts routed fewer tokens than this with their best scorers.
        staged: OUT is an ``--offload-dir`` copy (a keep-all recipe): its manifest says so, with
            the source's dtype, so that it computes as the source does.
        act_order: gptq rules visit the input columns by decreasing Hessian diagonal, each group's
            scale and zero fixed from the original weights first (stored in natural order).
        imatrix: rtn and hqq rules weight their rounding by the mean squared input of each
            channel, measured on ``calibration`` (``moe_local.quant.importance``).

    Returns:
        The report: per scheme, tensors, parameters, bytes before/after and mean relative error;
        a tensor no group size fits is kept, in a row that says which scheme it was asked for.

    Raises:
        MoeLocalError: bad SRC, existing OUT, a full disk.
    """
    t0 = time.perf_counter()
    src_path = resolve_model_path(src)
    out = Path(out)
    if dry_run:
        check_not_source(out, [src_path])
    else:  # before any work: a refused OUT should not cost a calibration pass
        check_output(out, [src_path], overwrite=overwrite)
    ckpt = open_source(src_path, "quantize")
    config, files, meta, sites, experts = ckpt.config, ckpt.files, ckpt.meta, ckpt.sites, ckpt.experts
    recipe = recipe.keeping(forward_weight_reads(meta))  # a QuantLinear has no .weight to read
    linear_weights = {f"{n}.weight" for n, m in meta.named_modules() if isinstance(m, nn.Linear)}
    # plain embedding tables quantize like linear weights (rows along H); subclasses that scale or
    # otherwise change the lookup in their forward are kept
    tables = {f"{n}.weight" for n, m in meta.named_modules() if type(m) is nn.Embedding}
    quantizable = linear_weights | tables
    dense = ckpt.dense_keys()
    report = QuantizeReport(out, dry_run=dry_run)

    # planning checks every scheme against every shape before anything is written
    _check_tables(recipe, files, dense, tables)
    _plan(report, recipe, files, dense, quantizable, experts, sites)
    _plan_converted(report, files, ckpt.converted)
    if dry_run:
        report.seconds = time.perf_counter() - t0
        return report
    report = QuantizeReport(out)
    partial = out.with_name(out.name + ".partial")
    check_not_source(partial, [src_path], "OUT.partial")
    if act_order and not any(_is_gptq(r.scheme) for r in recipe.rules):
        raise MoeLocalError("--act-order applies to gptq rules; this recipe has none (add --method gptq)")
    run = run_record(
        src_path, files, recipe, calibration, calibration_tokens, min_expert_tokens, imatrix, act_order
    )
    check_start(partial, overwrite, resume, run)
    cal = None
    dense_schemes = {
        n: recipe.scheme_for(n, files.info(k).shape[-1]) for n, k in dense.items() if n in linear_weights
    }
    gptq_dense = {n for n, q in dense_schemes.items() if _is_gptq(q)}
    imatrix_dense = {n for n, q in dense_schemes.items() if imatrix and _is_weighted(q)}
    if imatrix and calibration is None:
        raise MoeLocalError("--imatrix measures importance on calibration text: pass --calibration FILE")
    measured = recipe.has_choices and calibration is not None  # choose rules measure on it when given
    if any(_is_gptq(r.scheme) for r in recipe.rules) or imatrix or measured:
        if calibration is None:
            raise MoeLocalError("gptq needs calibration text: pass --calibration FILE")
        from moe_local.convert.calibration import collect_calibration

        if progress:
            progress("calibration", 0, 1, 0)
        cal = collect_calibration(
            src_path,
            Path(calibration),
            gptq_dense,
            max_tokens=calibration_tokens,
            importance_names=imatrix_dense,
        )
        report.calibration_tokens = cal.tokens
        report.tokens_per_expert = cal.seen
    if recipe.has_choices:  # a choice rule: measure its schemes on every layer, then fix one per expert part
        from moe_local.convert.allocate import allocate

        report.allocation = allocate(
            recipe,
            experts,
            sites,
            cal,
            min_tokens=min_expert_tokens,
            imatrix=imatrix,
            act_order=act_order,
            progress=progress,
        )
        if report.allocation is not None:
            recipe = recipe.with_assignment(report.allocation.schemes)

    try:
        if not resume:
            start_partial(partial, run)
        dense_sums = _write_dense(
            partial,
            report,
            recipe,
            files,
            dense,
            quantizable,
            progress,
            cal,
            imatrix,
            ckpt.converted,
            meta,
            act_order,
        )
        converted = [k for k in dense_sums if k not in dense and k.rpartition(".")[0] not in dense]
        layers = {}
        for site in sites:
            layer_cal = cal.layers.get(site.layer) if cal else None
            cal_args = (layer_cal, min_expert_tokens, imatrix, act_order)
            layers[str(site.layer)] = _write_layer(partial, report, recipe, experts, site, progress, cal_args)
        for name in _COPY:
            if (src_path / name).is_file():
                shutil.copyfile(file_inside(src_path, name, "SRC"), partial / name)
        manifest = {
            "format": "moe-local",
            "version": FORMAT_VERSION,
            "source": {"name": src_path.name, "index_sha256": run["source"]["index_sha256"]},
            "recipe": recipe.name,
            "run": run,
            "model_type": config.model_type,
            "dense": report_dense_schemes(recipe, dense, quantizable, files)
            | dict.fromkeys(converted, "keep"),
            "dense_crc32": dense_sums,
            "layers": layers,
        }
        if report.allocation is not None:
            manifest["allocation"] = report.allocation.to_json()
        if staged:
            manifest["staged"] = {"source": "unquantized", "dtype": _config_dtype(config)}
        write_json_atomic(partial / MANIFEST, manifest)
        shutil.rmtree(partial / "progress")  # a finished folder carries no resume state
        publish(partial, out)
    except OSError as exc:
        kept = " (OUT.partial kept for --resume)" if (partial / "progress").is_dir() else ""
        raise MoeLocalError(os_error_line(partial, exc) + kept) from exc
    report.seconds = time.perf_counter() - t0
    return report


def _config_dtype(config) -> str | None:
    """The checkpoint's dtype as its config names it (``"float32"``), or None."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _choose(recipe: Recipe, name: str, width: int):
    """The scheme for tensor ``name`` of input width ``width`` and its summary row's label.

    A tensor whose width no group size divides is kept (``Recipe.scheme_for``); its row says
    what it was asked for, so the summary shows every fallback.
    """
    q = recipe.scheme_for(name, width)
    if q is not None:
        return q, q.full_name
    reason = recipe.reason_for(name)
    if reason is not None:
        return None, f"keep ({reason})"
    asked = recipe.fallback_for(name, width)
    return None, "keep" if asked is None else FALLBACK_ROW.format(asked.full_name)


def report_dense_schemes(
    recipe: Recipe, dense: dict[str, str], linear_weights: set[str], files
) -> dict[str, str]:
    """Scheme name of every dense tensor ("keep" for those left as they are)."""
    out = {}
    for name, key in dense.items():
        q = recipe.scheme_for(name, files.info(key).shape[-1]) if name in linear_weights else None
        out[name] = q.full_name if q is not None else "keep"
    return out


def _check_tables(recipe: Recipe, files, dense: dict[str, str], tables: set[str]) -> None:
    """Refuse, before anything is written, an embedding table a rule gives a scheme it cannot take."""
    for name in sorted(tables & set(dense)):
        q = recipe.scheme_for(name, files.info(dense[name]).shape[-1])
        if q is not None and getattr(q, "method", None) not in ("rtn", "hqq"):
            raise MoeLocalError(
                f"cannot quantize {name} as {q.full_name}: an embedding table takes group-wise "
                "rtn or hqq schemes (int8-g64, int4-g32k-hqq ...)"
            )


def _plan(report, recipe, files, dense, linear_weights, experts, sites) -> None:
    for name, key in dense.items():
        info = files.info(key)
        q, label = _choose(recipe, name, info.shape[-1]) if name in linear_weights else (None, "keep")
        out_bytes = _qbytes(info.shape, q, name) if q is not None else info.nbytes
        report.add(label, _numel(info.shape), info.nbytes, out_bytes)
        report.dense_bytes_out += out_bytes
    for site in sites:
        parts = experts.part_shapes(site.layer)  # headers only: no expert is read to plan
        for _ in range(site.num_experts):
            for part, (shape, dtype) in parts.items():
                name = f"{site.name}.{part}"
                q, label = _choose(recipe, name, shape[-1]) if part in _PARTS else (None, "keep")
                numel = _numel(shape)
                nbytes = numel * dtype.itemsize
                out_bytes = _qbytes(shape, q, name) if q else nbytes
                report.add(label, numel, nbytes, out_bytes)
            report.experts += 1


def _is_gptq(q) -> bool:
    return q is not None and getattr(q, "method", None) == "gptq"


def _is_weighted(q) -> bool:
    """Whether ``--imatrix`` weights this scheme's rounding (group-wise rtn and hqq)."""
    return q is not None and getattr(q, "method", None) in ("rtn", "hqq")


def _write_dense(
    partial,
    report,
    recipe,
    files,
    dense,
    linear_weights,
    progress,
    cal=None,
    imatrix=False,
    converted=None,
    meta=None,
    act_order=False,
) -> dict:
    """Write the dense part (merged or split weights too); return each tensor's CRC-32 (kept for a resume)."""
    done = partial / "progress" / "dense.json"
    if done.exists():
        return json.loads(done.read_text())
    tensors: dict[str, torch.Tensor] = {}
    done_bytes = 0
    for i, (name, key) in enumerate(dense.items()):
        w = files.read(key, drop_cache=True)
        q, label = _choose(recipe, name, w.shape[-1]) if name in linear_weights else (None, "keep")
        if q is None:
            tensors[name] = w
            report.add(label, w.numel(), w.numel() * w.element_size(), w.numel() * w.element_size())
            report.dense_bytes_out += w.numel() * w.element_size()
        else:
            stats = (cal.dense.get(name) or cal.importance.get(name)) if cal else None
            qt = _quantize(w, q, name, stats, imatrix, act_order)
            for part, t in qt.tensors().items():
                tensors[f"{name}.{part}"] = t
            stored = _stored_nbytes(qt)
            report.add(q.full_name, w.numel(), w.numel() * w.element_size(), stored, _rel_err(w, qt))
            report.dense_bytes_out += stored
        done_bytes += w.numel() * w.element_size()
        if progress:
            progress("dense", i + 1, len(dense), done_bytes)
    for name, t in _converted_dense(files, converted or {}, meta).items():
        tensors[name] = t
        report.add("keep", t.numel(), t.numel() * t.element_size(), t.numel() * t.element_size())
        report.dense_bytes_out += t.numel() * t.element_size()
    save_safetensors(tensors, partial / DENSE_FILE)
    sums = {k: tensor_checksum(t) for k, t in tensors.items()}
    write_json_atomic(done, sums)
    return sums


def _plan_converted(report, files, converted: dict) -> None:
    """Dense weights transformers merges or splits on load are kept: their sources' sizes."""
    for conv in converted.values():
        infos = [files.info(key) for _, key in conv.sources]
        numel, nbytes = sum(_numel(i.shape) for i in infos), sum(i.nbytes for i in infos)
        report.add("keep", numel, nbytes, nbytes)
        report.dense_bytes_out += nbytes


def _converted_dense(files, converted: dict, meta) -> dict[str, torch.Tensor]:
    """The dense weights transformers merges or splits on load, as the model holds them (kept).

    transformers builds them with the family's ``WeightConverter`` (e.g. kimi_linear's q/k/v short
    convolutions into one); the folder stores the result under its in-memory name, so the loader
    reads it like any kept tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for name, conv in converted.items():
        for out_name, t in conv.convert(name, lambda key: files.read(key, drop_cache=True), meta).items():
            out[out_name] = t.contiguous()
    return out


def _parts(w: ExpertWeights) -> dict[str, torch.Tensor]:
    names = ("gate_up", "up", "down", "gate_up_bias", "up_bias", "down_bias")
    return {n: getattr(w, n) for n in names if getattr(w, n) is not None}


def _write_layer(partial: Path, report, recipe, experts: HfExperts, site, progress, cal_args) -> dict:
    record = partial / "progress" / f"layer-{site.layer:04d}.json"
    if record.exists():
        return json.loads(record.read_text())
    fname = f"experts/layer-{site.layer:04d}.bin"
    schemes: dict[str, str] = {}
    entries, slots, length, offset = [], None, 0, 0

    def quantize_one(e: int, w: ExpertWeights, stored: dict):
        return _quantize_expert(recipe, site, e, w, cal_args, stored)

    keep_mxfp4 = any(_is_mxfp4(recipe.scheme_for(f"{site.name}.{p}")) for p in _PARTS)

    def stored_of(e: int) -> dict:
        return stored_expert_blocks(experts, site.layer, e) if keep_mxfp4 else {}

    reads = ((e, experts.read(site.layer, e), stored_of(e)) for e in range(site.num_experts))  # in order
    with open(partial / fname, "wb") as f:
        for e, (w, blob_tensors, part_schemes, rows) in enumerate(ordered_map(quantize_one, reads)):
            schemes.update(part_schemes)
            for row in rows:
                report.add(*row)
            if slots is None:
                slots, length = layout_of(blob_tensors)
            blob = pack_blob(blob_tensors, slots, length)
            f.write(blob)
            f.write(b"\0" * (round_up(length) - length))
            entries.append([offset, length, checksum(blob)])
            offset += round_up(length, ALIGN)
            report.experts += 1
            if progress:
                progress(f"layer {site.layer}", e + 1, site.num_experts, w.nbytes)
        f.flush()
        os.fsync(f.fileno())
    shapes = {p: list(t.shape) for p, t in _parts(w).items()}
    entry = {
        "file": fname,
        "schemes": schemes,
        "shapes": shapes,
        "slots": [s.to_json() for s in slots or []],
        "experts": entries,
    }
    write_json_atomic(record, entry)
    return entry


def _quantize_expert(recipe, site, e: int, w: ExpertWeights, cal_args, stored: dict | None = None):
    """Quantize one expert's parts; return (w, blob tensors, schemes, report rows). Thread-safe.

    ``stored`` holds the parts the source keeps as MXFP4 (``stored_expert_blocks``): an ``mxfp4``
    rule takes their blocks and scales as they are, with no requantization.
    """
    from moe_local.experts.weights import apply_linear

    layer_cal, min_tokens, imatrix, act_order = cal_args
    blob_tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, str] = {}
    rows: list[tuple] = []
    x_in = layer_cal.tokens_for(e, min_tokens)[0] if layer_cal is not None else None  # [n, H]
    quantized_parts: dict[str, object] = {}
    for part, t in _parts(w).items():
        q, label = _choose(recipe, f"{site.name}.{part}", t.shape[-1]) if part in _PARTS else (None, "keep")
        nbytes = t.numel() * t.element_size()
        if q is None:
            blob_tensors[part] = t.contiguous()
            schemes[part] = "keep"
            rows.append((label, t.numel(), nbytes, nbytes))
            continue
        inputs = x_in
        if part == "down" and layer_cal is not None:  # down sees the gated activations
            first = "gate_up" if layer_cal.has_gate else "up"
            bias = getattr(w, f"{first}_bias")
            weight = quantized_parts.get(first) or getattr(w, first).float()
            gated = apply_linear(x_in, weight, None if bias is None else bias.float())
            inputs = layer_cal.gate_fn(gated.float())
        if _is_mxfp4(q) and part in (stored or {}):
            qt = _kept_mxfp4(stored[part], t, q, f"{site.name}.{e}.{part}")
        else:
            qt = _quantize(t, q, f"{site.name}.{e}.{part}", inputs, imatrix, act_order)
        quantized_parts[part] = qt
        schemes[part] = q.full_name
        for k, v in qt.tensors().items():
            blob_tensors[f"{part}.{k}"] = v
        err = _rel_err(t, qt) if e < 2 else None  # measured on a sample: it costs a dequantize
        rows.append((q.full_name, t.numel(), nbytes, _stored_nbytes(qt), err))
    return w, blob_tensors, schemes, rows


def _is_mxfp4(q) -> bool:
    return q is not None and getattr(q, "full_name", None) == "mxfp4"


def _kept_mxfp4(stored: tuple[torch.Tensor, torch.Tensor], t: torch.Tensor, q, name: str):
    """The source's own MXFP4 blocks and scales of one part, as an ``Mxfp4Tensor`` of its shape."""
    from moe_local.quant.mxfp4_tensor import Mxfp4Tensor

    try:
        return Mxfp4Tensor(stored[0], stored[1], (int(t.shape[0]), int(t.shape[1])), q)
    except ValueError as exc:
        raise MoeLocalError(f"cannot keep {name} {tuple(t.shape)} as stored mxfp4: {exc}") from exc


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
