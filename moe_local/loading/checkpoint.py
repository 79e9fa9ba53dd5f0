"""``open_checkpoint``: one way into a checkpoint for every command.

Opening a folder means: its config read and checked (``validate``, never the folder's code), the
model built on meta in the compute dtype, its experts modules found (``ExpertsSite``), the
checkpoint's key renames applied, and the ``ExpertSource`` of its format chosen: a Hugging Face
checkpoint (``HfExperts``), a GPTQ one (``GptqExperts``) or a moe-local folder (``BlobExperts``).
A Hugging Face checkpoint its publisher quantized (``quant_method`` ``fp8`` or ``mxfp4``) is read
through ``DequantizedFiles``: every reader sees the unquantized tensors, dequantized as read.
``Checkpoint.load_dense`` then fills the dense part of the meta model; nothing else is read
until an expert is asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moe_local.errors import CheckpointError, MoeLocalError, UnsupportedModelError, first_line
from moe_local.experts.sites import ExpertsSite, find_expert_sites
from moe_local.format.dense import load_hf_dense, read_dense_tensor
from moe_local.format.fp8 import FP8_METHOD, DequantizedFiles, Fp8Config, fp8_files
from moe_local.format.gptq_layout import is_gptq_checkpoint
from moe_local.format.gptq_reader import GptqExperts, load_gptq_dense
from moe_local.format.hf_experts import HfExperts
from moe_local.format.manifest import MANIFEST, read_manifest
from moe_local.format.mxfp4 import MXFP4_METHOD, mxfp4_files
from moe_local.format.reader import BlobExperts, load_dense
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.format.source import ExpertSource
from moe_local.loading import validate
from moe_local.loading.families import (
    EXPERT_WIDTH,
    IN_MEMORY_EXPERTS,
    TESTED_FAMILIES,
    DenseConversion,
    map_checkpoint_keys,
    refusal,
)
from moe_local.loading.meta import SWITCH, build_on_meta
from moe_local.loading.resolve import resolve_model_path
from moe_local.models import family_of_architectures, register_families
from moe_local.quant import native

Progress = Callable[[str, int, int], None]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_CONFIG_MAX_BYTES = 16 << 20  # real configs are kilobytes; a huge one would only be read to be refused

HF, GPTQ, MOE_LOCAL = "hf", "gptq", "moe-local"  # checkpoint kinds


@dataclass
class Checkpoint:
    """An opened checkpoint: its config, the model on meta, where its experts are and how to read them.

    Attributes:
        path: the folder.
        kind: ``"hf"``, ``"gptq"`` or ``"moe-local"``.
        config: the transformers config (checked).
        dtype: the compute dtype the meta model was built in.
        meta: the model, parameters on meta until ``load_dense``.
        sites: its experts modules in layer order.
        experts: the format's expert reader.
        files: the safetensors files (None for a moe-local folder, whose dense file the reader opens);
            for an fp8 or mxfp4 checkpoint, a ``DequantizedFiles`` view of them.
        manifest: the moe-local manifest (None otherwise).
        renamed: in-memory name -> checkpoint key for every key (empty for a moe-local folder).
        converted: dense weights transformers makes by merging or splitting checkpoint tensors
            (``DenseConversion``), by their first in-memory name.
    """

    path: Path
    kind: str
    config: object
    dtype: torch.dtype
    meta: nn.Module
    sites: list[ExpertsSite]
    experts: ExpertSource
    files: CheckpointFiles | DequantizedFiles | None = None
    manifest: dict | None = None
    renamed: dict[str, str] = field(default_factory=dict)
    converted: dict[str, DenseConversion] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """True for a moe-local or GPTQ checkpoint."""
        return self.kind != HF

    def dense_keys(self) -> dict[str, str]:
        """In-memory name -> checkpoint key of every non-expert tensor (Hugging Face and GPTQ)."""
        return {n: k for n, k in self.renamed.items() if k not in self.experts.claimed}

    def read_dense(self, name: str) -> torch.Tensor:
        """Read the dense weight ``name`` (an in-memory name), shape-checked against the model."""
        if self.files is None or name not in self.renamed:
            raise CheckpointError(f"{self.path} has no tensor for {name}")
        target = self.meta.state_dict(keep_vars=True)[name]
        return read_dense_tensor(self.files, self.renamed[name], target, self.dtype)

    def load_dense(self, progress: Progress | None = None) -> int:
        """Read every dense weight into ``meta`` (quantized linears become ``QuantLinear``); return bytes."""
        if self.kind == MOE_LOCAL:
            drop = self.experts.drop_cache  # a budgeted load leaves no page cache of its dense part
            return load_dense(self.meta, self.path, self.manifest, self.dtype, drop_cache=drop)
        if self.kind == GPTQ:
            return load_gptq_dense(self.meta, self.files, self.renamed, self.dtype)
        return load_hf_dense(
            self.meta, self.files, self.renamed, self.experts.claimed, self.dtype, progress, self.converted
        )

    def tokenizer(self):
        """The folder's tokenizer (``load_tokenizer``)."""
        return load_tokenizer(self.path)


