"""Samplers and logits processors."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.sampling import make_logits_processors, make_sampler

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def test_greedy():
    assert make_sampler(0.0)(LOGITS) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert all(make_sampler(1.0, top_k=1, seed=s)(LOGITS) == 1 for s in range(20))
    assert all(make_sampler(1.0, top_p=0.01, seed=s)(LOGITS) == 1 for s in range(20))


def test_top_k_limits_support():
    seen = {make_sampler(5.0, top_k=2, seed=s)(LOGITS) for s in range(200)}
    assert seen == {1, 2}


def test_min_p_limits_support():
    # p(2)/p(1) = e^-1 = 0.37 passes min_p 0.3; p(0)/p(1) = e^-2 = 0.14 does not
    seen = {make_sampler(1.0, min_p=0.3, seed=s)(LOGITS) for s in range(200)}
    assert seen == {1, 2}


def test_distribution_follows_temperature():
    sampler = make_sampler(1.0, seed=0)
    counts = torch.bincount(torch.tensor([sampler(LOGITS) for _ in range(3000)]), minlength=5).float()
    expected = torch.softmax(LOGITS, -1) * 3000
    assert torch.allclose(counts, expected, rtol=0.15, atol=25)


def test_repetition_penalty():
    (proc,) = make_logits_processors(repetition_penalty=2.0)
    out = proc([1, 4], LOGITS)
    assert out[1] == 1.5 and out[4] == -2.0 and out[2] == 2.0


def test_presence_and_frequency_penalties():
    (proc,) = make_logits_processors(presence_penalty=0.5, frequency_penalty=0.25)
    out = proc([2, 2, 0], LOGITS)
    assert torch.allclose(out, torch.tensor([1.0 - 0.75, 3.0, 2.0 - 1.0, 0.5, -1.0]))
    assert make_logits_processors() == []


def test_extreme_temperature_is_greedy_and_degenerate_logits_are_safe():
    assert make_sampler(1e-40, seed=0)(LOGITS) == 1
    weird = torch.tensor([float("inf"), 1.0, float("nan")])
    assert make_sampler(1.0, seed=0)(weird) in (0, 1, 2)


def test_guided_params_run_their_processors_after_the_penalties():
    from moe_local.sampling import GuidedParams, sampler_from_params

    seen = []

    def only_token_4(tokens, logits):
        seen.append(list(tokens))
        return torch.where(
            torch.arange(logits.shape[-1]) == 4, logits, torch.full_like(logits, float("-inf"))
        )

    params = GuidedParams(temperature=0.0, repetition_penalty=1.5, processors=(only_token_4,))
    sampler, procs = sampler_from_params(params)
    assert len(procs) == 2 and procs[-1] is only_token_4
    logits = LOGITS
    for proc in procs:
        logits = proc([1, 2], logits)
    assert sampler(logits) == 4
    assert seen == [[1, 2]]


def _grammar_compiler():
    pytest.importorskip("llguidance", reason="llguidance (moe-local[grammar]) is not installed")
    from moe_local.grammar import GrammarCompiler
    from moe_local.tiny import VOCAB, make_tokenizer

    tok = make_tokenizer()
    return tok, GrammarCompiler(tok, VOCAB, [tok.eos_token_id])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_mask_makes_any_logits_valid_json_of_the_schema(temperature):
    jsonschema = pytest.importorskip("jsonschema")
    tok, compiler = _grammar_compiler()
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"enum": [1, 2]},
            "s": {"type": "string", "maxLength": 5},
        },
        "required": ["ok", "n", "s"],
        "additionalProperties": False,
    }
    prompt = [5, 6, 7]
    mask = compiler.processor(compiler.json_schema(schema), prompt_len=len(prompt))
    sampler = make_sampler(temperature, seed=3)
    gen = torch.Generator().manual_seed(0)
    tokens = list(prompt)
    for _ in range(200):
        token = sampler(mask(tokens, torch.randn(320, generator=gen) * 5))
        if token == tok.eos_token_id:
            break
        tokens.append(token)
    assert mask.done()
    jsonschema.validate(json.loads(tok.decode(tokens[len(prompt) :])), schema)


def test_a_mask_forbids_the_rows_past_the_vocabulary_and_eos_until_complete():
    tok, compiler = _grammar_compiler()
    mask = compiler.processor(compiler.json_schema(None), prompt_len=0)
    out = mask([], torch.zeros(400))  # logits wider than the vocabulary (padded embeddings)
    allowed = torch.isfinite(out).nonzero().flatten().tolist()
    assert {tok.decode([t]) for t in allowed} == {"{"}  # compact JSON: an object opens at once
    tokens = tok.encode("{}", add_special_tokens=False)
    out = mask(tokens, torch.zeros(400))
    assert torch.isfinite(out).nonzero().flatten().tolist() == [tok.eos_token_id]
    assert mask.done()


def test_a_schema_the_engine_refuses_is_one_line():
    from moe_local.grammar import GrammarError

    _, compiler = _grammar_compiler()
    with pytest.raises(GrammarError) as err:
        compiler.json_schema({"type": "no-such-type"})
    assert "\n" not in str(err.value)


def test_without_the_engine_a_constraint_says_what_to_install(monkeypatch):
    import sys

    from moe_local.grammar import GrammarCompiler, GrammarUnavailable, available

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now fails
    assert not available()
    with pytest.raises(GrammarUnavailable, match=r"pip install 'moe-local\[grammar\]'"):
        GrammarCompiler(object(), 320, [0])
