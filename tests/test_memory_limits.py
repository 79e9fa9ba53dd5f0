"""The real memory limit (cgroup v1/v2, RLIMIT_AS, RAM), read from fake /proc and /sys files,
and a run under ``--cpu-memory`` whose resident memory stays under it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import namedtuple

import psutil
import pytest

from moe_local import memory
from moe_local.config import check_host_budget, machine_memory
from moe_local.errors import MoeLocalError
from moe_local.tiny import tiny_config

MiB = 2**20
V1_UNLIMITED = "9223372036854771712"


def fake_proc(monkeypatch, tmp_path, cgroup: str, mountinfo: str, status: str = "VmSize:\t1024 kB\n"):
    """Point moe_local.memory at fake /proc/self files."""
    proc = tmp_path / "proc"
    proc.mkdir()
    for name, text in (("cgroup", cgroup), ("mountinfo", mountinfo), ("status", status)):
        (proc / name).write_text(text)
    monkeypatch.setattr(memory, "PROC_CGROUP", proc / "cgroup")
    monkeypatch.setattr(memory, "PROC_MOUNTINFO", proc / "mountinfo")
    monkeypatch.setattr(memory, "PROC_STATUS", proc / "status")


def v1_files(folder, limit: str, usage: int, inactive: int, memsw: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.limit_in_bytes").write_text(limit + "\n")
    (folder / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"cache 1\nrss 2\ntotal_inactive_file {inactive}\n")
    if memsw is not None:
        (folder / "memory.memsw.limit_in_bytes").write_text(memsw + "\n")


@pytest.fixture
def host(monkeypatch):
    """A host of 16 GiB RAM (10 GiB available) and 4 GiB swap, whatever this machine has."""
    vm = namedtuple("vm", "total available")(16 * 2**30, 10 * 2**30)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm)
    monkeypatch.setattr(psutil, "swap_memory", lambda: namedtuple("sw", "total")(4 * 2**30))
    monkeypatch.setattr(memory, "_address_space_limit", lambda: None)


def test_cgroup_v1_the_smallest_limit_on_the_path(host, monkeypatch, tmp_path):
    root = tmp_path / "sys" / "memory"
    v1_files(root, V1_UNLIMITED, 5 * 2**30, 0)
    v1_files(root / "a", str(2 * 2**30), 900 * MiB, 0)
    v1_files(root / "a" / "b", str(700 * MiB), 100 * MiB, 30 * MiB, memsw=str(900 * MiB))
    fake_proc(
        monkeypatch,
        tmp_path,
        "12:pids:/a/b\n4:memory:/a/b\n1:name=systemd:/\n0::/\n",
        f"30 25 0:27 / {root} rw,nosuid,nodev - cgroup cgroup rw,memory\n",
    )
    found = memory.cgroup_limits()
    assert [cg.limit for cg in found] == [700 * MiB, 2 * 2**30]  # deepest first; the root sets none
    assert memory.memory_limit() == 700 * MiB and memory.limiting_factor() == "cgroup memory limit"
    # the inactive page cache is free to take: 700 - (100 - 30) MiB
    assert memory.available_memory() == 630 * MiB
    assert memory.swap_limit() == 200 * MiB  # memsw 900 MiB over a 700 MiB limit
    assert machine_memory() == (700 * MiB, 200 * MiB)


def test_cgroup_v2_max_and_high_of_the_process_and_its_parents(host, monkeypatch, tmp_path):
    root = tmp_path / "sys" / "cgroup"
    leaf = root / "user.slice" / "job"
    leaf.mkdir(parents=True)
    (root / "user.slice" / "memory.max").write_text("max\n")
    (root / "user.slice" / "memory.high").write_text(f"{3 * 2**30}\n")
    (root / "user.slice" / "memory.current").write_text(f"{2 * 2**30}\n")
    (leaf / "memory.max").write_text(f"{512 * MiB}\n")
    (leaf / "memory.high").write_text("max\n")
    (leaf / "memory.current").write_text(f"{200 * MiB}\n")
    (leaf / "memory.stat").write_text(f"anon 1\nfile 2\ninactive_file {50 * MiB}\n")
    (leaf / "memory.swap.max").write_text("0\n")
    fake_proc(monkeypatch, tmp_path, "0::/user.slice/job\n", f"40 30 0:30 / {root} rw - cgroup2 cgroup2 rw\n")
    assert [cg.limit for cg in memory.cgroup_limits()] == [512 * MiB, 3 * 2**30]
    assert memory.memory_limit() == 512 * MiB
    assert memory.available_memory() == (512 - 150) * MiB
    assert memory.swap_limit() == 0


def test_a_container_sees_its_own_cgroup_at_the_mount_root(host, monkeypatch, tmp_path):
    # no cgroup namespace: /proc/self/cgroup names the host's path, the mount's root is that cgroup
    root = tmp_path / "sys" / "memory"
    v1_files(root, str(1024 * MiB), 0, 0)
    fake_proc(
        monkeypatch,
        tmp_path,
        "4:memory:/docker/abc123\n",
        f"30 25 0:27 /docker/abc123 {root} ro,nosuid - cgroup cgroup rw,memory\n",
    )
    assert memory.memory_limit() == 1024 * MiB


def test_no_cgroup_files_means_the_host(host, monkeypatch, tmp_path):
    fake_proc(monkeypatch, tmp_path, "garbage\n", "not a mountinfo line\n")
    assert memory.cgroup_limits() == []
    assert memory.limits() == {"RAM": 16 * 2**30}
    assert memory.available_memory() == 10 * 2**30
    monkeypatch.setattr(memory, "PROC_CGROUP", tmp_path / "absent")
    assert memory.memory_limit() == 16 * 2**30 and memory.limiting_factor() == "RAM"


def test_rlimit_as_caps_the_limit_and_what_is_left_of_it(host, monkeypatch, tmp_path):
    fake_proc(monkeypatch, tmp_path, "0::/\n", "", status=f"VmRSS:\t1000 kB\nVmSize:\t{800 * 1024} kB\n")
    monkeypatch.setattr(memory, "_address_space_limit", lambda: 2 * 2**30)
    assert memory.limits()["RLIMIT_AS"] == 2 * 2**30 and memory.limiting_factor() == "RLIMIT_AS"
    assert memory.available_memory() == 2 * 2**30 - 800 * MiB
    assert memory.process_rss() == 1000 * 1024


def test_a_budget_over_the_cgroup_limit_is_refused_in_one_line(host, monkeypatch, tmp_path):
    root = tmp_path / "sys" / "memory"
    v1_files(root, str(700 * MiB), 0, 0)
    fake_proc(monkeypatch, tmp_path, "4:memory:/\n", f"1 0 0:1 / {root} rw - cgroup cgroup rw,memory\n")
    check_host_budget(600 * MiB, "--cpu-memory")
    with pytest.raises(MoeLocalError) as err:
        check_host_budget(6 * 2**30, "--cpu-memory")
    assert str(err.value) == (
        "--cpu-memory 6.0 GiB is more than this process may use: "
        "700.0 MiB of RAM (cgroup memory limit) and 4.0 GiB of swap"
    )


def test_activation_estimates():
    mix = tiny_config("mixtral")  # sdpa: no scores materialized
    small = memory.activation_bytes(mix, 16, 4)
    assert small < memory.activation_bytes(mix, 256, 4) < memory.activation_bytes(mix, 4096, 4)
    assert memory.activation_bytes(mix, 4096, 2) < memory.activation_bytes(mix, 4096, 4)
    eager = tiny_config("mixtral")
    eager._attn_implementation = "eager"
    assert memory.activation_bytes(eager, 4096, 4) - memory.activation_bytes(mix, 4096, 4) == (
        4 * 512 * 4096 * (4 + 4)  # 4 heads x a chunk of 512 x 4096 keys: scores and their softmax
    )
    assert memory.activation_bytes(tiny_config("deepseek_v3"), 64, 2) > 0  # MLA dims


def test_runtime_overhead_is_measured():
    before = memory.held_memory()
    ov = memory.runtime_overhead(tiny_config("mixtral"), context=128, dtype_bytes=4)
    assert before - 64 * MiB <= ov.baseline <= memory.held_memory() + 64 * MiB
    assert ov.baseline <= memory.process_rss()
    assert ov.total == ov.baseline + ov.activations + ov.slack and ov.activations > 0
    assert memory.runtime_overhead(baseline=5).total == 5 + memory.SLACK


def test_held_memory_counts_anonymous_pages_and_a_working_set_of_mapped_files(monkeypatch, tmp_path):
    # under a cap the kernel reclaims mapped library pages not in use: only a working set of them stays
    status = "VmRSS:\t409600 kB\nRssAnon:\t204800 kB\nRssFile:\t194560 kB\nRssShmem:\t10240 kB\n"
    fake_proc(monkeypatch, tmp_path, "", "", status)
    assert memory.process_rss() == 400 * MiB
    assert memory.held_memory() == 200 * MiB + 10 * MiB + memory.FILE_WORKING_SET
    (tmp_path / "proc" / "status").write_text(status.replace("194560", "10240"))
    assert memory.held_memory() == 200 * MiB + 10 * MiB + 10 * MiB  # fewer file pages than the set
    (tmp_path / "proc" / "status").write_text("VmRSS:\t409600 kB\n")  # no split: all of it
    assert memory.held_memory() == 400 * MiB


def test_bf16_compute_counts_the_bf16_gemm_workspace_where_it_runs(monkeypatch):
    from moe_local.quant import native

    config = tiny_config("mixtral")
    monkeypatch.setattr(native, "BF16_GEMM", False)
    plain = memory.runtime_overhead(config, context=128, dtype_bytes=2, baseline=0).activations
    monkeypatch.setattr(native, "BF16_GEMM", True)
    gemm = memory.runtime_overhead(config, context=128, dtype_bytes=2, baseline=0).activations
    assert gemm - plain == memory.BF16_GEMM_WORKSPACE  # what oneDNN keeps after the first prompt
    fp32 = memory.runtime_overhead(config, context=128, dtype_bytes=4, baseline=0).activations
    assert fp32 == memory.activation_bytes(config, 128, 4)  # float32 compute never runs it


CEILING = textwrap.dedent(
    """
    import json, sys, threading, time, torch
    torch.set_num_threads(1)
    from moe_local.cli.load_flags import LoadFlags, prepare_load
    from moe_local.config import SamplingParams
    from moe_local.generation import generate
    from moe_local.inspection import inspect_model
    from moe_local.loading.loader import load
    from moe_local.bandwidth import measure_bandwidths
    from moe_local.memory import FILE_WORKING_SET, _status_bytes, held_memory, peak_rss
    folder, extra = sys.argv[1], int(sys.argv[2])
    # the modeling code imported: the ceiling starts from a settled process; the bandwidths
    # cached: their 256 MiB copy test is not the run's
    measure_bandwidths(inspect_model(folder).path)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here on
    cap = held_memory() + extra
    # file pages past the working set are not held (a cap reclaims them): VmHWM, which counts them,
    # bounds the peak held from above by the peak less those present already
    files = _status_bytes("RssFile")
    uncounted = files - min(files, FILE_WORKING_SET)
    target = prepare_load(LoadFlags(cpu_memory=str(cap), context=128), folder)
    samples, stop = [], threading.Event()
    def poll():
        while not stop.is_set():
            samples.append(held_memory())
            time.sleep(0.01)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    lm = load(target.path, target.options)
    res = generate(lm, "hello there " * 6, SamplingParams(max_tokens=8, ignore_eos=True), chat=False)
    stop.set()
    thread.join()
    print(json.dumps({"cap": cap, "peak": peak_rss() - uncounted, "sampled": max(samples),
                      "dtype": str(lm.model.dtype), "budget": target.options.expert_memory,
                      "misses": lm.store.stats().total.misses, "options_dtype": target.options.dtype}))
    """
)


def _bf16_copy(folder, out):
    """The checkpoint ``folder`` with every float tensor stored in bfloat16."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    for f in out.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def wide_checkpoints(tiny_checkpoint, tmp_path_factory):
    """{stored dtype: folder}: 4 layers x 8 experts x (3 x 256 x 2048): 192 MiB of fp32 experts."""
    folder = tiny_checkpoint(
        "mixtral", hidden_size=256, intermediate_size=2048, num_hidden_layers=4, num_local_experts=8
    )
    return {"float32": folder, "bfloat16": _bf16_copy(folder, tmp_path_factory.mktemp("bf16") / "wide")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_resident_memory_stays_under_cpu_memory(wide_checkpoints, stored):
    folder = wide_checkpoints[stored]
    extra = 150 * MiB  # above what the process holds: fp32 holds ~8 experts of 32, bf16 ~20
    out = subprocess.run(
        [sys.executable, "-c", CEILING, str(folder), str(extra)], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["budget"] is not None and r["misses"] > 0, r  # the experts stream: the cap is below the model
    assert r["budget"] < 4 * 8 * 3 * 256 * 2048 * (4 if stored == "float32" else 2), r
    assert max(r["sampled"], r["peak"]) <= r["cap"], r  # sampled, and bounded by VmHWM between samples
    # a bf16 checkpoint that would not fit whole in float32 computes in bf16 (twice the experts held)
    assert r["dtype"] == ("torch.float32" if stored == "float32" else "torch.bfloat16"), r


def test_a_budget_equal_to_the_cgroup_value_written_is_accepted(monkeypatch):
    """The kernel rounds a cgroup limit down to a page; the value the user wrote still passes."""
    import pytest

    from moe_local import config
    from moe_local.errors import MoeLocalError

    written = 568 * 2**20 + 512  # not a whole number of pages
    monkeypatch.setattr(config, "machine_memory", lambda: (written // 4096 * 4096, 0))
    config.check_host_budget(written, "--cpu-memory")
    with pytest.raises(MoeLocalError, match="more than"):
        config.check_host_budget(written + 2 * 4096, "--cpu-memory")


def test_a_limit_below_the_runtime_is_refused_before_torch_loads(host, monkeypatch, tmp_path, capsys):
    """A cgroup limit under moe-local's runtime floor: one line, not the OOM killer during imports."""
    from moe_local.cli.load_flags import LoadFlags, check_flags

    root = tmp_path / "sys" / "memory"
    v1_files(root, str(221 * MiB), 0, 0)
    fake_proc(monkeypatch, tmp_path, "4:memory:/\n", f"1 0 0:1 / {root} rw - cgroup cgroup rw,memory\n")
    with pytest.raises(MoeLocalError, match=r"may use 221\.0 MiB \(its memory limit\), less than .* runtime"):
        check_flags(LoadFlags(expert_memory="64MiB"))
