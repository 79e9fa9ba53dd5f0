"""The planner: placement, refusal with what is lacking, and generate using it by default."""

from __future__ import annotations

import pytest

from moe_local.errors import MoeLocalError
from moe_local.inspection import inspect_model
from moe_local.planner import RUNTIME_OVERHEAD, kv_cache_bytes, make_plan
from moe_local.tiny import tiny_config
from tests.helpers import assert_one_line_error, run_cli

MiB = 2**20


@pytest.fixture(scope="module")
def wide(tiny_checkpoint):
    # 4 layers x 8 experts of 3 x 256 x 1024 fp32 = 3 MiB each
    return tiny_checkpoint(
        "mixtral", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_local_experts=8
    )


def test_kv_cache_bytes():
    mix = tiny_config("mixtral")  # 2 layers, 2 kv heads of 8
    assert kv_cache_bytes(mix, 100, 2) == 2 * 2 * 100 * 2 * 8 * 2
    ds = tiny_config("deepseek_v3")  # MLA: 4 heads x (4 + 4) keys, 4 x 8 values, 3 layers
    assert kv_cache_bytes(ds, 10, 4) == 3 * 10 * (4 * 8 + 4 * 8) * 4


def test_plan_places_and_predicts(wide):
    info = inspect_model(wide)
    one = info.one_expert_bytes
    assert one == 3 * 256 * 1024 * 4
    budget = info.dense_bytes + RUNTIME_OVERHEAD + 2 * MiB + 10 * one
    p = make_plan(info, cpu_memory=budget, context=256, disk_bw=1e9, ram_bw=20e9)
    assert p.total_experts == 32 and p.fast_slots == 10 and p.disk_experts == 22
    assert p.expert_memory == 10 * one
    lo, hi = p.tokens_per_s
    assert 0 < lo <= hi
    everything = make_plan(info, cpu_memory=8 * 2**30, context=256)
    assert everything.expert_memory is None and everything.disk_experts == 0
    gpu = make_plan(info, gpu="rtx4090", cpu_memory=8 * 2**30, context=256)
    assert gpu.fast_slots == 32


def test_plan_refuses_with_what_is_lacking(wide):
    info = inspect_model(wide)
    with pytest.raises(MoeLocalError, match=r"needs .* more on cpu"):
        make_plan(info, cpu_memory=RUNTIME_OVERHEAD, context=256)
    with pytest.raises(MoeLocalError, match="unknown --gpu"):
        make_plan(info, gpu="tpu")


def test_plan_cli(capsys, wide):
    code, out, _ = run_cli(capsys, "plan", str(wide), "--cpu-memory", "560MiB", "--context", "256")
    assert code == 0
    assert "disk (read on demand)" in out and "predicted decode" in out
    code, _, err = run_cli(capsys, "plan", str(wide), "--cpu-memory", "100MiB")
    assert_one_line_error(code, err, "more on cpu")


def test_generate_uses_the_plan(capsys, wide):
    args = [
        "generate",
        str(wide),
        "hi",
        "-n",
        "3",
        "--no-chat",
        "--stats",
        "--cpu-memory",
        "540MiB",
        "--context",
        "64",
    ]
    code, _, err = run_cli(capsys, *args)
    assert code == 0
    assert " 0 misses" not in err  # the planned budget holds only some experts
    code, _, err = run_cli(capsys, "generate", str(wide), "hi", "-n", "3", "--cpu-memory", "64MiB")
    assert_one_line_error(code, err, "more on cpu")


def test_plan_refuses_budgets_no_plan_can_use(capsys, tiny_mixtral):
    info = inspect_model(tiny_mixtral)
    with pytest.raises(MoeLocalError, match="--context must be >= 1"):
        make_plan(info, cpu_memory=8 * 2**30, context=0)
    with pytest.raises(MoeLocalError, match=r"--gpu-memory 999.0 GiB is more than rtx4090 has \(24.0 GiB\)"):
        make_plan(info, gpu="rtx4090", gpu_memory=999 * 2**30, context=256)
    with pytest.raises(MoeLocalError, match="--cpu-memory must be a size in bytes >= 0"):
        make_plan(info, cpu_memory=-1, context=256)
    code, _, err = run_cli(capsys, "plan", str(tiny_mixtral), "--context", "0")
    assert_one_line_error(code, err, "--context must be >= 1", "not 0")
    code, _, err = run_cli(capsys, "plan", str(tiny_mixtral), "--gpu-memory", "9GiB")
    assert_one_line_error(code, err, "--gpu-memory needs --gpu")


@pytest.mark.parametrize("command", [["plan"], ["generate", "hi"]])
def test_cpu_memory_beyond_this_machine_refused(capsys, tiny_mixtral, command):
    code, _, err = run_cli(
        capsys, command[0], str(tiny_mixtral), *command[1:], "--cpu-memory", "999999999TiB"
    )
    assert_one_line_error(code, err, "--cpu-memory 999999999.0 TiB", "of RAM")
