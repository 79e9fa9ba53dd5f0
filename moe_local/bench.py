"""``bench``: prefill and decode speed of a model under given budgets, with what bounds it.

After a warm-up, a prompt of ``prompt_tokens`` random token ids is prefilled and
``new_tokens`` are decoded greedily (EOS ignored). Reported beside the speeds: expert hit rate,
bytes read per token from RAM and disk, time waiting on I/O, peak RSS (and GPU memory), and
the floor: bytes read from disk / measured disk bandwidth + the time of the same step with
every weight resident: measured with a second, all-resident copy when that copy fits beside
the first under this process's real memory limit (its cgroup's, RLIMIT_AS, ``--cpu-memory``),
else estimated from the measured RAM bandwidth, so a run under a cap smaller than the model
still finishes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_local.config import LoadOptions, SamplingParams
from moe_local.errors import MoeLocalError
from moe_local.memory import available_memory, peak_rss, process_rss


@dataclass(frozen=True)
class BenchResult:
    """One benchmark run; every field is also written by ``--json``."""

    model: str
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    expert_hit_rate: float
    bytes_from_ram_per_token: float
    bytes_from_disk_per_token: float
    io_wait_s_per_token: float
    peak_rss_bytes: int
    peak_gpu_bytes: int
    disk_bandwidth: float
    resident_s_per_token: float
    floor_s_per_token: float
    ratio_to_floor: float
    expert_memory: int | None
    resident_measured: bool = True  # False: the all-resident time is estimated from RAM bandwidth


def _decode_s_per_token(lm, prompt: list[int], new_tokens: int) -> tuple[float, object]:
    from moe_local.generation import stream_generate

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    last = None
    for resp in stream_generate(lm, prompt, params):
        last = resp
    return 1 / last.generation_tps if last.generation_tps else float("inf"), last


def bench(
    model: str | Path,
    options: LoadOptions | None = None,
    *,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    measure_resident: bool = True,
    cpu_memory: int | None = None,
) -> BenchResult:
    """Benchmark ``model`` with ``options`` (budgets, device).

    Args:
        model: a model folder.
        options: load options; ``expert_memory`` sets the expert budget.
        prompt_tokens: prompt length.
        new_tokens: tokens to decode.
        measure_resident: also time an all-resident run for the floor when a second copy with
            every expert resident fits beside the first (else it is estimated).
        cpu_memory: RAM the whole process may use (``--cpu-memory``); the all-resident copy is
            loaded only under it, as under the memory limit.

    Returns:
        The measurements.
    """
    from moe_local.bandwidth import measure_bandwidths
    from moe_local.generation import stream_generate
    from moe_local.loading.loader import load

    options = options or LoadOptions()
    if new_tokens < 2:
        raise MoeLocalError("--new-tokens must be at least 2")
    if prompt_tokens < 1:
        raise MoeLocalError("--prompt-tokens must be at least 1")
    lm = load(model, options, tokenizer=False)
    if prompt_tokens + new_tokens >= lm.context:
        raise MoeLocalError(
            f"prompt + new tokens ({prompt_tokens + new_tokens}) exceed the context ({lm.context})"
        )
    vocab = int(lm.model.config.get_text_config().vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()
    for _ in stream_generate(lm, prompt[:16], SamplingParams(max_tokens=4, ignore_eos=True)):
        pass  # warm-up: kernels, allocator, first reads
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _, last = _decode_s_per_token(lm, prompt, new_tokens)
    bw = measure_bandwidths(lm.path)
    steps = max(last.generation_tokens, 1)
    t = last.experts.total
    disk_per_token = t.bytes_from_disk / steps
    budgeted = options.expert_memory is not None  # else lm is all-resident already: timed as it is
    measure = measure_resident and budgeted and _second_copy_fits(lm, cpu_memory)
    resident, measured = _resident_s_per_token(lm, options, model, prompt, new_tokens, measure, bw)
    floor = disk_per_token / bw.disk + resident
    s_per_token = 1 / last.generation_tps if last.generation_tps else float("inf")
    return BenchResult(
        model=lm.name,
        prompt_tokens=prompt_tokens,
        new_tokens=last.generation_tokens,
        prefill_tokens_per_s=last.prompt_tps,
        decode_tokens_per_s=last.generation_tps,
        time_to_first_token_s=last.ttft_s,
        expert_hit_rate=last.experts.hit_rate,
        bytes_from_ram_per_token=t.bytes_from_ram / steps,
        bytes_from_disk_per_token=disk_per_token,
        io_wait_s_per_token=t.io_wait_s / steps,
        peak_rss_bytes=peak_rss(),
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        disk_bandwidth=bw.disk,
        resident_s_per_token=resident,
        floor_s_per_token=floor,
        ratio_to_floor=s_per_token / floor if floor > 0 else float("inf"),
        expert_memory=options.expert_memory,
        resident_measured=measured,
    )


def _all_experts_bytes(lm) -> int:
    """Bytes of every expert in memory, sized from expert 0 of the first layer."""
    if not lm.sites:
        return 0
    return lm.store.get(lm.sites[0].layer, 0).nbytes * lm.sites[0].num_experts * len(lm.sites)


def _second_copy_fits(lm, cpu_memory: int | None) -> bool:
    """Whether a copy with every expert resident fits beside ``lm`` under the real memory limit.

    The copy needs its dense part and every expert in memory; they must fit in 90% of what the
    cgroup, RLIMIT_AS and the host leave free now (the rest for its activations and KV cache),
    and in ``cpu_memory`` less what this process holds.
    """
    need = lm.dense_bytes + _all_experts_bytes(lm)
    room = available_memory()
    if cpu_memory is not None:
        room = min(room, cpu_memory - process_rss())
    return need < room * 0.9


def _resident_s_per_token(lm, options, model, prompt, new_tokens, measure, bw) -> tuple[float, bool]:
    """Time per decode token with every expert resident, and whether it was measured (else estimated)."""
    from moe_local.loading.loader import load

    if options.expert_memory is None:
        return _decode_s_per_token(lm, prompt[:64], min(new_tokens, 32))[0], True
    if measure:
        resident = load(model, dataclasses.replace(options, expert_memory=None), tokenizer=False)
        return _decode_s_per_token(resident, prompt[:64], min(new_tokens, 32))[0], True
    one = lm.store.get(lm.sites[0].layer, 0).nbytes if lm.sites else 0
    top_k = int(getattr(lm.model.config, "num_experts_per_tok", 1) or 1)
    return (lm.dense_bytes + one * top_k * len(lm.sites)) / bw.ram, False


def format_table(r: BenchResult) -> str:
    """The human-readable report."""
    from moe_local.units import human_bytes

    rows = [
        ("model", r.model),
        ("prefill", f"{r.prefill_tokens_per_s:.1f} tokens/s ({r.prompt_tokens} tokens)"),
        ("decode", f"{r.decode_tokens_per_s:.2f} tokens/s ({r.new_tokens} tokens)"),
        ("time to first token", f"{r.time_to_first_token_s * 1000:.0f} ms"),
        ("expert hit rate", f"{r.expert_hit_rate:.1%}"),
        ("read per token", f"{human_bytes(r.bytes_from_ram_per_token)} from RAM, "
                           f"{human_bytes(r.bytes_from_disk_per_token)} from disk"),
        ("I/O wait per token", f"{r.io_wait_s_per_token * 1000:.1f} ms"),
        ("peak RSS", human_bytes(r.peak_rss_bytes) + (f", GPU {human_bytes(r.peak_gpu_bytes)}"
                                                       if r.peak_gpu_bytes else "")),
        ("floor", f"{r.floor_s_per_token * 1000:.1f} ms/token (disk {human_bytes(r.disk_bandwidth)}/s, "
                  f"resident {r.resident_s_per_token * 1000:.1f} ms/token"
                  f"{'' if r.resident_measured else ', estimated: a resident copy would not fit'}); "
                  f"measured/floor {r.ratio_to_floor:.2f}x"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
