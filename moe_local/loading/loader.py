"""``load``: a checkpoint folder -> a transformers model whose experts sit behind an ExpertStore.

``open_checkpoint`` reads the config and builds the model on meta; the dense weights
(attention, norms, embeddings, routers, shared experts) are read tensor by tensor into it; every
layer's experts module is swapped for OffloadedExperts over a store, so peak memory is the dense
part plus what the store keeps.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_local.config import LoadOptions
from moe_local.errors import CheckpointError, MoeLocalError
from moe_local.experts.cache import CachedStore, return_freed_memory_to_os
from moe_local.experts.module import NextRouter, swap_experts
from moe_local.experts.sites import ExpertsSite
from moe_local.experts.store import ExpertStore, InMemoryStore
from moe_local.experts.tiered import TieredStore
from moe_local.experts.weights import ExpertWeights
from moe_local.format.source import ExpertSource
from moe_local.loading.attention import use_float32_attention
from moe_local.loading.checkpoint import GPTQ, checkpoint_kind, open_checkpoint
from moe_local.loading.families import router_of
from moe_local.loading.resolve import resolve_model_path
from moe_local.quant.dense import use_native_dense
from moe_local.quant.linear import QuantLinear

Progress = Callable[[str, int, int], None]


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
    # a tensor read then cast frees its read buffer: served by mmap, it leaves the process
    # (else glibc keeps the holes: 161 MiB more RSS for a 0.5 GB bf16 checkpoint in float32)
    return_freed_memory_to_os()
    budgeted = options.expert_memory is not None
    ckpt = open_checkpoint(
        model, dtype=options.dtype, device=options.device, drop_cache=budgeted, download=options.download
    )
    tok = ckpt.tokenizer() if tokenizer else None
    lm, sites, config = ckpt.meta, ckpt.sites, ckpt.config
    if options.embedding_on_disk and torch.device(options.device).type == "cpu":
        _leave_table_on_disk(ckpt)
    dense_bytes = ckpt.load_dense(progress)
    store = _make_store(ckpt.experts, sites, options, progress, ckpt.dtype)
    swap_experts(lm, sites, store)
    if store.reads_ahead and options.prefetch:
        _wire_prefetch(lm, sites, config)
        if isinstance(store, CachedStore) and torch.device(options.device).type == "cpu":
            _leave_a_core_for_reads()
    tie_weights(lm)
    leftover = [n for n, p in lm.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"checkpoint lacks {len(leftover)} weights, e.g. {leftover[0]}")
    lm.to(options.device)
    if torch.device(options.device).type == "cpu":
        _prepare_dense_kernels(lm, ckpt.dtype)
        use_native_dense(lm)  # bf16 linears: torch's CPU bf16 matmul is 1.5-6x slower than needed
        use_float32_attention(lm)  # and its bf16 sdpa about 6x slower than float32's
    context = min(options.context, _model_context(config)) if options.context else _model_context(config)
    eos = _eos_ids(lm, tok)
    loaded = LoadedModel(lm, tok, store, ckpt.path, options, sites, context, dense_bytes, eos)
    if isinstance(store, TieredStore) and options.cpu_compute == "auto" and sites:
        _calibrate_cost(loaded, store, sites)
    return loaded


def _leave_table_on_disk(ckpt) -> None:
    """Put a ``DiskEmbedding`` in place of the input table before the dense part is read."""
    from moe_local.loading.disk_embedding import DiskEmbedding, find_table, verify

    source = find_table(ckpt)
    if source is None:  # the planner counted the table resident too (inspect_model found none)
        return
    verify(source)
    table = ckpt.meta.get_submodule(source.name)
    ckpt.meta.set_submodule(source.name, DiskEmbedding(source, ckpt.dtype, table.padding_idx))


def load_gptq(
    model: str | Path,
    options: LoadOptions | None = None,
    *,
    tokenizer: bool = True,
    progress: Progress | None = None,
) -> LoadedModel:
    """``load``, refusing anything but a GPTQ checkpoint.

    Raises:
        CheckpointError: ``model`` is not a GPTQ checkpoint.
    """
    path = resolve_model_path(model, download=bool(options and options.download))
    if checkpoint_kind(path) != GPTQ:
        raise CheckpointError(f"{path} is not a GPTQ checkpoint (no quant_method gptq in config.json)")
    return load(path, options, tokenizer=tokenizer, progress=progress)


def tie_weights(lm: torch.nn.Module) -> None:
    """``lm.tie_weights()``, with an output projection tied to a quantized embedding table made a
    ``QuantLinear`` over that same table (one copy serves both; a ``QuantEmbedding`` has no
    ``.weight`` parameter for transformers to tie to)."""
    from moe_local.quant.embedding import QuantEmbedding

    if not any(isinstance(m, QuantEmbedding) for m in lm.modules()):
        lm.tie_weights()
        return
    kept = {}
    for target, source in lm.get_expanded_tied_weights_keys(all_submodels=True).items():
        mods = {n: lm.get_submodule(n.rsplit(".", 1)[0]) for n in (target, source)}
        table = next((m for m in mods.values() if isinstance(m, QuantEmbedding)), None)
        if table is None:
            kept[target] = source
            continue
        other_name, other = next((n, m) for n, m in mods.items() if m is not table)
        weight = getattr(other, "weight", None)
        if isinstance(other, torch.nn.Linear) and weight is not None and weight.device.type == "meta":
            if other.bias is not None:
                raise CheckpointError(f"{other_name} is tied to a quantized embedding table but has a bias")
            lm.set_submodule(other_name.rsplit(".", 1)[0], QuantLinear(table.quantized()))
    lm.all_tied_weights_keys = kept
    lm.tie_weights(recompute_mapping=False)


def _leave_a_core_for_reads() -> None:
    """Cap torch's CPU threads at cores - 1 while experts stream from disk in the background.

    The prefetch thread copies expert bytes from the page cache and takes page faults; with
    torch on every core it preempts one of torch's threads, and the other spins at the next
    barrier. Measured on 2 cores (bf16 Mixtral-shaped, 40% of experts in RAM): 1 torch thread
    decodes 6.7-7.1 tokens/s against 5.0-5.6 with 2. ``MOE_LOCAL_THREADS`` overrides this.
    """
    from moe_local import env

    if not env.THREADS.get():
        cores = env.usable_cores()
        if cores > 1 and torch.get_num_threads() > cores - 1:
            torch.set_num_threads(cores - 1)


def _prepare_dense_kernels(lm: torch.nn.Module, dtype: torch.dtype) -> None:
    """Convert every quantized dense linear (attention, lm_head ...) to the CPU kernel layout now.

    Done at load rather than in the first forward, so the time to first token does not include it;
    the kernel layout then is the weight's one copy in RAM.
    """
    for module in lm.modules():
        if isinstance(module, QuantLinear):
            module.prepare_kernel(dtype)


def _read_for_cpu(read: Callable[[int, int], ExpertWeights], dtype: torch.dtype):
    """``read``, with each expert converted to the CPU kernel layout as it arrives.

    In a ``CachedStore`` the prefetch thread is the caller, so the conversion overlaps the
    compute of the layers before; in an ``InMemoryStore`` it happens once, at load.
    """

    def read_prepared(layer: int, expert: int) -> ExpertWeights:
        return read(layer, expert).prepare_kernel(dtype)

    return read_prepared


def _make_store(
    experts: ExpertSource, sites, options: LoadOptions, progress, dtype: torch.dtype
) -> ExpertStore:
    device = torch.device(options.device)
    # experts computed on the CPU are converted to its kernel layout as they are read (a no-op for
    # the native kernel); TieredStore's host copies stay as read, since device copies read them
    read = _read_for_cpu(experts.read, dtype) if device.type == "cpu" else experts.read
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
            host = options.host_memory if options.host_memory is not None else experts.total_nbytes(sites)
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
            read,  # on the CPU here
            options.expert_memory,
            policy=options.policy,
            prefetch_workers=workers,
        )
    all_experts = {}
    total = sum(s.num_experts for s in sites)
    for site in sites:
        for e in range(site.num_experts):
            all_experts[(site.layer, e)] = read(site.layer, e).to(device)
            if progress:
                progress("experts", len(all_experts), total)
    return InMemoryStore(all_experts)


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
        if here.name.split(".")[0] != nxt.name.split(".")[0]:
            continue  # an encoder's last layer does not route the decoder's tokens: no guess
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
