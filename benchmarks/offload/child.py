"""One measurement in a fresh process: load a model, warm up, then time a greedy decode step by step.

Run as ``python benchmarks/offload/child.py SPEC_JSON``; prints one line ``RESULT <json>``.

Engines:
    ``hf``: transformers ``AutoModelForCausalLM.from_pretrained`` (with ``device_map="auto"``,
        ``max_memory={"cpu": budget}`` and ``offload_folder`` when a budget is given: accelerate's
        disk offload), decoded with ``model.generate``.
    ``ml``: ``moe_local.load`` with ``LoadOptions(expert_memory, prefetch, policy, dtype)``, decoded
        with ``moe_local.stream_generate``.

Before every forward pass (prefill and each decode step) a pre-hook on the top-level model drops
the files under ``spec["evict"]`` from the page cache, so a "disk" read is a read from the disk for
both engines; the hook's own time is measured and left out of the decode time. Decode time runs
from the start of the first decode forward to the end of the last one, so it covers sampling and
each framework's per-step overhead too. ``/proc/self/io`` ``read_bytes`` over the same window gives
the bytes fetched from the disk per token (every thread of the process counts, prefetch included).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload.sysio import (
    Contention,
    cached_bytes,
    data_files,
    evict,
    fsync_files,
    read_bytes,
    reset_peak_rss,
    rss_kib,
)


class StepClock:
    """Forward hooks on the top-level model: evict before each pass and time every pass.

    Attributes:
        begins: time each forward started (after the eviction).
        ends: time each forward ended.
        evict_s: seconds each eviction took.
        on_decode_start: called once at the start of the first decode forward (the second pass).
    """

    def __init__(self, model, evict_paths: list[Path], on_step=None) -> None:
        self.evict_paths = evict_paths
        self.on_step = on_step
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.evict_s: list[float] = []
        self.on_decode_start = None
        self.cache_after_evict: int | None = None
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def reset(self) -> None:
        """Forget the recorded passes (between warm-up and the measured run)."""
        self.begins.clear()
        self.ends.clear()
        self.evict_s.clear()

    def _pre(self, module, args, kwargs):
        t0 = time.perf_counter()
        evict(self.evict_paths)
        t1 = time.perf_counter()
        self.evict_s.append(t1 - t0)
        if self.on_step is not None:
            self.on_step(len(self.begins))
        if len(self.begins) == 1:
            self.cache_after_evict = cached_bytes(self.evict_paths)  # proves the eviction works
            if self.on_decode_start is not None:
                self.on_decode_start()
        self.begins.append(time.perf_counter())

    def _post(self, module, args, kwargs, output):
        self.ends.append(time.perf_counter())

    def decode_seconds(self) -> tuple[float, int]:
        """(seconds, decode passes): first decode pass start to last pass end, evictions left out."""
        n = len(self.begins) - 1
        if n < 1:
            return 0.0, 0
        return self.ends[-1] - self.begins[1] - sum(self.evict_s[2:]), n


def _load_hf(spec: dict) -> tuple[object, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec["dtype"])
    kw = {}
    if spec.get("budget") is not None:
        kw = dict(
            device_map="auto", max_memory={"cpu": int(spec["budget"])}, offload_folder=spec["offload_dir"]
        )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, **kw)
    model.eval()
    info: dict[str, object] = {}
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        info["device_map"] = dmap
        info["disk_modules"] = sorted(k for k, v in dmap.items() if v == "disk")
    if spec.get("offload_dir"):
        files = data_files(spec["offload_dir"])
        fsync_files(files)  # freshly written: dirty pages would survive eviction
        info["offload_files"] = len(files)
        info["offload_bytes"] = sum(f.stat().st_size for f in files)
    return model, info


def _run_hf(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


def _load_ml(spec: dict):
    import moe_local
    from moe_local import LoadOptions

    opts = LoadOptions(
        dtype=spec["dtype"],
        expert_memory=spec.get("expert_memory"),
        prefetch=bool(spec.get("prefetch", True)),
        policy=spec.get("policy", "lru"),
    )
    lm = moe_local.load(spec["model"], opts)
    return lm, {"dense_bytes": lm.dense_bytes}


def _run_ml(lm, prompt_ids: list[int], new_tokens: int, temperature: float = 0.0) -> list[int]:
    import moe_local
    from moe_local import SamplingParams

    tokens = []
    params = SamplingParams(max_tokens=new_tokens, temperature=temperature, seed=0, ignore_eos=True)
    for resp in moe_local.stream_generate(lm, prompt_ids, params):
        if resp.token is not None:
            tokens.append(resp.token)
    return tokens


def _stats_dict(stats) -> dict:
    t = stats.total
    return {
        "hits": t.hits,
        "misses": t.misses,
        "evictions": t.evictions,
        "bytes_from_disk": t.bytes_from_disk,
        "io_wait_s": t.io_wait_s,
        "prefetched": t.prefetched,
        "prefetch_used": t.prefetch_used,
        "guessed": t.guessed,
        "guessed_right": t.guessed_right,
    }


def measure(spec: dict) -> dict:
    """Run the measurement ``spec`` describes; return its numbers (see the module docstring)."""
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    evict_paths = data_files(*spec["evict"])
    evict(evict_paths)
    t0 = time.perf_counter()
    rb_load = read_bytes()
    if spec["engine"] == "hf":
        model, info = _load_hf(spec)
        run, target = _run_hf, model
    else:
        lm, info = _load_ml(spec)
        temperature = float(spec.get("temperature", 0.0))
        model, target = lm.model, lm

        def run(lm, prompt, n):
            return _run_ml(lm, prompt, n, temperature)

    result: dict[str, object] = {
        "load_s": time.perf_counter() - t0,
        "load_read_bytes": read_bytes() - rb_load,
    }
    result.update(info)
    evict_paths = data_files(*spec["evict"])  # the offload folder exists now
    evict(evict_paths)
    recorder = None
    trace_file = None
    if spec.get("trace"):
        from moe_local.experts.trace import TraceRecorder

        trace_file = open(spec["trace"], "w")  # noqa: SIM115 - closed below
        recorder = TraceRecorder(model, trace_file)
    step_no = [0]

    def on_step(_):
        if recorder is not None:
            recorder.flush(step_no[0])
            step_no[0] += 1

    clock = StepClock(model, evict_paths, on_step)
    t0 = time.perf_counter()
    if spec.get("warmup_tokens", 0) > 0:
        run(target, spec["prompt_ids"], int(spec["warmup_tokens"]))
    result["warmup_s"] = time.perf_counter() - t0
    clock.reset()
    reset_peak_rss()
    marks: dict[str, object] = {}

    def decode_start():
        marks["rb"] = read_bytes()
        if spec["engine"] == "ml":
            marks["stats"] = lm.store.stats()

    clock.on_decode_start = decode_start
    busy = Contention()
    spy = None
    if spec.get("pyspy"):  # sample only the measured generation: attach now, stop with SIGINT after
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(os.getpid()), "--format", "raw", "--output", spec["pyspy"],
             "--rate", "100", "--idle", "--threads"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(2.0)  # let it attach
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    tokens = run(target, spec["prompt_ids"], int(spec["new_tokens"]))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    rb_end = read_bytes()
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    result["others_cores"] = busy.others()
    if recorder is not None:
        recorder.flush(step_no[0])
        recorder.close()
        trace_file.close()
    seconds, n = clock.decode_seconds()
    steps = [1e3 * (e - b) for b, e in zip(clock.begins, clock.ends, strict=True)]  # forward passes, ms
    result.update(
        tokens=tokens,
        decode_passes=n,
        decode_s=seconds,
        decode_tps=n / seconds if seconds > 0 else 0.0,
        ms_per_token=1e3 * seconds / n if n else 0.0,
        prefill_s=clock.ends[0] - clock.begins[0],
        step_ms=[round(x, 1) for x in steps],
        median_step_ms=statistics.median(steps[1:]) if len(steps) > 1 else 0.0,
        evict_ms_per_step=1e3 * sum(clock.evict_s) / max(len(clock.evict_s), 1),
        read_bytes_per_token=(rb_end - marks["rb"]) / n if n else 0.0,
        cache_left_bytes=cached_bytes(evict_paths),
        cache_after_evict_bytes=clock.cache_after_evict,
    )
    rss, hwm = rss_kib()
    result["rss_end_mib"] = rss / 1024
    result["rss_peak_decode_mib"] = hwm / 1024
    if spec["engine"] == "ml":
        store = lm.store
        now = store.stats()
        result["stats_all"] = _stats_dict(now)
        result["stats_decode"] = _stats_dict(now.minus(marks["stats"]))
        result["resident_expert_bytes"] = store.resident_bytes
        count = sum(len(store.resident(s.layer)) for s in lm.sites)
        result["resident_experts"] = count
        result["bytes_per_resident_expert"] = store.resident_bytes / count if count else 0
        result["num_experts"] = sum(s.num_experts for s in lm.sites)
        close = getattr(store, "close", None)
        if close is not None:
            close()
    return result


def main() -> None:
    """Entry point: ``child.py SPEC_JSON`` -> ``RESULT <json>`` on stdout."""
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = measure(spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