def checkpoint_kind(path: Path) -> str:
    """``"moe-local"`` (a manifest), ``"gptq"`` (a GPTQ quantization_config) or ``"hf"``."""
    if (path / MANIFEST).exists():
        return MOE_LOCAL
    return GPTQ if is_gptq_checkpoint(path) else HF


def open_checkpoint(
    model: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    expert_dtype: torch.dtype | str | None = "compute",
    drop_cache: bool = False,
    download: bool = False,
) -> Checkpoint:
    """Open a checkpoint folder (or a cached hub id) of any supported format.

    Args:
        model: the folder or hub id.
        dtype: the compute dtype, or ``"auto"``/a name for ``resolve_dtype``.
        device: the device the model will run on (``"auto"`` dtype depends on it).
        expert_dtype: dtype Hugging Face experts are cast to as they are read: ``"compute"`` (the
            compute dtype) or None (as stored: what quantize reads). GPTQ and moe-local experts
            always give unquantized parts in the compute dtype. An fp8 or mxfp4 checkpoint's
            tensors are dequantized to this dtype (bfloat16 for None), dense ones too.
        drop_cache: the expert reader evicts what it reads from the page cache.
        download: allow fetching a hub id that is not cached.

    Raises:
        MoeLocalError: the folder, its config, its files or its family cannot be read (one line).
    """
    path = resolve_model_path(model, download=download)
    kind = checkpoint_kind(path)
    manifest = read_manifest(path) if kind == MOE_LOCAL else None
    config = load_config(path)
    if not isinstance(dtype, torch.dtype):
        # a staged copy (--offload-dir) of an unquantized checkpoint computes as its source does
        staged = isinstance(manifest, dict) and (manifest.get("staged") or {}).get("source") == "unquantized"
        dtype = resolve_dtype(dtype, config, device, kind == MOE_LOCAL and not staged)
    meta = build_on_meta(config, dtype)
    sites = find_expert_sites(meta)
    if not sites and getattr(config, "model_type", "") in IN_MEMORY_EXPERTS:
        logging.getLogger(__name__).warning(
            "%s keeps its experts outside transformers' experts interface: they stay in memory "
            "and an expert memory budget does not apply",
            config.model_type,
        )
    if kind == MOE_LOCAL:
        experts: ExpertSource = BlobExperts(path, manifest, sites, dtype, drop_cache=drop_cache)
        return Checkpoint(path, kind, config, dtype, meta, sites, experts, manifest=manifest)
    files = CheckpointFiles(path, drop_cache=drop_cache)
    cast = dtype if expert_dtype == "compute" else expert_dtype
    if kind == HF:
        files = publisher_files(files, config, path, cast)
    keymap = map_checkpoint_keys(meta, files.names())
    renamed = keymap.renamed
    if kind == GPTQ:
        experts = GptqExperts(path, files, sites, renamed, dtype, drop_cache=drop_cache)
    else:
        experts = HfExperts(files, sites, renamed, cast, drop_cache=drop_cache)
    return Checkpoint(
        path,
        kind,
        config,
        dtype,
        meta,
        sites,
        experts,
        files=files,
        renamed=renamed,
        converted=keymap.converted,
    )


def publisher_files(
    files: CheckpointFiles, config, path: Path, dtype: torch.dtype | None
) -> CheckpointFiles | DequantizedFiles:
    """The files as readers should see them: dequantizing ones when the publisher quantized them.

    Args:
        files: the checkpoint's safetensors files.
        config: its (checked) config; ``quantization_config`` says how the publisher stored it.
        path: the folder, for messages.
        dtype: what quantized tensors become (None: bfloat16, the dtype those checkpoints are
            published from and what transformers dequantizes them to; float32 would double the
            memory of every tensor quantize keeps, for digits 4-bit codes cannot hold).

    Raises:
        CheckpointError: a malformed quantization_config, or a scale that does not fit its weight.
        UnsupportedModelError: a quant_method moe-local does not read.
    """
    q = getattr(config, "quantization_config", None)
    if q is None:
        return files
    if not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else {}
    method = q.get("quant_method")
    if method is None:  # an empty or method-less entry describes no stored quantization
        return files
    where = f"{path / 'config.json'}: quantization_config"
    dtype = dtype or torch.bfloat16
    if method == FP8_METHOD:
        return fp8_files(files, Fp8Config.from_dict(q, where), dtype)
    if method == MXFP4_METHOD:
        return mxfp4_files(files, dtype)
    raise UnsupportedModelError(
        f"{where} has quant_method {method!r}; moe-local reads fp8, mxfp4 and gptq checkpoints "
        "and unquantized ones"
    )


