"""Many clients at once, one model: answers stay correct and complete; a client that leaves stops its work."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from tests.server.harness import misbehaviours

PROMPTS = [f"Story number {i}: once upon a time" for i in range(8)]


def _ask(server, i: int) -> str:
    """Client ``i``: even ones stream a chat, odd ones ask for a whole text completion."""
    client = server.client()
    args = dict(model=server.model, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    if i % 2:
        return client.completions.create(prompt=PROMPTS[i], **args).choices[0].text
    stream = client.chat.completions.create(
        messages=[{"role": "user", "content": PROMPTS[i]}], stream=True, **args
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_concurrent_clients_get_the_same_answers_as_alone(server):
    alone = [_ask(server, i) for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        together = list(pool.map(lambda i: _ask(server, i), range(len(PROMPTS))))
    assert together == alone
    assert len(set(alone)) > 1  # different prompts, different answers: nothing got mixed up


def test_misbehaving_clients_do_not_disturb_the_others(server):
    """Clients leaving mid-body and mid-stream among honest ones: the honest answers do not change."""
    alone = [_ask(server, i) for i in range(4)]
    rude = list(misbehaviours(server.model, {}).values())
    with ThreadPoolExecutor(max_workers=4 + len(rude)) as pool:
        honest = [pool.submit(_ask, server, i) for i in range(4)]
        for misbehave in rude:
            pool.submit(misbehave, server.port)
        together = [f.result() for f in honest]
    assert together == alone
    time.sleep(0.5)  # the server notices the last departures
    assert server.alarms() == []


def _generated_tokens(server) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    m = re.search(r"^moe_local_generation_tokens_total (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _cancelled(server) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    m = re.search(r'^moe_local_generations_total\{outcome="cancelled"\} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_client_disconnect_cancels_the_generation(server):
    client = server.client()
    tokens_before, cancelled_before = _generated_tokens(server), _cancelled(server)
    stream = client.completions.create(
        model=server.model,
        prompt="Hi",
        max_tokens=240,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for n, _ in enumerate(stream, start=1):
        if n == 2:
            break
    stream.close()
    start = time.perf_counter()
    resp = client.completions.create(model=server.model, prompt="Next", max_tokens=3, temperature=0)
    elapsed = time.perf_counter() - start
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert elapsed < 5.0
    assert _cancelled(server) == cancelled_before + 1
    # the abandoned generation stopped early: far fewer than its 240 tokens were made
    assert _generated_tokens(server) - tokens_before < 120
