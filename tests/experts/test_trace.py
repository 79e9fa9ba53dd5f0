"""generate --trace writes the routing trace; moe-local trace replays it."""

from __future__ import annotations

import json

from tests.helpers import assert_one_line_error, run_cli


def test_trace_roundtrip(capsys, tiny_mixtral, tmp_path):
    trace = tmp_path / "t.jsonl"
    args = ["generate", str(tiny_mixtral), "hello", "-n", "6", "--no-chat", "--trace", str(trace), "--stats"]
    code, _, _ = run_cli(capsys, *args)
    assert code == 0
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert {r["layer"] for r in records} == {0, 1}
    assert {r["step"] for r in records} == set(range(6))  # prefill + 5 decode steps feed 6 tokens
    assert all(0 <= e < 4 for r in records for e in r["experts"])
    code, out, _ = run_cli(capsys, "trace", str(trace), "--slots", "2")
    assert code == 0
    for policy in ("lru", "lfu", "belady"):
        assert f"{policy}: hit rate" in out


def test_bad_trace(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "layer": 0, "experts": [1]}\nnot json\n')
    code, _, err = run_cli(capsys, "trace", str(bad))
    assert_one_line_error(code, err, "line 2")