def load_config(path: Path):
    """Read and check config.json, turning every problem into one clear line.

    The checks (``moe_local.loading.validate``) run before transformers sees the file and again on
    the config it builds, so every command refuses a broken or hostile config before building
    anything, and never runs code from the folder.

    Raises:
        CheckpointError: the file is unreadable, or a value is wrong (the message names it).
        UnsupportedModelError: the family is unknown to transformers, or needs the folder's own code.
    """
    file = path / "config.json"
    raw = _read_config_json(file)
    model_type = raw.get("model_type")
    # a community port whose config.json names only its architecture (hpcai-tech/grok-1): the
    # family moe-local defines for that architecture reads it
    own = None if model_type else family_of_architectures(raw.get("architectures"))
    if own is not None:
        model_type = own.model_type
        raw = {**raw, "model_type": model_type}
    if not model_type:
        raise UnsupportedModelError(f"{file} has no model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{file}: model_type = {model_type!r} must be a string")
    validate.check_raw(raw, file)
    register_families()  # moe-local's own families first: their folders' auto_map code never runs
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if validate.needs_remote_code(raw, CONFIG_MAPPING):
        raise UnsupportedModelError(validate.REMOTE_CODE)
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"unknown model_type {model_type!r}: this transformers does not define that family"
        )
    try:
        if own is not None:  # its own config class: AutoConfig would need the missing model_type
            config = own.config_class.from_pretrained(path, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except StrictDataclassError as exc:  # transformers' own field checks: the cause names the field
        cause = exc.__cause__ or exc
        raise CheckpointError(f"{file}: {first_line(cause)}") from exc
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{file}: transformers rejects it: {first_line(exc)}") from exc
    if getattr(config, "model_type", None) == SWITCH:
        _check_switch(config, file)
    validate.check_config(config, file, TESTED_FAMILIES, EXPERT_WIDTH)
    reason = refusal(getattr(config, "model_type", model_type))
    if reason is not None:
        raise UnsupportedModelError(reason)
    return config


# Switch's own size fields (its hidden_size, layers and heads are aliases the generic checks skip)
_SWITCH_LIMITS = {
    "d_model": (1, 1 << 17),
    "d_ff": (1, 1 << 20),
    "d_kv": (1, 1 << 14),
    "num_heads": (1, 1 << 12),
    "num_layers": (1, 1024),
    "num_decoder_layers": (1, 1024),
    "num_sparse_encoder_layers": (0, 1024),
    "num_sparse_decoder_layers": (0, 1024),
    "expert_capacity": (1, 1 << 30),
    "relative_attention_num_buckets": (1, 1 << 16),
    "relative_attention_max_distance": (1, 1 << 30),
}


def _check_switch(config, file: Path) -> None:
    """Switch Transformers' size fields in range; its top-1 routing said where moe-local reads top-k.

    Its config names hidden size, layers and heads ``d_model``, ``num_layers`` and ``num_heads``
    (transformers aliases the usual names to them), so the generic range checks do not see them.
    """
    for name, (lo, hi) in _SWITCH_LIMITS.items():
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise CheckpointError(f"{file}: {name} = {value!r} must be an integer from {lo} to {hi}")
    # every token goes to one expert: inspect's active parameters and prefetch read this field
    config.num_experts_per_tok = 1


def _read_config_json(file: Path) -> dict:
    try:
        if file.stat().st_size > _CONFIG_MAX_BYTES:
            raise CheckpointError(f"{file} is {file.stat().st_size:,} bytes; a model config is a few KB")
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({first_line(exc)})") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return raw


def resolve_dtype(option: str, config, device: str, quantized: bool = False) -> torch.dtype:
    """Pick the compute dtype: an explicit choice, else the checkpoint's.

    On CPU "auto" is bfloat16 for moe-local folders (the CPU kernels of quantized weights take
    bf16 activations) and for bfloat16 checkpoints where moe-local's native kernel runs (it
    reads bf16 weights at full memory speed, so the model stays the size it is on disk: a float32
    copy doubled the RAM and halved decode speed); float32 for other checkpoints, and for bf16 ones
    without the native kernel (torch's CPU bf16 matmuls are slow without AVX-512 BF16).
    """
    if option != "auto":
        if option not in _DTYPES:
            raise MoeLocalError(f"unknown dtype {option!r}; choose auto, {', '.join(_DTYPES)}")
        return _DTYPES[option]
    ckpt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(ckpt, str):
        ckpt = _DTYPES.get(ckpt)
    if device.startswith("cpu"):
        if quantized or (ckpt is torch.bfloat16 and native.available()):
            return torch.bfloat16
        return torch.float32
    return ckpt if isinstance(ckpt, torch.dtype) else torch.bfloat16


def load_tokenizer(path: Path):
    """Load the folder's tokenizer, or fail with one line saying what is missing."""
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {path} (expected tokenizer.json or tokenizer.model)")
    try:
        # trust_remote_code=False: an auto_map is ignored where transformers has the class, an
        # error where it has not; never the interactive prompt, never the folder's code
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # tokenizer back-ends raise many types; one line is what a user needs
        if validate.tokenizer_needs_code(path):
            raise UnsupportedModelError(validate.TOKENIZER_REMOTE_CODE) from exc
        raise CheckpointError(f"cannot load the tokenizer in {path}: {first_line(exc)}") from exc
