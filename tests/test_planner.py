"""The planner: placement, refusal with what is lacking, and generate using it by default."""

from __future__ import annotations

import dataclasses

import pytest

from moe_local.errors import MoeLocalError
from moe_local.inspection import inspect_model
from moe_local.memory import Overhead, held_memory
from moe_local.planner import kv_cache_bytes, make_plan
from moe_local.tiny import tiny_config
from tests.helpers import assert_one_line_error, run_cli

MiB = 2**20
FIXED = Overhead(baseline=200 * MiB, activations=3 * MiB, slack=1 * MiB)  # a runtime that does not move


def above_this_process(mib: int) -> str:
    """A --cpu-memory of what this process holds now plus ``mib`` MiB (the planner counts that)."""
    return f"{(held_memory() >> 20) + mib}MiB"


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
    kv = kv_cache_bytes(info.config, 256, 4)  # float32 compute: 4-byte keys and values
    in_flight = (2 * info.top_k + 1) * one  # a miss and a prefill's prefetch of the next layer
    budget = info.dense_bytes + kv + FIXED.total + in_flight + 10 * one
    p = make_plan(info, cpu_memory=budget, context=256, disk_bw=1e9, ram_bw=20e9, overhead=FIXED)
    assert p.total_experts == 32 and p.fast_slots == 10 and p.disk_experts == 22
    assert p.expert_memory == 10 * one and p.overhead == FIXED.total and p.reads_in_flight == in_flight
    lo, hi = p.tokens_per_s
    assert 0 < lo <= hi
    everything = make_plan(info, cpu_memory=8 * 2**30, context=256, overhead=FIXED)
    assert everything.expert_memory is None and everything.disk_experts == 0
    assert everything.reads_in_flight == 0  # nothing streams
    gpu = make_plan(info, gpu="rtx4090", cpu_memory=8 * 2**30, context=256)
    assert gpu.fast_slots == 32


def test_cpu_memory_is_a_ceiling_for_the_whole_process(wide):
    info = inspect_model(wide)
    for extra in (110, 130, 150):  # the slack, activations and reads in flight take about 90 MiB
        cap = held_memory() + extra * MiB
        p = make_plan(info, cpu_memory=cap, context=256)  # the runtime measured now
        assert 0 < p.fast_slots < p.total_experts
        assert p.runtime.baseline >= 100 * MiB and p.runtime.activations > 0 and p.runtime.slack > 0
        charged = p.dense_bytes + p.kv_bytes + p.overhead + p.reads_in_flight + p.expert_memory
        assert charged <= cap, p
        assert cap - charged < p.expert_bytes  # and the budget takes what is left


def test_plan_measures_the_runtime_instead_of_assuming_it(wide):
    info = inspect_model(wide)
    before = held_memory()
    p = make_plan(info, cpu_memory=8 * 2**30, context=256)
    assert before - 64 * MiB <= p.runtime.baseline <= held_memory() + 64 * MiB
    assert p.overhead == p.runtime.total
    longer = make_plan(info, cpu_memory=8 * 2**30, context=4096, overhead=FIXED)
    assert longer.kv_bytes == 16 * p.kv_bytes


def test_a_bf16_checkpoint_computes_in_bf16_when_float32_does_not_fit(wide):
    # the same shapes stored in bfloat16: half the bytes on disk, twice them in float32
    info = inspect_model(wide)
    bf16 = dataclasses.replace(
        info,
        dtypes=("bfloat16",),
        dense_bytes=info.dense_bytes // 2,
        one_expert_bytes=info.one_expert_bytes // 2,
    )
    roomy = make_plan(bf16, cpu_memory=8 * 2**30, context=256, overhead=FIXED)
    assert roomy.dtype == "float32" and roomy.expert_bytes == info.one_expert_bytes
    assert roomy.dense_bytes == info.dense_bytes and roomy.expert_memory is None
    tight = FIXED.total + info.dense_bytes + 20 * info.one_expert_bytes  # fp32 would hold about 16 of 32
    p = make_plan(bf16, cpu_memory=tight, context=256, overhead=FIXED)
    assert p.dtype == "bfloat16" and p.expert_bytes == info.one_expert_bytes // 2
    assert p.kv_bytes == kv_cache_bytes(info.config, 256, 2)
    asked = make_plan(bf16, cpu_memory=tight, context=256, overhead=FIXED, dtype="float32")
    assert asked.dtype == "float32" and asked.fast_slots < p.fast_slots  # an explicit dtype is kept


def test_plan_refuses_with_what_is_lacking(wide):
    info = inspect_model(wide)
    with pytest.raises(MoeLocalError, match=r"needs .* more on cpu: .* runtime"):
        make_plan(info, cpu_memory=FIXED.total, context=256, overhead=FIXED)
    with pytest.raises(MoeLocalError, match=r"needs .* more on cpu"):
        make_plan(info, cpu_memory=held_memory(), context=256)  # what this process holds already
    with pytest.raises(MoeLocalError, match="unknown --gpu"):
        make_plan(info, gpu="tpu")


def test_plan_cli(capsys, wide):
    code, out, _ = run_cli(
        capsys, "plan", str(wide), "--cpu-memory", above_this_process(140), "--context", "256"
    )
    assert code == 0
    assert "disk (read on demand)" in out and "predicted decode" in out
    assert "input embedding table" in out  # the experts stream: the table stays in its file
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
        above_this_process(140),
        "--context",
        "64",
    ]
    code, _, err = run_cli(capsys, *args)
    assert code == 0
    assert " 0 misses" not in err  # the planned budget holds only some experts
    below = above_this_process(-8)
    code, _, err = run_cli(capsys, "generate", str(wide), "hi", "-n", "3", "--cpu-memory", below)
    assert_one_line_error(code, err, "more on cpu")  # this test process alone holds more than that
    code, _, err = run_cli(capsys, "generate", str(wide), "hi", "-n", "3", "--cpu-memory", "64MiB")
    assert_one_line_error(code, err, "less than moe-local's runtime alone holds")


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


