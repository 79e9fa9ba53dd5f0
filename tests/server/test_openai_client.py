"""The server driven by the official ``openai`` client: chat, completions, streaming, stop, usage, errors."""

from __future__ import annotations

import openai
import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


def test_health_answers_ready_once_loaded(server):
    """Before ready the real server only ever said 503 (test_startup holds the 503 deterministically)."""
    assert set(server.health_seen[:-1]) <= {503}
    assert server.health_seen[-1] == 200
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ready", "model": server.model}


def test_models_lists_the_served_model(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_chat_completion_has_text_and_usage(server):
    resp = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=6, temperature=0
    )
    choice = resp.choices[0]
    assert resp.object == "chat.completion"
    assert resp.model == server.model
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 6 or choice.finish_reason == "stop"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_equals_the_whole_response(server):
    client = server.client()
    kwargs = dict(model=server.model, messages=MESSAGES, max_completion_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stream_without_include_usage_has_no_usage_chunk(server):
    stream = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=3, temperature=0, stream=True
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_completion_and_its_stream(server):
    client = server.client()
    kwargs = dict(model=server.model, prompt="Once upon a time", max_tokens=8, temperature=0)
    whole = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert whole.object == "text_completion"
    assert whole.usage.completion_tokens == 8
    assert whole.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_completion_takes_token_ids(server):
    client = server.client()
    with server.http() as http:
        ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(
        model=server.model, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_string_ends_the_text_before_it(server, as_list):
    client = server.client()
    base = dict(model=server.model, prompt="The quick brown fox", max_tokens=16, temperature=0)
    full = client.completions.create(**base, extra_body={"ignore_eos": True}).choices[0].text
    # the first character after the start that occurs nowhere before it (random weights: any character)
    cut = next(k for k in range(1, len(full)) if full[k] != "\ufffd" and full.find(full[k]) == k)
    stop = full[cut]
    resp = client.completions.create(**base, stop=[stop, "never-seen"] if as_list else stop)
    assert resp.choices[0].text == full[:cut]
    assert resp.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**base, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:cut]


def test_seed_makes_sampling_reproducible(server):
    client = server.client()
    kwargs = dict(model=server.model, messages=MESSAGES, max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_penalties_are_accepted(server):
    resp = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=4, presence_penalty=1.5, frequency_penalty=-0.5
    )
    assert resp.usage.completion_tokens <= 4


def test_chat_logprobs(server):
    resp = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top one
        assert isinstance(entry.bytes, list)


def test_completion_logprobs(server):
    resp = server.client().completions.create(
        model=server.model,
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset[0] == 0


def test_errors_reach_the_client_as_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    assert "no-such-model" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=2, n=9)
    assert err.value.body["param"] == "n"
    with server.http() as http:
        n = http.post("/tokenize", json={"prompt": "a" * 300}).json()["count"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=server.model, prompt="a" * 300, max_tokens=2)
    assert err.value.code == "context_length_exceeded"
    assert "256" in err.value.message and str(n) in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=3.0)
