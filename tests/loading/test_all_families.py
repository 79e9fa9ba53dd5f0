"""Every MoE model type of the installed transformers: exact greedy tokens, or refused in one line.

The families come from ``moe_model_types`` (the same list docs/FAMILIES.md is made from); each
gets a tiny random checkpoint (``moe_local.tiny``), and moe-local's greedy 16 tokens must equal
transformers' own, with every expert in memory and with a one-expert budget; the quantized copy
(``experts-4bit``) generates.
"""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import UnsupportedModelError
from moe_local.generation import generate
from moe_local.loading.checkpoint import open_checkpoint
from moe_local.loading.families import UNSUPPORTED, moe_model_types, refusal
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from moe_local.tiny import make_tiny_checkpoint

PROMPT = [5, 6, 7, 8, 9]
TOKENS = 16
# The whole sweep takes a few seconds a family on 2 cores (66 types), too long for CI: CI checks a
# few families sweeps fixed, one of each adapted kind (tests/loading/test_adapted_experts.py has the
# rest); MOE_LOCAL_ALL_FAMILIES=1 runs every MoE type transformers defines.
CI_FAMILIES = ("kimi_linear", "deepseek_v4", "minimax", "doge", "llama4_text", "dbrx")


def _families() -> list[str]:
    everything = moe_model_types()
    if os.environ.get("MOE_LOCAL_ALL_FAMILIES") == "1":
        return everything
    return [t for t in everything if t in CI_FAMILIES]


@pytest.fixture(scope="module", params=_families())
def family(request, tmp_path_factory):
    """(model type, tiny folder, transformers' greedy tokens); skipped where transformers itself fails."""
    model_type = request.param
    if model_type in UNSUPPORTED:
        folder = tmp_path_factory.mktemp(f"all-{model_type}")
        try:
            make_tiny_checkpoint(model_type, folder)
        except Exception as exc:  # the refusal is checked on the config alone below
            pytest.skip(f"no tiny checkpoint: {exc}")
        return model_type, folder, None
    try:
        folder = make_tiny_checkpoint(model_type, tmp_path_factory.mktemp(f"all-{model_type}"))
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        want = ref.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=TOKENS,
            min_new_tokens=TOKENS,
            do_sample=False,
            eos_token_id=None,
        )[0, len(PROMPT) :].tolist()
    except Exception as exc:  # the tiny sizes do not suit this family's own code: nothing to compare
        pytest.skip(f"transformers cannot run the tiny {model_type}: {type(exc).__name__}: {exc}"[:300])
    return model_type, folder, want


def test_exact_or_refused(family):
    model_type, folder, want = family
    if want is None:
        with pytest.raises(UnsupportedModelError) as info:
            load(folder, LoadOptions(dtype="float32"))
        assert str(info.value) == refusal(model_type)
        assert "\n" not in str(info.value)
        return
    lm = load(folder, LoadOptions(dtype="float32"))
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    assert generate(lm, PROMPT, params).tokens == want, model_type
    if not lm.sites:
        pytest.skip(f"{model_type}: experts stay in memory (not on transformers' experts interface)")
    one = max(lm.store.get(s.layer, 0).nbytes for s in lm.sites)
    budgeted = load(folder, LoadOptions(dtype="float32", expert_memory=one))
    assert generate(budgeted, PROMPT, params).tokens == want, f"{model_type} with a one-expert budget"
    assert budgeted.store.stats().total.misses > 0


def test_quantized_copy_generates(family, tmp_path):
    model_type, folder, want = family
    if want is None:
        pytest.skip(f"{model_type} is refused")
    if open_checkpoint(folder, dtype="float32").converted:
        # dense weights transformers merges or splits on load (kimi_linear's conv1d, inkling2's
        # unpadded lm_head) are written as the model holds them: a copy that keeps everything is exact
        keep = tmp_path / "keep.toml"
        keep.write_text('[[rule]]\nmatch = "*"\nscheme = "keep"\n')
        quantize_checkpoint(folder, tmp_path / "kept", load_recipe(str(keep)))
        kept = load(tmp_path / "kept", LoadOptions(dtype="float32"))
        params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
        assert generate(kept, PROMPT, params).tokens == want, model_type
    quantize_checkpoint(folder, tmp_path / "q", load_recipe("experts-4bit"))
    lm = load(tmp_path / "q", LoadOptions(dtype="float32"))
    tokens = generate(lm, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True)).tokens
    assert len(tokens) == 4 and all(0 <= t < lm.model.config.get_text_config().vocab_size for t in tokens)


def test_generate_is_warning_free(tiny_lm, caplog):
    """Our own forward calls use the current cache keyword: no deprecation from a moe_local frame."""
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        generate(tiny_lm, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    ours = [
        w
        for w in seen
        if issubclass(w.category, FutureWarning | DeprecationWarning) and "moe_local" in (w.filename or "")
    ]
    assert not ours, [str(w.message) for w in ours]
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], caplog.text
