"""Time the pieces of moe-local's decode path one by one, to say where a token's time goes.

Run as ``python benchmarks/offload/components.py SRC INT4 THREADS``; prints one ``RESULT <json>`` line.
Every figure is the median of several repetitions in milliseconds:

- one expert's compute for one token (gate_up, SiLU*up, down) in fp32, bf16 and int4 (CPU kernel);
- ``out.index_add_(0, tok, y)`` for one token (what ``OffloadedExperts.forward`` does per expert)
  against ``out.add_(y)``;
- reading one expert of the bf16 checkpoint the way ``HfExperts.read`` does, cold (the file
  dropped from the page cache first) and warm (cached: the CPU part alone), whole and split into its
  ``pread``s, ``posix_fadvise(DONTNEED)``, ``torch.cat`` of gate and up, and the cast to fp32;
- reading one int4 expert blob (``BlobExperts.read``) and building its int4-kernel layout;
- freeing one expert's buffers (after ``CachedStore`` set glibc's mmap threshold to 1 MiB).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload.sysio import data_files, evict


def timed(fn, reps: int, setup=None) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (``setup()`` before each, untimed)."""
    out = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def _experts_reader(src: Path, dtype: torch.dtype):
    from moe_local.loading.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src, dtype=dtype, drop_cache=True)
    return ckpt.files, ckpt.experts, ckpt.sites


def main() -> None:
    """Entry point: ``components.py SRC INT4 THREADS``."""
    src, int4, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    from moe_local.experts.cache import _return_freed_experts_to_os
    from moe_local.experts.weights import apply_linear

    _return_freed_experts_to_os()  # what CachedStore does: expert-sized buffers come from mmap
    reps = 15
    res: dict[str, float] = {"threads": threads}
    files, experts16, sites = _experts_reader(src, torch.bfloat16)
    _, experts32, _ = _experts_reader(src, torch.float32)
    shards = data_files(*src.glob("*.safetensors"))
    n_exp = sites[0].num_experts
    counter = [0]

    def next_key() -> tuple[int, int]:  # a different expert each time, so nothing is cached by us
        counter[0] += 1
        k = counter[0] % (len(sites) * n_exp)
        return sites[k // n_exp].layer, k % n_exp

    # one expert's compute for one token
    w16 = experts16.read(0, 0)
    i = w16.down.shape[1]
    x32 = torch.randn(1, w16.down.shape[0])

    def expert(w, x):
        h = apply_linear(x, w.gate_up)
        return apply_linear(F.silu(h[:, :i]) * h[:, i:], w.down)

    w32 = experts32.read(0, 0)
    for name, w, x in (("fp32", w32, x32), ("bf16", w16, x32.bfloat16())):
        expert(w, x)
        res[f"expert_compute_{name}_ms"] = timed(lambda w=w, x=x: expert(w, x), 3 * reps)
    # index_add_ vs add_ for one token
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out, y, tok = (
            torch.zeros(1, x32.shape[1], dtype=dt),
            torch.randn(1, x32.shape[1]).to(dt),
            torch.tensor([0]),
        )
        res[f"index_add_{name}_ms"] = timed(lambda out=out, y=y, tok=tok: out.index_add_(0, tok, y), 100)
        res[f"add_{name}_ms"] = timed(lambda out=out, y=y: out.add_(y), 100)
    # reading one bf16-checkpoint expert, cold and warm, whole and in parts
    res["read_bf16_cold_ms"] = timed(lambda: experts16.read(*next_key()), reps, lambda: evict(shards))
    res["read_fp32_cold_ms"] = timed(lambda: experts32.read(*next_key()), reps, lambda: evict(shards))
    keys = experts16.keys[sites[0].layer].per_expert[0]  # canonical part -> checkpoint key

    def warm_read(key: str) -> None:
        files.read(key)  # leaves the pages cached: the next timed read is a page-cache read

    res["pread_3_tensors_cold_ms"] = timed(
        lambda: [files.read(k) for k in keys.values()], reps, lambda: evict(shards)
    )
    res["pread_3_tensors_warm_ms"] = timed(
        lambda: [files.read(k) for k in keys.values()], reps, lambda: [warm_read(k) for k in keys.values()]
    )
    res["pread_3_tensors_warm_plus_fadvise_ms"] = timed(
        lambda: [files.read(k, drop_cache=True) for k in keys.values()],
        reps,
        lambda: [warm_read(k) for k in keys.values()],
    )
    gate, up = files.read(keys["gate"]), files.read(keys["up"])
    res["cat_gate_up_bf16_ms"] = timed(lambda: torch.cat([gate, up]), reps)
    gu = torch.cat([gate, up])
    res["cast_gate_up_to_fp32_ms"] = timed(lambda: gu.to(torch.float32), reps)
    res["read_bf16_warm_ms"] = timed(
        lambda: experts16.read(0, 0), reps, lambda: [warm_read(k) for k in keys.values()]
    )
    res["read_fp32_warm_ms"] = timed(
        lambda: experts32.read(0, 0), reps, lambda: [warm_read(k) for k in keys.values()]
    )
    # freeing an expert (munmap of its buffers)
    pool = [experts16.read(*next_key()) for _ in range(reps)]
    res["free_bf16_expert_ms"] = timed(lambda: pool.pop(), reps)
    # int4: blob read and kernel layout
    if (int4 / "moe_local.json").exists():
        from moe_local.loading.checkpoint import open_checkpoint

        blobs = open_checkpoint(int4, dtype=torch.bfloat16, drop_cache=True).experts
        blob_files = data_files(int4 / "experts")
        res["read_int4_blob_cold_ms"] = timed(
            lambda: blobs.read(*next_key()), reps, lambda: evict(blob_files)
        )
        q = blobs.read(0, 0)

        def convert() -> None:
            for part in (q.gate_up, q.down):
                part.clear_kernel_cache()
                part._kernel_tensors(torch.bfloat16)

        res["int4_kernel_layout_ms"] = timed(convert, reps)
        xb = x32.bfloat16()
        expert(q, xb)
        res["expert_compute_int4_ms"] = timed(lambda: expert(q, xb), 3 * reps)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
