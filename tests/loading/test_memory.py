"""Loading with an expert RAM budget keeps peak RSS near budget + dense part, not the whole checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from moe_local.tiny import make_tiny_checkpoint

SCRIPT = textwrap.dedent(
    """
    import json, sys, psutil, torch
    torch.set_num_threads(1)
    from moe_local.config import LoadOptions, SamplingParams
    from moe_local.generation import generate
    from moe_local.loading.checkpoint import load_config
    from moe_local.loading.loader import load
    from moe_local.loading.meta import build_on_meta
    from moe_local.tiny import make_tokenizer
    import transformers, tokenizers
    folder, budget = sys.argv[1], int(sys.argv[2])
    # warm up the libraries' own one-time allocations before taking the baseline
    build_on_meta(load_config(__import__('pathlib').Path(folder)), torch.float32)
    make_tokenizer()
    base = psutil.Process().memory_info().rss
    lm = load(folder, LoadOptions(dtype="float32", expert_memory=budget))
    res = generate(lm, "hello there", SamplingParams(max_tokens=8, ignore_eos=True), chat=False)
    # VmHWM is this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
    status = open("/proc/self/status").read()
    peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
    print(json.dumps({"base": base, "peak": peak, "dense": lm.dense_bytes,
                      "resident": lm.store.resident_bytes, "misses": lm.store.stats().total.misses}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_under_budget_plus_dense(tmp_path):
    # 4 layers x 8 experts x (3 x 256 x 2048) fp32 = 201 MiB of experts; a 16 MiB budget must hold.
    folder = make_tiny_checkpoint(
        "mixtral",
        tmp_path / "wide",
        hidden_size=256,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_local_experts=8,
    )
    budget = 16 * 2**20
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), str(budget)], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    experts_total = 4 * 8 * 3 * 256 * 2048 * 4
    slack = 64 * 2**20  # activations, KV cache, lazy imports during generation, allocator noise
    assert r["misses"] > 0
    assert r["resident"] <= budget
    assert r["peak"] - r["base"] < budget + r["dense"] + slack, r
    assert r["peak"] - r["base"] < experts_total / 2, r


def test_dense_reads_can_leave_the_page_cache(tiny_mixtral, monkeypatch):
    # a cgroup charges the page cache it fills: a file opened with drop_cache leaves none of what it read
    import os

    from moe_local.format import direct_read
    from moe_local.format.safetensors_io import CheckpointFiles

    dropped = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, off, n, advice: dropped.append((off, n, advice)), raising=False
    )
    # where O_DIRECT is refused (tmpfs): read buffered, then dropped (tests/format/test_direct_read.py
    # holds the direct reads)
    monkeypatch.setattr(direct_read, "_DIRECT_FLAG", 0)
    plain, dropping = CheckpointFiles(tiny_mixtral), CheckpointFiles(tiny_mixtral, drop_cache=True)
    key = next(k for k in plain.names() if "embed_tokens" in k)
    info = plain.info(key)
    row = info.nbytes // info.shape[0]

    def covers(drop, start, nbytes):  # the whole pages holding [start, start + nbytes)
        off, n, advice = drop
        return advice == os.POSIX_FADV_DONTNEED and off <= start and off + n >= start + nbytes

    assert plain.read(key).equal(dropping.read(key))
    assert len(dropped) == 1 and covers(dropped[0], info.offset, info.nbytes)  # only the dropping one
    dropping.read(key, drop_cache=False)  # a read may still ask otherwise
    plain.read_slice(key, 3, drop_cache=True)
    assert len(dropped) == 2 and covers(dropped[1], info.offset + 3 * row, row)
