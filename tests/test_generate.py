"""stream_generate / generate: stop strings, EOS, max tokens, chat template, logprobs, stats."""

from __future__ import annotations

import dataclasses

import pytest

from moe_local.config import SamplingParams
from moe_local.errors import MoeLocalError, PromptTooLongError
from moe_local.generation import encode_prompt, generate, stream_generate

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def test_stream_concatenates_to_generate(tiny_lm):
    streamed = list(stream_generate(tiny_lm, "Once upon", GREEDY, chat=False))
    whole = generate(tiny_lm, "Once upon", GREEDY, chat=False)
    assert "".join(r.text for r in streamed) == whole.text
    assert [r.token for r in streamed if r.token is not None] == whole.tokens
    assert streamed[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in streamed[:-1])
    assert len(whole.tokens) == 24


def test_stats_are_filled(tiny_lm):
    res = generate(tiny_lm, "Once upon", GREEDY, chat=False)
    s = res.stats
    assert s.prompt_tokens == len(tiny_lm.tokenizer.encode("Once upon"))
    assert s.generation_tokens == 24
    assert s.prompt_tps > 0 and s.generation_tps > 0 and s.ttft_s > 0
    # 2 layers x up to 2 experts per token for 24 decode steps + prefill
    assert s.experts.total.hits >= 24 * 2
    assert s.experts.hit_rate == 1.0


def test_max_tokens_zero_and_small(tiny_lm):
    assert generate(tiny_lm, "abc", SamplingParams(max_tokens=0), chat=False).tokens == []
    assert (
        len(generate(tiny_lm, "abc", SamplingParams(max_tokens=3, ignore_eos=True), chat=False).tokens) == 3
    )


def test_stop_string_truncates(tiny_lm):
    full = generate(tiny_lm, "Once upon", GREEDY, chat=False).text
    # pick a stop string from the middle of the greedy output
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    res = generate(tiny_lm, "Once upon", dataclasses.replace(GREEDY, stop=(stop,)), chat=False)
    assert res.finish_reason == "stop"
    assert res.text == full[: full.find(stop)]
    assert stop not in res.text


def test_eos_stops(tiny_lm, monkeypatch):
    tokens = generate(tiny_lm, "Once upon", GREEDY, chat=False).tokens
    eos = tokens[4]
    first = tokens.index(eos)
    monkeypatch.setattr(tiny_lm, "eos_token_ids", frozenset({eos}))
    res = generate(tiny_lm, "Once upon", SamplingParams(max_tokens=24), chat=False)
    assert res.finish_reason == "stop"
    assert res.tokens == tokens[:first]
    ignored = generate(tiny_lm, "Once upon", GREEDY, chat=False)
    assert ignored.tokens == tokens


def test_chat_template_applied(tiny_lm):
    ids = encode_prompt(tiny_lm, "hi", chat=True)
    text = tiny_lm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tiny_lm.tokenizer.decode(encode_prompt(tiny_lm, msgs)).startswith("<|im_start|>system\nbe brief")
    assert encode_prompt(tiny_lm, "hi", chat=False) == tiny_lm.tokenizer.encode("hi")


def test_seeded_sampling_is_reproducible(tiny_lm):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    a = generate(tiny_lm, "x", p, chat=False).tokens
    b = generate(tiny_lm, "x", p, chat=False).tokens
    c = generate(tiny_lm, "x", dataclasses.replace(p, seed=8), chat=False).tokens
    assert a == b
    assert a != c


def test_logprobs(tiny_lm):
    resp = next(iter(stream_generate(tiny_lm, "x", dataclasses.replace(GREEDY, logprobs=3), chat=False)))
    assert len(resp.top_logprobs) == 3
    assert resp.top_logprobs[0][0] == resp.token  # greedy picks the top one
    assert resp.logprob == pytest.approx(resp.top_logprobs[0][1])
    assert resp.logprob <= 0


def test_prompt_too_long(tiny_lm):
    with pytest.raises(PromptTooLongError, match="context holds 256"):
        generate(tiny_lm, list(range(10)) * 30, GREEDY)


def test_output_clamped_to_context(tiny_lm):
    res = generate(tiny_lm, list(range(250)), GREEDY)
    assert len(res.tokens) == 6 and res.finish_reason == "length"


def test_bad_params():
    with pytest.raises(MoeLocalError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(MoeLocalError, match="temperature"):
        SamplingParams(temperature=-1)
