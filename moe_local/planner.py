"""The memory planner: budgets -> placement of the dense part, the KV cache and the experts.

Given a model and a device with its budgets, it says how many experts fit in fast memory,
how many stay in RAM and how many on disk, predicts a decode speed range from measured
bandwidths, and refuses what cannot fit with what is lacking and what would.

On the CPU ``--cpu-memory`` is a ceiling for the whole process: the measured runtime
(``moe_local.memory.runtime_overhead``: this process's RSS now, one prefill chunk's
activations, slack), the dense part and the KV cache in the compute dtype, the experts read in
flight and the expert budget together fit in it. Without it the ceiling is what this process
holds now plus 85% of what it may still take (its cgroup's limit, not the host's RAM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_local.config import check_host_budget
from moe_local.errors import MoeLocalError
from moe_local.inspection import ModelInfo
from moe_local.memory import Overhead, activation_bytes, available_memory, memory_limit, runtime_overhead
from moe_local.units import human_bytes

GiB = 2**30
# (memory, host->device bytes/s, device memory bytes/s): public specifications of the cards
GPUS: dict[str, tuple[int, float, float]] = {
    "rtx4090": (24 * GiB, 25e9, 1008e9),
    "v100-16g": (16 * GiB, 12e9, 900e9),
    "v100-32g": (32 * GiB, 12e9, 900e9),
}
DEVICE_OVERHEAD = 512 * 2**20  # on a card: CUDA context, allocator slack, activations (not measured)
RUNTIME_OVERHEAD = DEVICE_OVERHEAD  # the former name, for a card (host RAM is measured: runtime_overhead)
_FLOAT_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_KERNEL_BITS = ("int2-", "int3-", "int4-")  # schemes the CPU int4 kernel runs from a repacked copy


@dataclass(frozen=True)
class Plan:
    """Where everything goes, and the speed to expect.

    Sizes are in memory, in the compute dtype ``dtype`` (a bf16 checkpoint computed in float32
    takes twice its bytes on disk).
    """

    device: str
    fast_memory: int  # device memory (GPU) or the RAM ceiling of the whole process (CPU)
    dense_bytes: int
    kv_bytes: int
    expert_bytes: int  # one expert, in memory
    total_experts: int
    fast_slots: int  # experts held in the fast tier
    ram_experts: int  # experts held in host RAM behind it (GPU only)
    disk_experts: int
    tokens_per_s: tuple[float, float]  # predicted decode speed range (pessimistic, optimistic)
    context: int
    overhead: int = 0  # runtime charged to the fast tier (measured on CPU, DEVICE_OVERHEAD on a card)
    reads_in_flight: int = 0  # experts read ahead or on a miss before the cache evicts (bytes)
    dtype: str = "float32"  # the compute dtype the sizes are for
    runtime: Overhead | None = None  # the host's measured runtime overhead, in parts
    prefetch: bool = True  # False: no room to read ahead, misses are read when routed (CPU)
    embedding_on_disk: bool = False  # the input table is read row by row from its file (not in dense_bytes)
    load_transient: int = 0  # held twice while the dense part loads, in the room experts take later

    @property
    def expert_memory(self) -> int | None:
        """The expert budget to load with (None: every expert fits)."""
        return None if self.fast_slots >= self.total_experts else self.fast_slots * self.expert_bytes


def kv_cache_bytes(config, context: int, dtype_bytes: int) -> int:
    """Bytes of the KV cache for ``context`` tokens (keys and values of every layer)."""
    layers = int(getattr(config, "num_hidden_layers", 0))
    heads = int(getattr(config, "num_attention_heads", 1))
    if getattr(config, "kv_lora_rank", None):  # MLA: transformers caches decompressed keys and values
        k = heads * (int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim))
        v = heads * int(config.v_head_dim)
        return layers * context * (k + v) * dtype_bytes
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return 2 * layers * context * kv_heads * head_dim * dtype_bytes


def compute_dtype(info: ModelInfo, dtype: str = "auto", device: str = "cpu") -> str:
    """The compute dtype a load with ``dtype`` picks for ``info`` on ``device`` (``resolve_dtype``)."""
    import torch

    from moe_local.loading.checkpoint import resolve_dtype

    chosen = resolve_dtype(dtype, info.config, device, info.quantized)
    return str(chosen).removeprefix("torch.") if isinstance(chosen, torch.dtype) else "bfloat16"


def resident_sizes(info: ModelInfo, dtype: str, device: str = "cpu") -> tuple[int, int]:
    """Bytes in memory of the dense part and of one expert when computing in ``dtype``.

    A Hugging Face checkpoint's floats are cast to ``dtype``; a moe-local folder's kept
    tensors are 16-bit and its quantized ones stay as stored, and on the CPU in bfloat16 without
    moe-local's native kernel a 2/3/4-bit expert gains torch's int4 kernel's repacked copy of its
    codes (measured 2.0x: 121.5 MiB of experts became 240 MiB; the native kernel reads the codes as
    stored). GPTQ codes stay as stored; its 16-bit tensors are cast.
    """
    from moe_local.quant import native

    elem = _FLOAT_BYTES.get(dtype, 2)
    if info.quantized:
        kernel = device.startswith("cpu") and dtype == "bfloat16" and not native.available()
        doubled = kernel and any(s.startswith(_KERNEL_BITS) for s in info.dtypes)
        return _scale(info.dense_bytes, elem, 2), info.one_expert_bytes * (2 if doubled else 1)
    stored = [_FLOAT_BYTES[d] for d in info.dtypes if d in _FLOAT_BYTES]
    if not stored:  # GPTQ: codes as stored, fp16 norms, embeddings and biases cast
        return _scale(info.dense_bytes, elem, 2), info.one_expert_bytes
    narrowest = min(stored)  # mixed float dtypes: sized as if all were the narrowest (an upper bound)
    return _scale(info.dense_bytes, elem, narrowest), _scale(info.one_expert_bytes, elem, narrowest)


def _scale(nbytes: int, elem: int, stored: int) -> int:
    return nbytes * elem // stored if elem > stored else nbytes


def _cast_transient(info: ModelInfo, dtype: str) -> int:
    """Bytes held twice while loading: the largest dense tensor (the embedding) read, then cast."""
    if info.quantized or dtype not in _FLOAT_BYTES:
        return 0
    stored = [_FLOAT_BYTES[d] for d in info.dtypes if d in _FLOAT_BYTES]
    if not stored or all(s == _FLOAT_BYTES[dtype] for s in stored):
        return 0  # no cast: the tensor read is the tensor kept
    text = info.config.get_text_config() if hasattr(info.config, "get_text_config") else info.config
    return int(getattr(text, "vocab_size", 0) or 0) * int(getattr(text, "hidden_size", 0) or 0) * max(stored)


def _layout_transient(info: ModelInfo) -> int:
    """Bytes held twice while a quantized folder's dense weights are laid out for the kernel.

    Each quantized linear is read, then copied with each row's scales beside its codes
    (``moe_local.quant.interleave``) before the read copy goes: the largest of them (the lm_head, at
    most 8 bits a weight) is held twice for a moment.
    """
    if not info.quantized:
        return 0
    text = info.config.get_text_config() if hasattr(info.config, "get_text_config") else info.config
    return int(getattr(text, "vocab_size", 0) or 0) * int(getattr(text, "hidden_size", 0) or 0)


def make_plan(
    info: ModelInfo,
    *,
    gpu: str = "cpu",
    gpu_memory: int | None = None,
    cpu_memory: int | None = None,
    context: int = 4096,
    disk_bw: float = 1e9,
    ram_bw: float = 20e9,
    dtype_bytes: int | None = None,
    dtype: str = "auto",
    overhead: Overhead | None = None,
) -> Plan:
    """Place a model on a device under budgets.

    Args:
        info: the model (from ``inspect_model``).
        gpu: ``cpu`` or a name in ``GPUS``.
        gpu_memory: device memory to use (default: the card's).
        cpu_memory: host RAM the whole process may use (default: what it holds now plus 85% of
            what it may still take, at most its memory limit).
        context: tokens the KV cache must hold.
        disk_bw: cold read bandwidth of the model's disk, bytes/s.
        ram_bw: host memory bandwidth, bytes/s.
        dtype_bytes: bytes per KV element (default: the compute dtype's).
        dtype: the load's dtype option; on the CPU ``"auto"`` computes a bfloat16 checkpoint in
            float32 only when it fits whole that way, else in bfloat16 (twice the experts in RAM).
        overhead: the host's runtime overhead (default: measured now, ``runtime_overhead``).

    Returns:
        The plan.

    Raises:
        MoeLocalError: the dense part and KV cache do not fit, or not even one expert fits;
            the message says how much is lacking and what would fit.
    """
    if gpu != "cpu" and gpu not in GPUS:
        raise MoeLocalError(f"unknown --gpu {gpu!r}; choose cpu, {', '.join(GPUS)}")
    _check_budgets(gpu, gpu_memory, cpu_memory, context)
    device = "cpu" if gpu == "cpu" else "cuda"
    base = overhead if overhead is not None else runtime_overhead()  # the baseline now; activations below
    if cpu_memory is not None:
        ram = cpu_memory
    else:  # a cgroup may not charge pages this process maps from before it joined: RSS bounds it
        ram = min(base.baseline + int(available_memory() * 0.85), memory_limit())
    name = compute_dtype(info, dtype, device)
    if dtype == "auto" and gpu == "cpu" and name == "float32" and "bfloat16" in info.dtypes:
        measured = overhead is None
        if not _fits_whole(info, ram, base, context, dtype_bytes, "float32", measured):
            name = "bfloat16"  # bf16 decode is as fast (measured) and holds twice the experts
    runtime = _with_activations(info, base, context, name) if overhead is None else overhead
    return _place(info, gpu, gpu_memory, ram, context, disk_bw, ram_bw, dtype_bytes, name, runtime)


def _with_activations(info: ModelInfo, base: Overhead, context: int, name: str) -> Overhead:
    """The measured baseline with the activations of ``context`` tokens computed in ``name``."""
    act = activation_bytes(info.config, context, _FLOAT_BYTES.get(name, 2)) if info.config is not None else 0
    return Overhead(base.baseline, act, base.slack)


def _fits_whole(info, ram: int, base: Overhead, context: int, dtype_bytes, name: str, measured: bool) -> bool:
    dense, one = resident_sizes(info, name)
    kv = kv_cache_bytes(info.config, context, dtype_bytes or _FLOAT_BYTES.get(name, 2))
    runtime = _with_activations(info, base, context, name) if measured else base
    over = runtime.total + _cast_transient(info, name) + _layout_transient(info)
    return ram - dense - kv - over >= info.moe_layers * info.experts_per_layer * one


def _place(info, gpu, gpu_memory, ram, context, disk_bw, ram_bw, dtype_bytes, name, runtime) -> Plan:
    device = "cpu" if gpu == "cpu" else "cuda"
    dense, one = resident_sizes(info, name, device)
    one = max(one, 1)
    kv = kv_cache_bytes(info.config, context, dtype_bytes or _FLOAT_BYTES.get(name, 2))
    n_experts = info.moe_layers * info.experts_per_layer
    # on the CPU a miss is read before the cache evicts for it, and a prefill chunk prefetches
    # 2 x top-k experts of the next layer: measured 42 MiB over the budget for 45 MiB reserved;
    # a quantized expert is also copied into the kernel's row layout as it is read (one more)
    laid_out = one if info.quantized else 0
    in_flight = (2 * max(info.top_k, 1) + 1) * one + laid_out if gpu == "cpu" else 0
    # held twice for a moment while the dense part loads, before any expert is read: it needs the
    # room the experts take later, not room of its own
    transient = 0
    if gpu == "cpu":
        fast, h2d, dev_bw = ram, None, ram_bw
        over = runtime.total
        transient = _cast_transient(info, name) + _layout_transient(info)
        what_over = f"{human_bytes(over)} runtime (this process now, activations, slack)"
    else:
        card, h2d, dev_bw = GPUS[gpu]
        fast = gpu_memory if gpu_memory is not None else card
        over = DEVICE_OVERHEAD
        what_over = f"{human_bytes(over)} runtime"
    room = fast - dense - kv - over
    on_disk = False
    if gpu == "cpu" and info.embedding_bytes and room < n_experts * one + laid_out:
        # experts stream: the input table stays in its file (moe_local.loading.disk_embedding), its
        # bytes go to experts; counted as resident_sizes counted it (cast with the dense part)
        freed = info.embedding_bytes * dense // max(info.dense_bytes, 1)
        dense, room, on_disk = dense - freed, room + freed, True
    # the cache must hold one expert: a miss is computed as soon as it is read (the loop takes
    # one expert at a time; several at once only when all are resident), so a budget of one
    # streams every layer's experts in turn; slow, but it runs where nothing else can
    need = one
    prefetch = True
    if room >= n_experts * one + laid_out:
        slots, in_flight = n_experts, 0  # every expert resident: nothing streams (after the load)
    elif room - in_flight >= need:
        slots = (room - in_flight) // one
    elif gpu == "cpu" and room - one - laid_out >= need:
        # no room to read ahead: without prefetch only the miss being read is in flight (big
        # experts under a tight cap: a Mixtral-8x7B bf16 expert is 336 MiB, 5 of them 1.6 GiB)
        prefetch, in_flight = False, one + laid_out
        slots = (room - in_flight) // one
    else:
        lack = need + in_flight - room
        where = "cpu" if gpu == "cpu" else gpu
        raise MoeLocalError(
            f"needs {human_bytes(lack)} more on {where}: dense part {human_bytes(dense)} + KV cache "
            f"{human_bytes(kv)} for {context} tokens + {what_over} + one expert cached and "
            f"{human_bytes(in_flight)} of reads in flight ({name}); try a smaller --context, "
            "a lower-bit --recipe (e.g. mixtral-4090) or more memory"
        )
    if room < transient:
        raise MoeLocalError(
            f"needs {human_bytes(transient - room)} more on cpu while loading: dense part "
            f"{human_bytes(dense)} + KV cache {human_bytes(kv)} + {what_over} + "
            f"{human_bytes(transient)} held twice while the dense part is cast or laid out ({name}); "
            "try a smaller --context, a lower-bit --recipe (e.g. mixtral-4090) or more memory"
        )
    ram_experts = 0
    if gpu != "cpu":  # host RAM holds what the card does not, up to its budget
        ram_experts = min(n_experts - slots, max(0, (ram - runtime.total) // one))
    disk = n_experts - slots - ram_experts
    active = info.moe_layers * info.top_k * one
    stored_active = info.moe_layers * info.top_k * max(info.one_expert_bytes, 1)
    compute_s = (dense + active) / dev_bw
    tps = []
    for hit in (min(1.0, slots / max(n_experts, 1)), min(1.0, 2 * slots / max(n_experts, 1))):
        miss = 1 - hit
        from_ram = miss * active * (ram_experts / max(n_experts - slots, 1)) if h2d else 0.0
        from_disk = miss * stored_active * (1 - (ram_experts / max(n_experts - slots, 1) if h2d else 0.0))
        t = compute_s + (from_ram / h2d if h2d else 0.0) + from_disk / disk_bw
        tps.append(1 / t if t > 0 else float("inf"))
    return Plan(
        device=gpu,
        fast_memory=fast,
        dense_bytes=dense,
        kv_bytes=kv,
        expert_bytes=one,
        total_experts=n_experts,
        fast_slots=slots,
        ram_experts=ram_experts,
        disk_experts=disk,
        tokens_per_s=(tps[0], tps[1]),
        context=context,
        overhead=over,
        reads_in_flight=in_flight,
        dtype=name,
        runtime=runtime,
        prefetch=prefetch,
        embedding_on_disk=on_disk,
        load_transient=transient,
    )


def _check_budgets(gpu: str, gpu_memory: int | None, cpu_memory: int | None, context: int) -> None:
    """Refuse budgets no plan can use: a context under one token, a size below zero or above the card."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise MoeLocalError(f"--context must be >= 1 token, not {context!r}")
    for flag, value in (("--gpu-memory", gpu_memory), ("--cpu-memory", cpu_memory)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise MoeLocalError(f"{flag} must be a size in bytes >= 0, not {value!r}")
    if gpu_memory is not None and gpu == "cpu":
        raise MoeLocalError("--gpu-memory needs --gpu (a card); on cpu the budget is --cpu-memory")
    if gpu_memory is not None and gpu_memory > GPUS[gpu][0]:
        raise MoeLocalError(
            f"--gpu-memory {human_bytes(gpu_memory)} is more than {gpu} has ({human_bytes(GPUS[gpu][0])})"
        )


def plan_for(model: str | Path, **kwargs) -> tuple[Plan, ModelInfo]:
    """Inspect ``model``, measure this machine's bandwidths (cached) and plan it.

    Args:
        model: a checkpoint or moe-local folder.
        **kwargs: ``make_plan`` options (gpu, gpu_memory, cpu_memory, context, dtype).

    Returns:
        (plan, model info).
    """
    from moe_local.bandwidth import measure_bandwidths
    from moe_local.inspection import inspect_model

    # this machine's bandwidths are measured, so the RAM planned for must be this machine's too
    check_host_budget(kwargs.get("cpu_memory"), "--cpu-memory")
    info = inspect_model(model)
    bw = measure_bandwidths(info.path)
    return make_plan(info, disk_bw=bw.disk, ram_bw=bw.ram, **kwargs), info


def planned_options(model: str | Path, options, *, cpu_memory: int | None = None, context: int = 4096):
    """Fill in an expert budget (and, for ``dtype="auto"``, the dtype) from the planner.

    Args:
        model: the model folder.
        options: LoadOptions; an explicit ``expert_memory`` is kept as it is (flags override the plan).
        cpu_memory: host RAM the whole process may use (default: what it holds now plus 85% of
            what it may still take).
        context: tokens the KV cache must hold.

    Returns:
        (LoadOptions to load with, the plan or None when the caller's budget was used). The
        options say ``dtype="bfloat16"`` where ``"auto"`` would compute a bf16 checkpoint in
        float32 that does not fit whole that way, and ``prefetch=False`` where the plan has no
        room for reads ahead.
    """
    import dataclasses

    if options.expert_memory is not None:
        on_disk = _check_explicit_budget(model, options, cpu_memory, context)
        return dataclasses.replace(options, embedding_on_disk=on_disk), None
    p, info = plan_for(model, cpu_memory=cpu_memory, context=context, dtype=options.dtype)
    dtype = options.dtype
    if dtype == "auto" and p.dtype != compute_dtype(info, "auto", options.device):
        dtype = p.dtype
    prefetch = options.prefetch and p.prefetch  # no room to read ahead: the plan turned it off
    on_disk = p.embedding_on_disk
    planned = dict(expert_memory=p.expert_memory, dtype=dtype, prefetch=prefetch, embedding_on_disk=on_disk)
    return dataclasses.replace(options, **planned), p


def _check_explicit_budget(model: str | Path, options, cpu_memory: int | None, context: int) -> bool:
    """Refuse an ``--expert-memory`` that cannot fit beside the dense part and the runtime.

    Under a cgroup limit an oversized budget is otherwise found out by the OOM killer, mid-decode.

    Returns:
        Whether the plan checked against leaves the input table on disk (the load must too).

    Raises:
        MoeLocalError: the budget, the dense part, the KV cache, the runtime and one expert read
            in flight exceed the memory this process may use (one line, with the budget that fits).
    """
    from moe_local.inspection import inspect_model

    info = inspect_model(model)
    if not info.moe_layers:
        return False
    p = make_plan(info, cpu_memory=cpu_memory, context=context, dtype=options.dtype)
    if p.fast_slots >= p.total_experts:
        return False  # every expert fits: any budget does, the table stays in RAM
    fixed = p.dense_bytes + p.kv_bytes + p.overhead + p.expert_bytes  # one expert read before eviction
    if fixed + options.expert_memory > p.fast_memory:
        most = max(p.fast_memory - fixed, 0)
        raise MoeLocalError(
            f"--expert-memory {human_bytes(options.expert_memory)} does not fit: with the dense part "
            f"{human_bytes(p.dense_bytes)}, the runtime {human_bytes(p.overhead)} and one expert read in "
            f"flight this process would need {human_bytes(fixed + options.expert_memory)} of the "
            f"{human_bytes(p.fast_memory)} it may use; give at most {human_bytes(most)}"
        )
    return p.embedding_on_disk
