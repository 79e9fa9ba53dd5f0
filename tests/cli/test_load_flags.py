"""The load flags: defined once, the same on every loading command, checked before any load."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from moe_local.cli import load_flags
from moe_local.cli.load_flags import LOAD_FLAGS, LoadFlags, check_flags, prepare_load
from moe_local.config import LoadOptions
from moe_local.errors import MoeLocalError
from tests.helpers import assert_one_line_error, run_cli

ALL = frozenset(LOAD_FLAGS)
# What each command takes; a command missing here takes none. Drift (a flag added to one
# command, or defined again by hand) fails here.
EXPECTED = {
    "generate": ALL,
    "chat": ALL,
    "serve": ALL,
    "eval": ALL - {"context"},  # its --context is the scoring window (and the load context)
    "bench": ALL - {"context"},  # the context is --prompt-tokens + --new-tokens
    "plan": frozenset({"cpu_memory", "context", "download"}),  # plans a load without loading
    "inspect": frozenset({"download"}),  # reads the config only
}
# Options that share a load flag's name but not its meaning: eval's scoring window, and plan's
# memory of the card it plans for (the dense part and the KV cache too, not only experts).
OWN = {("eval", "context"), ("plan", "gpu_memory")}


def _commands() -> dict:
    from moe_local.cli import run, tools  # noqa: F401  (they register the commands)
    from moe_local.cli.app import app

    return typer.main.get_command(app).commands


def test_every_loading_command_takes_the_same_load_flags():
    for name, command in _commands().items():
        found = {p.name for p in command.params if p.name in ALL and (name, p.name) not in OWN}
        assert found == EXPECTED.get(name, frozenset()), name


def test_each_flag_has_one_definition():
    defaults = LoadFlags()
    spelled: dict[str, tuple] = {}
    for name, command in _commands().items():
        for param in command.params:
            if param.name not in ALL or (name, param.name) in OWN:
                continue
            where = f"{name} {param.name}"
            assert param.help == load_flags.option_help(param.name), where
            assert param.default == getattr(defaults, param.name), where
            spelling = (tuple(param.opts), tuple(param.secondary_opts))
            assert spelled.setdefault(param.name, spelling) == spelling, where
    assert spelled["prefetch"] == (("--prefetch",), ("--no-prefetch",))
    assert spelled["offload_dir"] == (("--offload-dir",), ())


def test_each_flag_reaches_load_options(tiny_mixtral):
    flags = LoadFlags(
        dtype="bfloat16", expert_memory="64KiB", context=128, policy="lfu", prefetch=False, cpu_memory="1GiB"
    )
    target = prepare_load(flags, str(tiny_mixtral))
    assert target.path == target.source == str(tiny_mixtral)
    budget = 64 << 10
    expected = LoadOptions(dtype="bfloat16", expert_memory=budget, context=128, policy="lfu", prefetch=False)
    assert target.options == expected


def test_the_planner_sets_the_budget_as_before(tiny_checkpoint, monkeypatch):
    import moe_local.planner as planner
    from moe_local.memory import Overhead
    from moe_local.planner import planned_options

    # both plans below measure this process's RSS: pinned, they must agree (and 540 MiB is not
    # below what a long test session already holds)
    monkeypatch.setattr(planner, "runtime_overhead", lambda: Overhead(baseline=400 << 20, activations=0))

    wide = tiny_checkpoint(
        "mixtral", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_local_experts=8
    )
    target = prepare_load(LoadFlags(cpu_memory="540MiB", context=64), str(wide))
    before, plan = planned_options(wide, LoadOptions(context=64), cpu_memory=540 << 20, context=64)
    assert plan is not None and before.expert_memory is not None
    assert target.options == before


def test_a_command_may_set_the_context(tiny_mixtral):
    target = prepare_load(LoadFlags(expert_memory="1MiB", context=4096), str(tiny_mixtral), context=41)
    assert target.options.context == 41


def test_offload_dir_stages_after_the_plan(tiny_mixtral, tmp_path, monkeypatch):
    import moe_local.convert.staging as staging
    import moe_local.planner as planner

    calls = []
    staged = tmp_path / "nvme" / "staged"
    real_plan = planner.planned_options

    def plan(model, options, **kwargs):
        calls.append(("plan", model))
        return real_plan(model, options, **kwargs)

    def prepare(model, offload_dir, *, download=False, progress=None):
        calls.append(("stage", model, offload_dir, download, callable(progress)))
        return staged

    monkeypatch.setattr(planner, "planned_options", plan)
    monkeypatch.setattr(staging, "prepare", prepare)
    target = prepare_load(LoadFlags(offload_dir=str(tmp_path / "nvme")), str(tiny_mixtral))
    assert target.path == staged and target.source == str(tiny_mixtral)
    stage = ("stage", str(tiny_mixtral), str(tmp_path / "nvme"), False, True)
    assert calls == [("plan", str(tiny_mixtral)), stage]


def test_download_fetches_before_the_plan(tiny_mixtral, monkeypatch):
    import moe_local.convert.staging as staging

    calls = []

    def prepare(model, offload_dir, *, download=False, progress=None):
        calls.append((model, offload_dir, download))
        return Path(tiny_mixtral)

    monkeypatch.setattr(staging, "prepare", prepare)
    target = prepare_load(LoadFlags(download=True), "someone/some-moe")
    assert calls == [("someone/some-moe", None, True)]
    assert target.path == Path(tiny_mixtral) and target.source == "someone/some-moe"
    assert target.options.download is True


def test_no_model_is_the_demo(tiny_mixtral, monkeypatch):
    monkeypatch.setattr(load_flags, "model_or_demo", lambda model: model or str(tiny_mixtral))
    target = prepare_load(LoadFlags(expert_memory="1MiB"), None)
    assert target.path == target.source == str(tiny_mixtral)


def test_gpu_memory_is_the_budget_on_a_card(monkeypatch):
    import moe_local.config as config

    monkeypatch.setattr(config, "_check_device", lambda device, budget: None)  # no card needed
    options = check_flags(LoadFlags(device="cuda:1", expert_memory="1GiB", gpu_memory="2GiB"))
    assert options.device == "cuda:1" and options.expert_memory == 2 << 30
    assert check_flags(LoadFlags(device="cuda", expert_memory="1GiB")).expert_memory == 1 << 30


BAD = [
    (["--dtype", "float8"], "unknown --dtype 'float8'"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--device", "cuda:99"], "device 'cuda:99' is not available"),
    (["--expert-memory", "12XB"], "--expert-memory: not a memory size"),
    (["--gpu-memory", "12XB"], "--gpu-memory: not a memory size"),
    (["--gpu-memory", "1GiB"], "--gpu-memory needs --device cuda"),
    (["--cpu-memory", "999999999TiB"], "--cpu-memory 999999999.0 TiB"),
    # below the runtime itself: refused before loading, not left to the OOM killer (as a 228 MiB cap did)
    (["--cpu-memory", "228MiB"], "is less than moe-local's runtime alone holds"),
    (["--policy", "bogus"], "unknown cache policy 'bogus'"),
]
if not __import__("torch").cuda.is_available():
    BAD.append((["--device", "cuda"], "this torch sees 0 CUDA devices"))
COMMANDS = {
    "generate": ["generate", "{m}", "hi"],
    "generate (demo)": ["generate", "hi"],
    "chat": ["chat", "{m}"],
    "chat (demo)": ["chat"],
    "serve": ["serve", "{m}", "--port", "0"],
    "eval": ["eval", "{m}", "--text", "{text}"],
    "bench": ["bench", "{m}"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("flag", "needle"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_a_bad_flag_is_one_line_before_anything_loads(
    capsys, monkeypatch, tiny_mixtral, tmp_path, command, flag, needle
):
    import moe_local.loading.loader as loader
    import moe_local.planner as planner

    def nothing(*args, **kwargs):
        raise AssertionError("a model was prepared before the flags were checked")

    monkeypatch.setattr(load_flags, "model_or_demo", nothing)
    monkeypatch.setattr(planner, "planned_options", nothing)
    monkeypatch.setattr(loader, "load", nothing)
    text = tmp_path / "t.txt"
    text.write_text("a few words to score\n")
    args = [a.format(m=tiny_mixtral, text=text) for a in COMMANDS[command]]
    code, _, err = run_cli(capsys, *args, *flag)
    assert_one_line_error(code, err, needle)


def test_flags_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoadFlags().dtype = "float16"  # type: ignore[misc]
    with pytest.raises(MoeLocalError, match="context must be >= 1"):
        check_flags(LoadFlags(context=0))


@pytest.mark.parametrize("module", ["moe_local.server", "moe_local.chat"])
def test_python_dash_m_mains_are_the_app(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"python -m {module}" in r.stdout
    for spelled in ("--offload-dir", "--device", "--expert-memory", "--no-prefetch", "--download"):
        assert spelled in r.stdout, spelled


@pytest.mark.parametrize("module", ["moe_local.server", "moe_local.chat"])
def test_python_dash_m_mains_refuse_a_bad_flag_in_one_line(module, tmp_path):
    other = ["--port", "0"] if module.endswith("server") else ["--seed", "0"]
    r = subprocess.run(
        [sys.executable, "-m", module, str(tmp_path / "no-such-model"), *other, "--dtype", "float8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "error: unknown --dtype 'float8'; choose auto, float32, bfloat16, float16"
    ]
