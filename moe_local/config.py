"""Frozen configuration: load-time options apart from per-request sampling options."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_local.errors import MoeLocalError
from moe_local.units import human_bytes

# compute dtypes by name; "auto" picks per device and checkpoint (loading.checkpoint.resolve_dtype)
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def machine_memory() -> tuple[int, int]:
    """The RAM and swap this process may use, in bytes.

    RAM is ``moe_local.memory.memory_limit``: the machine's, or less where a cgroup (a
    container's limit) or RLIMIT_AS caps this process; swap is the host's, capped by the
    cgroup's swap limit.
    """
    from moe_local.memory import memory_limit, swap_limit

    return memory_limit(), swap_limit()


_PAGE = 4096


def check_host_budget(nbytes: int | None, what: str) -> None:
    """Refuse a RAM budget this process could never hold (more than its RAM and swap together).

    Args:
        nbytes: the budget in bytes; None passes.
        what: the option, for the message (e.g. ``--cpu-memory``).

    Raises:
        MoeLocalError: the budget is negative, not an integer, or larger than RAM plus swap
            (the RAM of a cgroup limit or RLIMIT_AS where one caps this process).
    """
    if nbytes is None:
        return
    _check_bytes(nbytes, what)
    ram, swap = machine_memory()
    # a cgroup limit is rounded down to whole pages by the kernel: the value a user wrote there
    # (or a size within a page of it) is what they mean, not "more than this process may use"
    if nbytes > ram + swap + _PAGE:
        from moe_local.memory import limiting_factor

        swap_text = f" and {human_bytes(swap)} of swap" if swap else " (no swap)"
        cause = limiting_factor()
        if cause == "RAM":
            where = f"this machine could hold: it has {human_bytes(ram)} of RAM{swap_text}"
        else:
            where = f"this process may use: {human_bytes(ram)} of RAM ({cause}){swap_text}"
        raise MoeLocalError(f"{what} {human_bytes(nbytes)} is more than {where}")


def _check_bytes(nbytes: object, what: str) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise MoeLocalError(f"{what} must be a size in bytes >= 0, not {nbytes!r}")


def _check_device(device: object, budget: int | None) -> None:
    """Refuse a device torch does not know or does not have, and an expert budget it cannot hold.

    On the CPU the experts budget is RAM; on an accelerator it is that device's memory.
    """
    what = "expert memory budget"
    if not isinstance(device, str):
        raise MoeLocalError(f"device must be a string such as cpu or cuda, not {device!r}")
    if device.startswith("cpu"):
        check_host_budget(budget, what)
        return
    if budget is not None:
        _check_bytes(budget, what)
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MoeLocalError(f"unknown device {device!r}; e.g. cpu, cuda, cuda:1") from exc
    if dev.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = dev.index if dev.index is not None else 0
    if index >= count:
        raise MoeLocalError(f"device {device!r} is not available: this torch sees {count} CUDA devices")
    total = torch.cuda.get_device_properties(index).total_memory
    if budget is not None and budget > total:
        raise MoeLocalError(
            f"{what} {human_bytes(budget)} is more than {device} holds ({human_bytes(total)})"
        )


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded: devices, dtype and memory budgets (fixed for the model's life).

    Attributes:
        dtype: "auto" (the checkpoint's; on CPU float32, or bfloat16 for a moe-local folder so
            its int kernels run), "float32", "bfloat16" or "float16".
        device: where the dense part computes ("cpu", "cuda", "cuda:1").
        expert_memory: bytes of experts kept in RAM; None keeps every expert resident.
        download: allow fetching a hub id that is not in the local cache.
        context: context length to allow (None: the model's own).
        host_memory: on an accelerator, bytes of experts kept in host RAM behind the device slots
            (None: all of them); with device "cpu" it adds a second RAM tier (used in tests).
        cpu_compute: "auto", "on" or "off": compute device misses found in host RAM on the CPU.
        policy: expert cache eviction policy, "lru" or "lfu".
        prefetch: guess the next layer's experts with its router and read them ahead.
        embedding_on_disk: leave an untied input embedding table in its file and read the rows
            each lookup needs (``moe_local.loading.disk_embedding``; the planner sets it when
            experts stream, CPU only).
    """

    dtype: str = "auto"
    device: str = "cpu"
    expert_memory: int | None = None
    download: bool = False
    context: int | None = None
    host_memory: int | None = None
    cpu_compute: str = "auto"
    policy: str = "lru"
    prefetch: bool = True
    embedding_on_disk: bool = False

    def __post_init__(self) -> None:
        context = self.context
        if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
            raise MoeLocalError(f"context must be >= 1 token, not {context!r}")
        if self.dtype not in DTYPE_NAMES:
            raise MoeLocalError(f"unknown dtype {self.dtype!r}; choose {', '.join(DTYPE_NAMES)}")
        if self.policy not in ("lru", "lfu"):
            raise MoeLocalError(f"unknown cache policy {self.policy!r}; choose lru or lfu")
        _check_device(self.device, self.expert_memory)
        check_host_budget(self.host_memory, "host memory budget")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation options.

    Attributes:
        max_tokens: most new tokens to generate.
        temperature: 0 means greedy.
        top_p: nucleus sampling mass (1 disables).
        top_k: keep the k most likely tokens (0 disables).
        min_p: drop tokens below min_p times the top probability (0 disables).
        repetition_penalty: >1 discourages tokens already seen (1 disables).
        presence_penalty: OpenAI-style additive penalty for tokens present so far.
        frequency_penalty: OpenAI-style additive penalty per occurrence.
        seed: seed of the sampler's generator (None: nondeterministic).
        stop: strings that end the generation (not included in the output).
        ignore_eos: keep generating past end-of-sequence tokens.
        logprobs: number of top log-probabilities to report per token (0: none).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (0.01 <= self.repetition_penalty <= 100, "repetition_penalty must be between 0.01 and 100"),
            (0 <= self.logprobs <= 20, "logprobs must be between 0 and 20"),
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed must fit in 64 bits (|seed| < 2^63)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MoeLocalError(msg)
