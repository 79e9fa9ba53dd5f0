"""A broken or hostile config.json gets one line naming the field and value, within seconds.

Before these checks, a billion experts or layers made inspect and generate run for minutes or
die of MemoryError, a top-k past the experts surfaced as "unexpected RuntimeError", and a bad
value was reported as "family 'mixtral' is not supported".
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from moe_local.inspection import inspect_model
from moe_local.loading.families import EXPERT_WIDTH, TESTED_FAMILIES
from moe_local.loading.meta import parameters_on_meta
from moe_local.loading.validate import implied_weights
from moe_local.tiny import tiny_config
from tests.conftest import ALL_FAMILIES
from tests.helpers import assert_one_line_error, run_cli

FAST_S = 3.0  # the checks read config.json and stat the weight files; nothing is built


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs past ``seconds``."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def with_config(tiny_checkpoint, tmp_path, capsys):
    """``with_config(family, **changes)``: a copy of the tiny checkpoint with config.json edited."""

    def make(family: str = "mixtral", **changes) -> Path:
        folder = tmp_path / f"{family}-edited"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tiny_checkpoint(family), folder)
        capsys.readouterr()  # building the tiny checkpoint prints progress
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    return make


@pytest.fixture(scope="module", autouse=True)
def _warm(tiny_checkpoint):
    """Import what inspect imports once, so the timings below measure the checks only."""
    inspect_model(tiny_checkpoint("mixtral"))


ABSURD = [
    ("mixtral", {"num_local_experts": 10**9}, ["num_local_experts", "1000000000"]),
    ("mixtral", {"num_experts": 10**9}, ["num_experts", "1000000000"]),  # an alias of num_local_experts
    ("mixtral", {"num_hidden_layers": 10**9}, ["num_hidden_layers", "1000000000"]),
    ("mixtral", {"vocab_size": 10**12}, ["vocab_size", "1000000000000"]),
    ("mixtral", {"hidden_size": 10**9}, ["hidden_size", "1000000000"]),
    ("mixtral", {"intermediate_size": 10**9}, ["intermediate_size", "1000000000"]),
    ("deepseek_v3", {"n_routed_experts": 10**9}, ["n_routed_experts", "1000000000"]),
    ("deepseek_v3", {"num_local_experts": 10**9}, ["num_local_experts", "1000000000"]),
    ("qwen2_moe", {"num_experts": 10**9}, ["num_experts", "1000000000"]),
    # within the sanity limits, but more weights than the folder's 300 KB could hold
    ("mixtral", {"num_hidden_layers": 500}, ["500 MoE layers", "hold only", "does not match"]),
    ("mixtral", {"num_local_experts": 10_000, "num_experts_per_tok": 2}, ["num_local_experts 10000"]),
    ("mixtral", {"vocab_size": 10**7}, ["vocab_size 10000000", "hold only"]),
    ("qwen2_moe", {"moe_intermediate_size": 10**6}, ["moe_intermediate_size 1000000", "hold only"]),
]


@pytest.mark.parametrize("command", ["inspect", "generate"])
@pytest.mark.parametrize(("family", "changes", "needles"), ABSURD)
def test_absurd_sizes_answered_fast(capsys, with_config, command, family, changes, needles):
    folder = with_config(family, **changes)
    args = [command, str(folder)] + (["hi", "-n", "2"] if command == "generate" else [])
    t0 = time.perf_counter()
    with deadline(60):
        code, _, err = run_cli(capsys, *args)
    assert time.perf_counter() - t0 < FAST_S, err
    assert_one_line_error(code, err, *needles)


BAD_VALUES = [
    # (family, config changes, what the one line must name)
    (
        "mixtral",
        {"num_experts_per_tok": 8},
        ["num_experts_per_tok = 8", "larger than", "num_local_experts = 4"],
    ),
    ("mixtral", {"num_experts_per_tok": 0}, ["num_experts_per_tok = 0"]),
    ("mixtral", {"num_experts_per_tok": -1}, ["num_experts_per_tok = -1"]),
    ("qwen2_moe", {"num_experts_per_tok": 5}, ["num_experts_per_tok = 5", "num_experts = 4"]),
    ("deepseek_v3", {"num_experts_per_tok": 5}, ["num_experts_per_tok = 5", "n_routed_experts = 4"]),
    ("mixtral", {"num_local_experts": 0}, ["0 experts"]),
    ("mixtral", {"hidden_size": -32}, ["hidden_size = -32"]),
    ("mixtral", {"hidden_size": "abc"}, ["hidden_size = 'abc'"]),
    ("mixtral", {"hidden_size": 32.0}, ["hidden_size = 32.0"]),
    ("mixtral", {"num_hidden_layers": True}, ["num_hidden_layers = True"]),
    ("mixtral", {"num_hidden_layers": 0}, ["num_hidden_layers = 0"]),
    ("mixtral", {"intermediate_size": 0}, ["intermediate_size = 0"]),
    ("mixtral", {"num_attention_heads": 0}, ["num_attention_heads = 0"]),
    ("mixtral", {"num_attention_heads": 5}, ["num_attention_heads = 5", "num_key_value_heads = 2"]),
    ("mixtral", {"num_key_value_heads": 0}, ["num_key_value_heads = 0"]),
    ("mixtral", {"num_key_value_heads": 3}, ["num_key_value_heads = 3"]),
    ("mixtral", {"num_attention_heads": 6, "num_key_value_heads": 2}, ["hidden_size = 32", "head_dim"]),
    ("mixtral", {"head_dim": 7}, ["head_dim"]),
    ("mixtral", {"sliding_window": 0}, ["sliding_window = 0"]),
    ("mixtral", {"pad_token_id": 10**9}, ["pad_token_id = 1000000000", "vocab_size 320"]),
    ("mixtral", {"dtype": "bogus"}, ["dtype = 'bogus'"]),
    ("mixtral", {"hidden_act": "bogus"}, ["hidden_act = 'bogus'"]),
    ("mixtral", {"rms_norm_eps": -1.0}, ["rms_norm_eps = -1.0"]),
    ("mixtral", {"rms_norm_eps": "x"}, ["rms_norm_eps"]),  # transformers' own field check, one line
    ("mixtral", {"tie_word_embeddings": "yes"}, ["tie_word_embeddings"]),
    ("mixtral", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, ["rope_theta = 0"]),
    ("mixtral", {"rope_parameters": {"rope_type": "default", "rope_theta": -5.0}}, ["rope_theta = -5.0"]),
    ("mixtral", {"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}}, ["rope_type = 'bogus'"]),
    ("mixtral", {"rope_parameters": "abc"}, ["rope_parameters = 'abc'"]),
    ("qwen2_moe", {"decoder_sparse_step": 0}, ["decoder_sparse_step = 0"]),
    ("qwen2_moe", {"mlp_only_layers": "abc"}, ["mlp_only_layers"]),
    ("deepseek_v3", {"n_group": 3}, ["n_group = 3", "n_routed_experts = 4"]),
    ("deepseek_v3", {"n_group": 0}, ["n_group = 0"]),
    ("deepseek_v3", {"topk_group": 3}, ["topk_group = 3", "n_group = 2"]),
    ("deepseek_v3", {"kv_lora_rank": 0}, ["kv_lora_rank = 0"]),
    ("gpt_oss", {"sliding_window": -1}, ["sliding_window = -1"]),
    ("mixtral", {"model_type": 7}, ["model_type = 7"]),
]


@pytest.mark.parametrize(("family", "changes", "needles"), BAD_VALUES)
def test_bad_value_named(capsys, with_config, family, changes, needles):
    folder = with_config(family, **changes)
    with deadline(60):
        code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, *needles)
    assert "unexpected" not in err and "is not supported" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["inspect"],
        ["plan"],
        ["chat"],
        ["serve", "--port", "0"],
        ["bench", "--prompt-tokens", "4", "--new-tokens", "2"],
        ["quantize", "OUT"],
        ["generate", "hi", "--offload-dir", "OFFLOAD"],
    ],
)
def test_every_command_checks_the_config(capsys, with_config, tmp_path, command):
    folder = with_config(num_experts_per_tok=8)
    args = [a.replace("OUT", str(tmp_path / "q")).replace("OFFLOAD", str(tmp_path / "off")) for a in command]
    code, _, err = run_cli(capsys, args[0], str(folder), *args[1:])
    assert_one_line_error(code, err, "num_experts_per_tok = 8", "larger than")
    assert not (tmp_path / "q").exists() and not (tmp_path / "off").exists()  # refused before writing


UNREADABLE = {
    "list": (b"[1, 2]", "not a JSON object"),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    "not-utf8": (b"\xff\xfe{}", "not valid JSON"),
    "17MB": (b'{"model_type": "mixtral", "pad": "' + b"x" * (17 << 20) + b'"}', "a model config is a few KB"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_config_json(capsys, with_config, case):
    content, needle = UNREADABLE[case]
    folder = with_config()
    (folder / "config.json").write_bytes(content)
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_implied_weights_is_a_lower_bound(family):
    """The bound never exceeds the model's real parameter count, so no real checkpoint is refused."""
    config = tiny_config(family)
    bound, made_of = implied_weights(
        lambda n: getattr(config, n, None), family in TESTED_FAMILIES, EXPERT_WIDTH.get(family)
    )
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())
    assert 0 < bound <= real, (family, bound, real, made_of)
    assert bound >= real // 4, "the bound should count the experts of a tested family"


def test_expert_width_covers_the_tested_families():
    assert set(EXPERT_WIDTH) == set(TESTED_FAMILIES)


def test_two_bit_folder_passes_the_weight_bound(capsys, tiny_mixtral, tmp_path):
    """A moe-local folder at 2 bits per expert weight holds far fewer bytes; the bound allows it."""
    out = tmp_path / "q2"
    code, _, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(out), "--recipe", "tiny-2bit")
    assert code == 0, err
    code, out_text, err = run_cli(capsys, "inspect", str(out))
    assert code == 0, err
    assert "mixtral" in out_text
