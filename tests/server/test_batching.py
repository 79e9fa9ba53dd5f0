"""Continuous batching: generations decoded together answer exactly as each one served alone.

Numerics: the tiny models run in float32 on the CPU. A batched step's matmuls may sum in another
order than a batch-1 step's, so logits can differ in the last bits; on these models that never
moves a greedy (or seeded) choice, so tokens are compared exactly and log-probabilities to 1e-4.
The reference for every request is the same engine serving it alone (a batch of one).
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from moe_local.batching import batch_support
from moe_local.config import SamplingParams
from moe_local.errors import MoeLocalError
from moe_local.server.engine import Engine
from moe_local.server.jobs import State

BATCHED = ("mixtral", "qwen2_moe", "qwen3_moe")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 61)), [99], [40, 41, 42, 43, 44]]
LIMITS = [24, 6, 20, 16, 12]  # the second request finishes early; the others overlap it


def _start(model, **kwargs) -> Engine:
    engine = Engine(model, **kwargs)
    engine.start()
    deadline = time.monotonic() + 60
    while engine.state is State.LOADING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.state is State.READY, engine.error
    return engine


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    """One engine per batched family, decoding up to four generations together."""
    made: dict[str, Engine] = {}

    def get(family: str) -> Engine:
        if family not in made:
            made[family] = _start(tiny_checkpoint(family), parallel=4)
        return made[family]

    yield get
    for engine in made.values():
        engine.stop()


async def _collect(job, started: asyncio.Event | None = None, after: int = 0) -> dict:
    """A job's choices as token texts, log-probabilities, text and finish reasons, by index."""
    out: dict[int, dict] = {}
    async for step in job.steps():
        got = out.setdefault(step.index, {"tokens": [], "logprobs": [], "text": "", "finish": None})
        got["text"] += step.text
        if step.token_text is not None:
            got["tokens"].append(step.token_text)
            got["logprobs"].append(step.logprob)
        if step.finish_reason is not None:
            got["finish"] = step.finish_reason
        if started is not None and len(got["tokens"]) >= after:
            started.set()
    return out


