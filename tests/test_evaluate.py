"""eval: perplexity by non-overlapping windows, equal to a direct computation; CLI output."""

from __future__ import annotations

import math

import pytest
import torch

from moe_local.evaluate import perplexity
from tests.helpers import assert_one_line_error, run_cli

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8


def test_perplexity_matches_direct_computation(tiny_lm):
    res = perplexity(tiny_lm, TEXT, context=64)
    ids = tiny_lm.tokenizer.encode(TEXT)
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), 64):
            w = torch.tensor([ids[s : s + 64]])
            if w.shape[1] < 2:
                continue
            logp = torch.log_softmax(tiny_lm.model(w).logits[0, :-1], -1)
            nll -= float(logp.gather(1, w[0, 1:, None]).sum())
            n += w.shape[1] - 1
    assert res.tokens == n
    assert math.isclose(res.perplexity, math.exp(nll / n), rel_tol=1e-4)
    assert res.tokens_per_s > 0 and res.context == 64


def test_max_tokens_and_context_cap(tiny_lm):
    res = perplexity(tiny_lm, TEXT, context=10_000, max_tokens=300)
    assert res.context == tiny_lm.context and res.tokens == 300 - 2  # two windows: 256 + 44


def test_eval_cli(capsys, tiny_mixtral, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    code, out, _ = run_cli(capsys, "eval", str(tiny_mixtral), "--text", str(text), "--context", "64")
    assert code == 0 and out.startswith("perplexity: ")
    code, out, _ = run_cli(capsys, "eval", str(tiny_mixtral), str(tiny_mixtral), "--text", str(text))
    assert code == 0 and out.count(tiny_mixtral.name) >= 2
    code, _, err = run_cli(capsys, "eval", str(tiny_mixtral), "--text", str(tmp_path / "missing.txt"))
    assert_one_line_error(code, err, "cannot read")


def test_window_nll_batching_and_tail(tiny_lm):
    import torch

    from moe_local.evaluate import window_nll

    ids = torch.arange(3, 3 + 37) % 200  # 4 windows of 8 and a tail of 5
    one = window_nll(tiny_lm.model, ids, 8)
    two = window_nll(tiny_lm.model, ids, 8, batch=2)
    assert one[1] == two[1] == 4 * 7 + 4
    assert abs(one[0] - two[0]) < 1e-3 * abs(one[0])
    assert window_nll(tiny_lm.model, ids[:33], 8)[1] == 4 * 7  # a 1-token tail scores nothing


@pytest.mark.parametrize("kind", ["missing", "folder", "empty"])
def test_eval_checks_the_text_before_loading(tiny_mixtral, tmp_path, capsys, monkeypatch, kind):
    import moe_local.loading.loader as loader

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --text was checked")

    monkeypatch.setattr(loader, "load", no_load)
    text = {"missing": tmp_path / "nope.txt", "folder": tmp_path, "empty": tmp_path / "empty.txt"}[kind]
    if kind == "empty":
        text.write_text("  \n")
    code, _, err = run_cli(capsys, "eval", str(tiny_mixtral), "--text", str(text))
    assert_one_line_error(code, err, "--text", str(text))


def test_second_half_scores_what_llama_perplexity_scores(tiny_lm):
    ids = tiny_lm.tokenizer.encode(TEXT)
    context = 64
    res = perplexity(tiny_lm, TEXT, context=context, score="second-half")
    nll, n = 0.0, 0
    first = context // 2
    with torch.no_grad():
        for s in range(0, len(ids) - context + 1, context):  # full windows only
            w = torch.tensor([ids[s : s + context]])
            logp = torch.log_softmax(tiny_lm.model(w).logits[0, first:-1], -1)
            nll -= float(logp.gather(1, w[0, first + 1 :, None]).sum())
            n += context - 1 - first
    assert res.tokens == n == (len(ids) // context) * 31 and res.score == "second-half"
    assert math.isclose(res.perplexity, math.exp(nll / n), rel_tol=1e-4)


def test_second_half_window_nll_drops_the_tail(tiny_lm):
    from moe_local.evaluate import window_nll

    ids = torch.arange(3, 3 + 37) % 200  # 4 windows of 8 and a tail of 5
    one = window_nll(tiny_lm.model, ids, 8, score="second-half")
    two = window_nll(tiny_lm.model, ids, 8, batch=3, score="second-half")
    assert one[1] == two[1] == 4 * 3  # predictions of tokens 5, 6, 7 of each window
    assert abs(one[0] - two[0]) < 1e-3 * abs(one[0])


def test_second_half_needs_a_full_window(tiny_lm):
    from moe_local.errors import MoeLocalError

    with pytest.raises(MoeLocalError, match="full windows"):
        perplexity(tiny_lm, TEXT, context=64, max_tokens=40, score="second-half")
    with pytest.raises(MoeLocalError, match="--score"):
        perplexity(tiny_lm, TEXT, context=64, score="half")


def test_eval_cli_score(capsys, tiny_mixtral, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = ("eval", str(tiny_mixtral), "--text", str(text), "--context", "64")
    code, out, _ = run_cli(capsys, *args, "--score", "second-half")
    assert code == 0 and out.startswith("perplexity: ") and "second half" in out
    code, _, err = run_cli(capsys, *args, "--score", "middle")
    assert_one_line_error(code, err, "--score")
