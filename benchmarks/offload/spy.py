"""Summarize a py-spy ``--format raw --idle --threads`` profile of one measured generation.

Each line is ``thread (tid): NAME;frame;frame;... COUNT`` (frames root first). Samples of the main
thread are put in the first category (in ``CATEGORIES`` order) any of their frames matches, so
"wait for a prefetch read" wins over the cache code that waits; the other threads (moe-local's
prefetch reader) are summarized by their innermost frame.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# (category, substrings of a frame; a sample belongs to the first category with a matching frame)
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("page cache eviction hook (benchmark; not in decode time)", ("StepClock._pre",)),
    (
        "accelerate: load offloaded weights (safetensors mmap reads, hooks)",
        ("AlignDevicesHook", "OffloadedWeightsLoader", "set_module_tensor_to_device"),
    ),
    ("wait for a prefetch read (CachedStore.get -> Future.result)", ("Future.result",)),
    ("expert read on a miss, main thread (pread + cat/cast)", ("HfExperts.read", "BlobExperts.read")),
    ("int4 kernel-layout conversion of a new expert", ("_kernel_tensors", "pack_int4_weight")),
    ("expert matmuls (apply_linear)", ("apply_linear",)),
    ("expert gate act (SiLU * up)", ("OffloadedExperts._gate",)),
    ("next-layer router guess (prefetch)", ("NextRouter.guess",)),
    ("expert cache bookkeeping (CachedStore)", ("CachedStore.",)),
    ("OffloadedExperts.forward rest (unique/where/index/index_add)", ("OffloadedExperts.forward",)),
    ("transformers experts (resident HF model)", ("MixtralExperts.forward",)),
    ("router + MoE block (transformers)", ("MixtralSparseMoeBlock", "MixtralTopKRouter")),
    ("attention (incl. KV cache)", ("MixtralAttention.forward",)),
    ("RMSNorm", ("MixtralRMSNorm.forward",)),
    ("decoder rest (residuals, rotary, masks)", ("MixtralModel.forward",)),
    ("lm_head + logits", ("MixtralForCausalLM.forward",)),
    ("generation loop: sampling, logits processors, detokenize", ("generate_step", "stream_generate")),
    ("generation loop (transformers generate)", ("GenerationMixin",)),
]


def parse(path: str | Path) -> list[tuple[str, list[str], int]]:
    """Read a raw py-spy file into (thread name, frames root first, samples)."""
    out = []
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        head, _, rest = stack.partition(": ")
        frames = rest.split(";")
        out.append((frames[0] if frames else head, frames[1:], int(count)))
    return out


def categorize(frames: list[str]) -> str:
    """The first category of ``CATEGORIES`` a frame of the stack matches (``other`` when none)."""
    if frames and frames[-1].startswith("measure ("):
        return "profiler attach wait (before the measured run)"
    for name, needles in CATEGORIES:
        if any(n in f for f in frames for n in needles):
            return name
    return "other"


def _short(frame: str) -> str:
    fn, _, where = frame.partition(" (")
    return f"{fn} ({where.rsplit('/', 1)[-1]}" if where else fn


def summarize(path: str | Path, rate: float = 100.0) -> dict:
    """Main-thread time by category and the other threads' innermost frames, in seconds."""
    samples = parse(path)
    main: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    others: dict[str, Counter[str]] = {}
    for thread, frames, n in samples:
        if thread == "MainThread":
            main[categorize(frames)] += n
            if frames:
                leaf[_short(frames[-1])] += n
        else:
            c = others.setdefault(thread, Counter())
            key = _short(frames[-1]) if frames else "?"
            if any("_worker (concurrent" in f for f in frames[-2:]) or "wait (threading" in key:
                key = "idle: waiting for work"
            c[key] += n
    return {
        "main_seconds": sum(main.values()) / rate,
        "main": [(k, v / rate) for k, v in main.most_common()],
        "main_leaf": [(k, v / rate) for k, v in leaf.most_common(12)],
        "threads": {t: [(k, v / rate) for k, v in c.most_common(8)] for t, c in others.items()},
    }


def render(summary: dict, tokens: int) -> list[str]:
    """Markdown lines: main-thread categories in s, % and ms per token; other threads' top frames."""
    lines = ["| main thread | s | % | ms/token |", "|---|---|---|---|"]
    total = summary["main_seconds"] or 1.0
    for name, s in summary["main"]:
        lines.append(f"| {name} | {s:.2f} | {100 * s / total:.1f} | {1e3 * s / max(tokens, 1):.0f} |")
    lines.append("")
    lines.append(
        "Innermost main-thread frames: " + "; ".join(f"`{k}` {v:.2f} s" for k, v in summary["main_leaf"])
    )
    for t, top in summary["threads"].items():
        lines.append(f"\nThread `{t}`: " + "; ".join(f"`{k}` {v:.2f} s" for k, v in top))
    return lines