def _params(i: int, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": LIMITS[i], "temperature": 0.0, "ignore_eos": True, **kw})


async def _alone(engine: Engine, requests: list[dict]) -> list[dict]:
    return [
        await _collect(engine.submit(r["ids"], r["params"], logprobs=True, **r.get("kw", {})))
        for r in requests
    ]


async def _together(engine: Engine, requests: list[dict], stagger: bool) -> list[dict]:
    """All requests at once; with ``stagger`` each joins after the previous one has two tokens."""
    tasks = []
    for r in requests:
        started = asyncio.Event()
        job = engine.submit(r["ids"], r["params"], logprobs=True, **r.get("kw", {}))
        tasks.append(asyncio.create_task(_collect(job, started, after=2)))
        if stagger:
            await asyncio.wait(
                [asyncio.create_task(started.wait()), tasks[-1]], return_when="FIRST_COMPLETED"
            )
    return list(await asyncio.gather(*tasks))


def _same(together: list[dict], alone: list[dict]) -> None:
    for got, want in zip(together, alone, strict=True):
        assert got.keys() == want.keys()
        for index in want:
            assert got[index]["tokens"] == want[index]["tokens"]
            assert got[index]["text"] == want[index]["text"]
            assert got[index]["finish"] == want[index]["finish"]
            assert got[index]["logprobs"] == pytest.approx(want[index]["logprobs"], abs=1e-4)


def _steps_by_size(engine: Engine) -> dict[int, int]:
    text = engine.metrics.render(engine.gauges())
    return {
        int(k): int(v) for k, v in re.findall(r'moe_local_decode_steps_total\{batch="(\d+)"\} (\d+)', text)
    }


@pytest.mark.parametrize("family", BATCHED)
@pytest.mark.parametrize("streams", [1, 2, 4])
def test_greedy_streams_decoded_together_match_each_alone(engines, family, streams):
    """1, 2 and 4 streams of different prompt lengths joining mid-way, one finishing early."""
    engine = engines(family)
    requests = [{"ids": PROMPTS[i], "params": _params(i)} for i in range(streams)]

    async def main():
        alone = await _alone(engine, requests)
        before = _steps_by_size(engine)
        staggered = await _together(engine, requests, stagger=True)
        at_once = await _together(engine, requests, stagger=False)
        return alone, before, staggered, at_once

    alone, before, staggered, at_once = asyncio.run(main())
    _same(staggered, alone)
    _same(at_once, alone)
    assert alone[0][0]["tokens"] != alone[-1][0]["tokens"] or streams == 1  # nothing got mixed up
    grew = {k: n - before.get(k, 0) for k, n in _steps_by_size(engine).items()}
    assert max((k for k, n in grew.items() if n > 0), default=0) == streams  # they did decode together


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bf16_models_batch_on_the_lean_step_and_answer_as_alone(tiny_checkpoint, family):
    """bf16 compute: the worker's batch is the lean one (own caches, no padding), each answer the same
    to the bit as the request served alone, log-probabilities included."""
    from moe_local.batching import new_batch
    from moe_local.config import LoadOptions
    from moe_local.lean import ops
    from moe_local.lean.batch import LeanBatch

    if not ops.available():
        pytest.skip("no native operations on this machine")
    engine = _start(tiny_checkpoint(family), options=LoadOptions(dtype="bfloat16"), parallel=4)
    try:
        assert isinstance(new_batch(engine.lm), LeanBatch)
        requests = [{"ids": PROMPTS[i], "params": _params(i)} for i in range(4)]

        async def main():
            alone = await _alone(engine, requests)
            before = _steps_by_size(engine)
            staggered = await _together(engine, requests, stagger=True)
            # Staggered joins may miss the early finisher when the worker runs ahead of the event
            # loop; submitted at once, all four are in flight together.
            return alone, before, staggered, await _together(engine, requests, stagger=False)

        alone, before, staggered, at_once = asyncio.run(main())
        for together in (staggered, at_once):
            for got, want in zip(together, alone, strict=True):
                assert got == want  # tokens, text, finish and log-probabilities, exactly
        grew = {k: n - before.get(k, 0) for k, n in _steps_by_size(engine).items()}
        assert max((k for k, n in grew.items() if n > 0), default=0) == 4
    finally:
        engine.stop()


def test_sampling_stops_grammar_and_choices_stay_per_request(engines):
    """Seeded sampling with penalties, a stop string, a JSON grammar and n=2, decoded together."""
    engine = engines("mixtral")
    sampled = dict(temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.3, frequency_penalty=0.2)
    grammar = engine.grammar(schema={"type": "object", "properties": {"a": {"type": "integer"}}}, what="t")

    async def main():
        first = (await _alone(engine, [{"ids": PROMPTS[0], "params": _params(0)}]))[0][0]["text"]
        stop = first[len(first) // 2 : len(first) // 2 + 2]
        requests = [
            {"ids": PROMPTS[0], "params": _params(0, stop=(stop,))},
            {"ids": PROMPTS[2], "params": _params(2, **sampled)},
            {
                "ids": PROMPTS[3],
                "params": _params(3, max_tokens=40, ignore_eos=False),
                "kw": {"grammar": grammar},
            },
            {"ids": PROMPTS[4], "params": _params(4, seed=3, temperature=0.7), "kw": {"n": 2}},
        ]
        return stop, await _alone(engine, requests), await _together(engine, requests, stagger=True)

    stop, alone, together = asyncio.run(main())
    _same(together, alone)
    assert together[0][0]["finish"] == "stop" and stop not in together[0][0]["text"]
    assert together[2][0]["text"].startswith("{")
    assert together[3][0]["tokens"] != together[3][1]["tokens"]  # seeds 3 and 4


def test_a_cancelled_stream_leaves_the_batch_and_the_others_go_on(engines):
    engine = engines("qwen3_moe")
    requests = [{"ids": PROMPTS[i], "params": _params(i, max_tokens=30)} for i in (0, 2, 4)]

    async def main():
        alone = await _alone(engine, requests)
        jobs = [engine.submit(r["ids"], r["params"], logprobs=True) for r in requests]
        tasks = [asyncio.create_task(_collect(j)) for j in (jobs[0], jobs[2])]
        seen = 0
        async for _ in jobs[1].steps():
            seen += 1
            if seen == 3:
                break  # leaving the iterator cancels the job
        return alone, [*await asyncio.gather(*tasks)], seen

    alone, kept, seen = asyncio.run(main())
    _same(kept, [alone[0], alone[2]])
    assert seen == 3
    assert engine.metrics.generations.get("cancelled", 0) >= 1


def test_openai_streams_through_the_app_and_metrics_show_the_batch(engines):
    """The real routes (in process) with the official async client: chats streamed at once."""
    from moe_local.server.app import create_app

    engine = engines("mixtral")
    app = create_app(engine)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http, max_retries=0)

            async def ask(i: int) -> str:
                args = dict(model=engine.name, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
                resp = await client.completions.create(prompt=f"Story {i}: once", **args)
                return resp.choices[0].text

            alone = [await ask(i) for i in range(4)]
            together = await asyncio.gather(*(ask(i) for i in range(4)))
            metrics = (await http.get("/metrics")).text
            return alone, list(together), metrics

    alone, together, metrics = asyncio.run(main())
    assert together == alone
    assert re.search(r"^moe_local_parallel 4$", metrics, re.MULTILINE)
    assert re.search(r"^moe_local_batch_size 0$", metrics, re.MULTILINE)  # nothing runs any more
    assert re.search(r'^moe_local_decode_steps_total\{batch="\d"\} \d+$', metrics, re.MULTILINE)


def test_families_that_cannot_batch_are_served_one_at_a_time(tiny_checkpoint):
    """GPT-OSS (sliding-window layers) and DeepSeek-V3 (MLA takes no padding mask) fall back."""
    engine = _start(tiny_checkpoint("gpt_oss"), parallel=4)
    try:
        assert "sliding window" in (batch_support(engine.lm) or "")
        requests = [{"ids": PROMPTS[i], "params": _params(i)} for i in range(3)]

        async def main():
            return await _alone(engine, requests), await _together(engine, requests, stagger=False)

        alone, together = asyncio.run(main())
        _same(together, alone)
        assert engine.gauges().batch_size == 0 and not _steps_by_size(engine)
    finally:
        engine.stop()
    from moe_local.loading.loader import load

    assert "padded batch" in (batch_support(load(tiny_checkpoint("deepseek_v3"))) or "")


def test_parallel_must_be_positive(tiny_mixtral):
    with pytest.raises(MoeLocalError, match="parallel must be at least 1"):
        Engine(tiny_mixtral, parallel=0)


def test_serve_refuses_a_parallel_below_one_before_anything_loads(capsys, monkeypatch):
    import moe_local.cli.load_flags as load_flags
    from tests.helpers import assert_one_line_error, run_cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was prepared before --parallel was checked")

    monkeypatch.setattr(load_flags, "model_or_demo", no_model)
    code, _, err = run_cli(capsys, "serve", "--parallel", "0")
    assert_one_line_error(code, err, "--parallel must be at least 1")


def test_serve_passes_parallel_to_the_server(capsys, monkeypatch, tiny_mixtral):
    import moe_local.cli.load_flags as load_flags
    import moe_local.server
    from tests.helpers import run_cli
    from tests.server.harness import free_port

    seen: dict = {}
    port = str(free_port())
    monkeypatch.setattr(load_flags, "model_or_demo", lambda model: str(tiny_mixtral))
    monkeypatch.setattr(moe_local.server, "serve", lambda model, **kw: seen.update(kw))
    code, _, _ = run_cli(capsys, "serve", "--parallel", "4", "--port", port)
    assert code == 0 and seen["parallel"] == 4
    run_cli(capsys, "serve", "--port", port)
    assert seen["parallel"] == 1  # the default: one generation at a time, as before