def test_a_cap_with_no_room_to_read_ahead_plans_without_prefetch(wide):
    """Some experts fit, the reads ahead do not: prefetch off, only the miss in flight."""
    info = dataclasses.replace(inspect_model(wide), embedding_bytes=0)  # the table's bytes aside
    one = info.one_expert_bytes
    kv = kv_cache_bytes(info.config, 256, 4)
    base = info.dense_bytes + kv + FIXED.total
    ahead = make_plan(
        info, cpu_memory=base + (2 * info.top_k + 1) * one + 4 * one, context=256, overhead=FIXED
    )
    assert ahead.prefetch and ahead.fast_slots == 4
    tight = make_plan(info, cpu_memory=base + one + 4 * one, context=256, overhead=FIXED)
    assert not tight.prefetch and tight.reads_in_flight == one and tight.fast_slots == 4
    charged = (
        tight.dense_bytes + tight.kv_bytes + tight.overhead + tight.reads_in_flight + tight.expert_memory
    )
    assert charged <= base + 5 * one
    # one cached expert and the miss being read: every layer's experts stream through one slot
    least = make_plan(info, cpu_memory=base + 2 * one, context=256, overhead=FIXED)
    assert least.fast_slots == 1 and least.expert_memory == one and not least.prefetch
    with pytest.raises(MoeLocalError, match=r"needs .* more on cpu: .* one expert cached"):
        make_plan(info, cpu_memory=base + 2 * one - 1, context=256, overhead=FIXED)


def test_planned_options_turn_prefetch_off_when_the_plan_has_no_room(wide):
    from moe_local.config import LoadOptions
    from moe_local.planner import planned_options

    info = inspect_model(wide)
    one = info.one_expert_bytes
    cap = info.dense_bytes + kv_cache_bytes(info.config, 256, 4) + held_memory() + 200 * MiB + 5 * one
    options, plan = planned_options(wide, LoadOptions(dtype="float32"), cpu_memory=cap, context=256)
    assert plan is not None and options.prefetch == plan.prefetch
    assert options.expert_memory == plan.expert_memory


def test_an_explicit_expert_budget_that_cannot_fit_is_refused_in_one_line(wide):
    """Under a limit, --expert-memory beside the dense part and the runtime: refused, not OOM-killed."""
    from moe_local.config import LoadOptions
    from moe_local.planner import planned_options

    info = inspect_model(wide)
    one = info.one_expert_bytes
    roomy = make_plan(info, cpu_memory=held_memory() + 2**30, context=256, dtype="float32")
    cap = roomy.dense_bytes + roomy.kv_bytes + roomy.overhead + 9 * one  # 4 slots and reads ahead
    fits = LoadOptions(dtype="float32", expert_memory=one)
    # the plan checked against streams experts: the input table is left on disk, as it counted
    assert planned_options(wide, fits, cpu_memory=cap, context=256) == (
        dataclasses.replace(fits, embedding_on_disk=True),
        None,
    )
    too_big = LoadOptions(dtype="float32", expert_memory=20 * one)
    with pytest.raises(MoeLocalError, match=r"--expert-memory .* does not fit: .* give at most"):
        planned_options(wide, too_big, cpu_memory=cap, context=256)


def test_a_quantized_folder_counts_its_row_layout_copies(tiny_checkpoint, tmp_path):
    """Read weights are copied into the kernel's row layout before the read copy goes: counted."""
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    folder = tmp_path / "q4"
    source = tiny_checkpoint("mixtral", hidden_size=128, intermediate_size=128, num_local_experts=8)
    quantize_checkpoint(source, folder, load_recipe("all-4bit"))
    info = dataclasses.replace(inspect_model(folder), embedding_bytes=0)  # the table's bytes aside
    assert info.quantized and info.moe_layers * info.experts_per_layer == 16
    roomy = make_plan(info, cpu_memory=8 * 2**30, context=256, overhead=FIXED)
    one, dense, kv = roomy.expert_bytes, roomy.dense_bytes, roomy.kv_bytes
    text = info.config.get_text_config()
    lm_head = text.vocab_size * text.hidden_size  # the largest linear, held twice while laid out
    assert roomy.overhead == FIXED.total and roomy.load_transient == lm_head
    base = dense + kv + FIXED.total
    ahead = make_plan(info, cpu_memory=base + (2 * info.top_k + 2 + 3) * one, context=256, overhead=FIXED)
    assert ahead.prefetch and ahead.fast_slots == 3 and ahead.reads_in_flight == (2 * info.top_k + 2) * one
    tight = make_plan(info, cpu_memory=base + (2 + 2) * one, context=256, overhead=FIXED)
    assert not tight.prefetch and tight.reads_in_flight == 2 * one and tight.fast_slots == 2
    # the lm_head's second copy is made while the dense part loads, in the room the experts take
    # later: a cap that holds the experts' least but not that copy is refused, for the load
    import copy

    config = copy.deepcopy(info.config)
    config.get_text_config().vocab_size = 32000  # an lm_head of 4 MiB, more than 5 experts
    wide_vocab = dataclasses.replace(info, config=config)
    with pytest.raises(MoeLocalError, match=r"more on cpu while loading: .* 3.9 MiB held twice"):
        make_plan(wide_vocab, cpu_memory=base + 5 * one, context=256, overhead=FIXED)
    assert make_plan(wide_vocab, cpu_memory=base + 32000 * 128, context=256, overhead=FIXED).fast_slots > 2
