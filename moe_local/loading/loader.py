"""``load``: a checkpoint folder -> a transformers model whose experts sit behind an ExpertStore.

Dense weights (attention, norms, embeddings, routers, shared experts) are read tensor by
tensor into the model built on meta; every layer's experts module is swapped for
OffloadedExperts over a store, so peak memory is the dense part plus what the store keeps.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_local.config import LoadOptions
from moe_local.errors import CheckpointError, MoeLocalError, UnsupportedModelError, first_line
from moe_local.experts.cache import CachedStore
from moe_local.experts.module import NextRouter, OffloadedExperts
from moe_local.experts.store import ExpertStore, InMemoryStore
from moe_local.experts.tiered import TieredStore
from moe_local.format.gptq_reader import GptqExperts, is_gptq_checkpoint, load_gptq_dense
from moe_local.format.manifest import MANIFEST, read_manifest
from moe_local.format.reader import BlobExperts, load_dense
from moe_local.loading import validate
from moe_local.loading.families import (
    EXPERT_WIDTH,
    TESTED_FAMILIES,
    CheckpointExperts,
    ExpertsSite,
    checkpoint_renamer,
    find_expert_sites,
    router_of,
)
from moe_local.loading.meta import build_on_meta
from moe_local.loading.resolve import resolve_model_path
from moe_local.loading.safetensors_io import CheckpointFiles

Progress = Callable[[str, int, int], None]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_CONFIG_MAX_BYTES = 16 << 20  # real configs are kilobytes; a huge one would only be read to be refused


@dataclass
class LoadedModel:
    """A model ready to generate: the transformers model, its tokenizer and its expert store."""

    model: torch.nn.Module
    tokenizer: object | None
    store: ExpertStore
    path: Path
    options: LoadOptions
    sites: list[ExpertsSite]
    context: int
    dense_bytes: int
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def config(self):
        """The transformers config."""
        return self.model.config

    @property
    def name(self) -> str:
        """A short name for the model (its folder's name)."""
        return self.path.name


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
    if not model_type:
        raise UnsupportedModelError(f"{file} has no model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{file}: model_type = {model_type!r} must be a string")
    validate.check_raw(raw, file)
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
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except StrictDataclassError as exc:  # transformers' own field checks: the cause names the field
        cause = exc.__cause__ or exc
        raise CheckpointError(f"{file}: {first_line(cause)}") from exc
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{file}: transformers rejects it: {first_line(exc)}") from exc
    validate.check_config(config, file, TESTED_FAMILIES, EXPERT_WIDTH)
    return config


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

    On CPU "auto" is float32 for unquantized checkpoints (half-precision matmuls are slow on
    many CPUs) and bfloat16 for moe-local folders: the CPU int4 kernel that runs 2/3/4-bit
    weights takes bf16 activations, and without it every call dequantizes (measured 4x slower
    decode on the demo model).
    """
    if option != "auto":
        if option not in _DTYPES:
            raise MoeLocalError(f"unknown dtype {option!r}; choose auto, {', '.join(_DTYPES)}")
        return _DTYPES[option]
    if device.startswith("cpu"):
        return torch.bfloat16 if quantized else torch.float32
    ckpt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(ckpt, str):
        ckpt = _DTYPES.get(ckpt)
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


def load(
    model: str | Path,
    options: LoadOptions | None = None,
    *,
    tokenizer: bool = True,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a Hugging Face MoE checkpoint with its experts behind an ExpertStore.

    Args:
        model: a checkpoint folder (config.json, safetensors, tokenizer) or a cached hub id.
        options: devices, dtype and memory budgets (defaults: CPU, all experts in RAM).
        tokenizer: also load the tokenizer (needed to generate from text).
        progress: called as ``progress(description, done, total)`` while loading.

    Returns:
        The loaded model.

    Raises:
        MoeLocalError: the folder, its files or the family cannot be loaded (one clear line).
    """
    options = options or LoadOptions()
    path = resolve_model_path(model, download=options.download)
    if options.offload_dir is not None:
        from moe_local.loading.offload_dir import stage_experts

        load_config(path)  # refuse a bad config before staging gigabytes
        path = stage_experts(path, options.offload_dir, progress)
    quantized = (path / MANIFEST).exists()
    manifest = read_manifest(path) if quantized else None
    config = load_config(path)
    dtype = resolve_dtype(options.dtype, config, options.device, quantized)
    files = None if quantized else CheckpointFiles(path)
    tok = load_tokenizer(path) if tokenizer else None
    lm = build_on_meta(config, dtype)

    sites = find_expert_sites(lm)
    budgeted = options.expert_memory is not None
    if manifest is not None:
        experts = BlobExperts(path, manifest, sites, dtype, drop_cache=budgeted)
        dense_bytes = load_dense(lm, path, manifest, dtype)
    else:
        rename = checkpoint_renamer(lm)
        renamed = {rename(k): k for k in files.names()}
        if is_gptq_checkpoint(path):
            experts = GptqExperts(path, files, sites, renamed, dtype, drop_cache=budgeted)
            dense_bytes = load_gptq_dense(lm, files, renamed, dtype)
        else:
            experts = CheckpointExperts(files, sites, renamed, dtype, drop_cache=budgeted)
            dense_bytes = _load_dense(lm, files, renamed, experts.claimed, dtype, progress)
    store = _make_store(experts, sites, options, progress)
    for site in sites:
        parent_name, _, attr = site.name.rpartition(".")
        parent = lm.get_submodule(parent_name)
        setattr(parent, attr, OffloadedExperts(getattr(parent, attr), site.layer, store))
    if isinstance(store, CachedStore | TieredStore) and options.prefetch:
        _wire_prefetch(lm, sites, config)
        if isinstance(store, CachedStore) and torch.device(options.device).type == "cpu":
            _leave_a_core_for_reads()
    lm.tie_weights()
    leftover = [n for n, p in lm.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"checkpoint lacks {len(leftover)} weights, e.g. {leftover[0]}")
    lm.to(options.device)
    context = min(options.context, _model_context(config)) if options.context else _model_context(config)
    eos = _eos_ids(lm, tok)
    loaded = LoadedModel(lm, tok, store, path, options, sites, context, dense_bytes, eos)
    if isinstance(store, TieredStore) and options.cpu_compute == "auto" and sites:
        _calibrate_cost(loaded, store, sites)
    return loaded


def read_dense_tensor(files: CheckpointFiles, key: str, target: torch.Tensor, dtype) -> torch.Tensor:
    """Read checkpoint tensor ``key`` for the (meta) parameter ``target``: shape checked, floats cast.

    Raises:
        CheckpointError: the shape differs from what the config implies.
    """
    t = files.read(key)
    if tuple(t.shape) != tuple(target.shape):
        raise CheckpointError(f"{key} has shape {tuple(t.shape)}; the config implies {tuple(target.shape)}")
    if target.is_floating_point() and not t.is_floating_point():
        raise CheckpointError(f"{key} is stored as {t.dtype}; a weight of this model must be floating point")
    if t.is_floating_point() and target.is_floating_point():
        t = t.to(target.dtype if target.dtype.is_floating_point else dtype)
    return t


def _load_dense(lm, files: CheckpointFiles, renamed, claimed: set[str], dtype, progress) -> int:
    """Read every non-expert weight into the meta model; return their bytes."""
    wanted = lm.state_dict(keep_vars=True)
    dense = {name: key for name, key in renamed.items() if key not in claimed and name in wanted}
    total, state = 0, {}
    for i, (name, key) in enumerate(dense.items()):
        t = read_dense_tensor(files, key, wanted[name], dtype)
        state[name] = t
        total += t.numel() * t.element_size()
        if progress:
            progress("dense weights", i + 1, len(dense))
    lm.load_state_dict(state, strict=False, assign=True)
    return total


def _leave_a_core_for_reads() -> None:
    """Cap torch's CPU threads at cores - 1 while experts stream from disk in the background.

    The prefetch thread copies expert bytes from the page cache and takes page faults; with
    torch on every core it preempts one of torch's threads, and the other spins at the next
    barrier. Measured on 2 cores (bf16 Mixtral-shaped, 40% of experts in RAM): 1 torch thread
    decodes 6.7-7.1 tokens/s against 5.0-5.6 with 2. ``MOE_LOCAL_THREADS`` overrides this.
    """
    from moe_local import env
    from moe_local.format.workers import worker_count

    if not env.THREADS.get():
        cores = worker_count()
        if cores > 1 and torch.get_num_threads() > cores - 1:
            torch.set_num_threads(cores - 1)


def _make_store(
    experts: CheckpointExperts | BlobExperts, sites, options: LoadOptions, progress
) -> ExpertStore:
    device = torch.device(options.device)
    if options.expert_memory is not None:
        need = max((experts.expert_nbytes(s.layer) for s in sites), default=0)
        if sites and options.expert_memory < need:
            raise MoeLocalError(
                f"expert memory budget of {options.expert_memory} bytes is smaller than one expert ({need})"
            )
        workers = 1 if options.prefetch else 0
        if device.type != "cpu" or options.host_memory is not None:
            if options.cpu_compute not in ("auto", "on", "off"):
                raise MoeLocalError(f"cpu_compute must be auto, on or off, not {options.cpu_compute!r}")
            host = (
                options.host_memory if options.host_memory is not None else _all_experts_bytes(experts, sites)
            )
            return TieredStore(
                experts.read,
                device,
                options.expert_memory,
                host,
                options.policy,
                workers,
                options.cpu_compute,
            )
        return CachedStore(
            experts.read, options.expert_memory, policy=options.policy, prefetch_workers=workers
        )
    all_experts = {}
    total = sum(s.num_experts for s in sites)
    for site in sites:
        for e in range(site.num_experts):
            all_experts[(site.layer, e)] = experts.read(site.layer, e).to(device)
            if progress:
                progress("experts", len(all_experts), total)
    return InMemoryStore(all_experts)


def _all_experts_bytes(experts, sites) -> int:
    return sum(experts.expert_nbytes(s.layer) * s.num_experts for s in sites)


def _calibrate_cost(lm, store: TieredStore, sites) -> None:
    """Measure (once per model and device, cached in MOE_LOCAL_HOME) when CPU compute beats a copy."""
    import hashlib

    from moe_local import env
    from moe_local.experts.tiered import CostModel, calibrate_cost

    key = hashlib.sha256(f"{lm.path.resolve()}|{store.device}".encode()).hexdigest()[:16]
    cache = env.home_dir() / "cost" / f"{key}.json"
    try:
        store.cost = CostModel(**json.loads(cache.read_text()))
        return
    except (OSError, ValueError, TypeError):
        pass
    site = sites[0]
    module = lm.model.get_submodule(site.name)
    sample = store.host.get(site.layer, 0)
    with torch.inference_mode():
        store.cost = calibrate_cost(sample, store.device, module.expert_forward)
    store.host.reset_stats()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(vars(store.cost)))
    except OSError:
        pass


def _wire_prefetch(lm, sites: list[ExpertsSite], config) -> None:
    """Give each experts module the next MoE layer's router, so it can prefetch that layer's experts."""
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    ordered = sorted(sites, key=lambda s: s.layer)
    for here, nxt in itertools.pairwise(ordered):
        block = lm.get_submodule(nxt.name.rpartition(".")[0])
        hidden = int(getattr(config, "hidden_size", 0))
        weight, bias = router_of(block, nxt.num_experts, hidden)
        if weight is not None and top_k:
            module = lm.get_submodule(here.name)
            module.next_router = NextRouter(nxt.layer, weight, bias, min(top_k, nxt.num_experts))


def _model_context(config) -> int:
    text = getattr(config, "get_text_config", lambda: config)()
    return int(getattr(text, "max_position_embeddings", None) or 4096)


def _eos_ids(lm, tok) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(lm, "generation_config", None), lm.config, tok):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value if v is not None)
    return frozenset(ids)
