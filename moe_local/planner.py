"""The memory planner: budgets -> placement of the dense part, the KV cache and the experts.

Given a model and a device with its budgets, it says how many experts fit in fast memory,
how many stay in RAM and how many on disk, predicts a decode speed range from measured
bandwidths, and refuses what cannot fit with what is lacking and what would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from moe_local.config import check_host_budget
from moe_local.errors import MoeLocalError
from moe_local.inspection import ModelInfo
from moe_local.units import human_bytes

GiB = 2**30
# (memory, host->device bytes/s, device memory bytes/s): public specifications of the cards
GPUS: dict[str, tuple[int, float, float]] = {
    "rtx4090": (24 * GiB, 25e9, 1008e9),
    "v100-16g": (16 * GiB, 12e9, 900e9),
    "v100-32g": (32 * GiB, 12e9, 900e9),
}
RUNTIME_OVERHEAD = 512 * 2**20  # allocator slack, activations, CUDA context or interpreter


@dataclass(frozen=True)
class Plan:
    """Where everything goes, and the speed to expect."""

    device: str
    fast_memory: int  # device memory (GPU) or the RAM budget (CPU)
    dense_bytes: int
    kv_bytes: int
    expert_bytes: int  # one expert, as stored
    total_experts: int
    fast_slots: int  # experts held in the fast tier
    ram_experts: int  # experts held in host RAM behind it (GPU only)
    disk_experts: int
    tokens_per_s: tuple[float, float]  # predicted decode speed range (pessimistic, optimistic)
    context: int

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


def make_plan(
    info: ModelInfo,
    *,
    gpu: str = "cpu",
    gpu_memory: int | None = None,
    cpu_memory: int | None = None,
    context: int = 4096,
    disk_bw: float = 1e9,
    ram_bw: float = 20e9,
    dtype_bytes: int = 2,
) -> Plan:
    """Place a model on a device under budgets.

    Args:
        info: the model (from ``inspect_model``).
        gpu: ``cpu`` or a name in ``GPUS``.
        gpu_memory: device memory to use (default: the card's).
        cpu_memory: host RAM to use (default: 85% of what is available now).
        context: tokens the KV cache must hold.
        disk_bw: cold read bandwidth of the model's disk, bytes/s.
        ram_bw: host memory bandwidth, bytes/s.
        dtype_bytes: bytes per KV element.

    Returns:
        The plan.

    Raises:
        MoeLocalError: the dense part and KV cache do not fit, or not even one expert per layer fits;
            the message says how much is lacking and what would fit.
    """
    if gpu != "cpu" and gpu not in GPUS:
        raise MoeLocalError(f"unknown --gpu {gpu!r}; choose cpu, {', '.join(GPUS)}")
    _check_budgets(gpu, gpu_memory, cpu_memory, context)
    ram = cpu_memory if cpu_memory is not None else int(psutil.virtual_memory().available * 0.85)
    kv = kv_cache_bytes(info.config, context, dtype_bytes)
    n_experts = info.moe_layers * info.experts_per_layer
    one = max(info.one_expert_bytes, 1)
    if gpu == "cpu":
        fast, h2d, dev_bw = ram, None, ram_bw
    else:
        card, h2d, dev_bw = GPUS[gpu]
        fast = gpu_memory if gpu_memory is not None else card
    room = fast - info.dense_bytes - kv - RUNTIME_OVERHEAD
    need = info.moe_layers * one  # one expert per layer at least
    if room < need:
        lack = need - room
        raise MoeLocalError(
            f"needs {human_bytes(lack)} more on {gpu}: dense part {human_bytes(info.dense_bytes)} + KV cache "
            f"{human_bytes(kv)} for {context} tokens + {human_bytes(RUNTIME_OVERHEAD)} runtime + one expert "
            "per layer; try a smaller --context, "
            "a lower-bit --recipe (e.g. mixtral-4090) or more memory"
        )
    slots = min(n_experts, room // one)
    ram_experts = 0
    if gpu != "cpu":  # host RAM holds what the card does not, up to its budget
        ram_experts = min(n_experts - slots, max(0, (ram - RUNTIME_OVERHEAD) // one))
    disk = n_experts - slots - ram_experts
    active = info.moe_layers * info.top_k * one
    compute_s = (info.dense_bytes + active) / dev_bw
    tps = []
    for hit in (min(1.0, slots / max(n_experts, 1)), min(1.0, 2 * slots / max(n_experts, 1))):
        miss = (1 - hit) * active
        from_ram = miss * (ram_experts / max(n_experts - slots, 1)) if h2d else 0.0
        from_disk = miss - from_ram
        t = compute_s + (from_ram / h2d if h2d else 0.0) + from_disk / disk_bw
        tps.append(1 / t if t > 0 else float("inf"))
    return Plan(
        gpu, fast, info.dense_bytes, kv, one, n_experts, slots, ram_experts, disk, (tps[0], tps[1]), context
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
        **kwargs: ``make_plan`` options (gpu, gpu_memory, cpu_memory, context).

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
    """Fill in an expert budget from the planner when the caller gave none.

    Args:
        model: the model folder.
        options: LoadOptions; an explicit ``expert_memory`` is kept as it is (flags override the plan).
        cpu_memory: host RAM to plan for (default: 85% of what is available).
        context: tokens the KV cache must hold.

    Returns:
        (LoadOptions to load with, the plan or None when the caller's budget was used).
    """
    import dataclasses

    if options.expert_memory is not None:
        return options, None
    p, _ = plan_for(model, cpu_memory=cpu_memory, context=context)
    return dataclasses.replace(options, expert_memory=p.expert_memory), p
