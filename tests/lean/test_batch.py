"""Several sequences through the lean step at once: each row's logits are its sequence's alone, to the bit."""

from __future__ import annotations

import pytest
import torch

from moe_local import env
from moe_local.batching import DecodeBatch, batch_support, new_batch, prefill
from moe_local.config import LoadOptions
from moe_local.convert.writer import quantize_checkpoint
from moe_local.lean import ops
from moe_local.lean.batch import LeanBatch
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe

pytestmark = pytest.mark.skipif(not ops.available(), reason="no native operations on this machine")

# every structure; Qwen3 routing 3 of 4 experts, where the order of a row's additions matters
CASES = {
    "mixtral": ("mixtral", {}),
    "qwen3_moe-top3": ("qwen3_moe", {"num_experts_per_tok": 3, "decoder_sparse_step": 2}),
    "qwen2_moe": ("qwen2_moe", {}),
    "olmoe-clip": ("olmoe", {"clip_qkv": 1.0}),
}


def _alone(lm, prompt: list[int], feed: list[int]) -> list[torch.Tensor]:
    """Logits after each fed token, decoding the sequence by itself (a batch of one)."""
    batch = new_batch(lm)
    cache, _ = prefill(lm, prompt)
    batch.join("only", cache, len(prompt))
    return [batch.step({"only": t})["only"] for t in feed]


def _together(
    lm, prompts: list[list[int]], feeds: list[list[int]], starts: list[int]
) -> list[list[torch.Tensor]]:
    """The same sequences decoded in one batch; sequence i joins at step ``starts[i]``, leaves when fed."""
    batch = new_batch(lm)
    assert isinstance(batch, LeanBatch)
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    step = 0
    while any(len(g) < len(f) for g, f in zip(got, feeds, strict=True)):
        for i, prompt in enumerate(prompts):
            if starts[i] == step:
                cache, _ = prefill(lm, prompt)
                batch.join(i, cache, len(prompt))
        live = [i for i in range(len(prompts)) if starts[i] <= step and len(got[i]) < len(feeds[i])]
        out = batch.step({i: feeds[i][len(got[i])] for i in live})
        assert set(out) == set(live)
        for i in live:
            got[i].append(out[i])
            if len(got[i]) == len(feeds[i]):
                batch.leave(i)
        step += 1
    assert len(batch) == 0
    return got


def _streams(lm, seed: int):
    gen = torch.Generator().manual_seed(seed)
    vocab = lm.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    feeds = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (9, 4, 7)]
    return prompts, feeds


@pytest.mark.parametrize("case", list(CASES))
def test_each_row_equals_its_sequence_alone(tiny_checkpoint, case):
    family, overrides = CASES[case]
    lm = load(tiny_checkpoint(family, **overrides), LoadOptions(dtype="bfloat16"))
    prompts, feeds = _streams(lm, 0)
    together = _together(lm, prompts, feeds, starts=[0, 0, 2])  # the third joins mid-way
    for prompt, feed, got in zip(prompts, feeds, together, strict=True):
        for want, have in zip(_alone(lm, prompt, feed), got, strict=True):
            assert torch.equal(have, want)


@pytest.fixture(scope="module")
def q4_folder(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch") / "q4"  # rows wide enough for the native kernel
    source = tiny_checkpoint("mixtral", hidden_size=128, intermediate_size=128)
    quantize_checkpoint(source, folder, load_recipe("all-4bit"))
    return folder


@pytest.mark.parametrize("budget", [None, 2])  # all resident (one native call a layer), or 2 experts: misses
def test_quantized_experts_batch_to_the_bit(q4_folder, budget):
    lm = load(q4_folder, LoadOptions(dtype="bfloat16"))
    if budget:
        one = max(lm.store.get(0, e).nbytes for e in range(4))
        lm = load(q4_folder, LoadOptions(dtype="bfloat16", expert_memory=budget * one + one // 2))
    prompts, feeds = _streams(lm, 1)
    together = _together(lm, prompts, feeds, starts=[0, 1, 1])
    for prompt, feed, got in zip(prompts, feeds, together, strict=True):
        for want, have in zip(_alone(lm, prompt, feed), got, strict=True):
            assert torch.equal(have, want)


def test_the_padded_batch_where_the_lean_step_is_off(tiny_mixtral, monkeypatch):
    lm = load(tiny_mixtral, LoadOptions(dtype="bfloat16"))
    assert isinstance(new_batch(lm), LeanBatch)
    # unpadded rows: any attention implementation batches (bf16 compute's float32 one included)
    assert batch_support(lm) is None
    monkeypatch.setenv(env.LEAN.name, "0")
    assert isinstance(new_batch(lm), DecodeBatch)
    assert isinstance(new_batch(load(tiny_mixtral, LoadOptions(dtype="float32"))), DecodeBatch)


def test_a_sequence_joins_once_with_its_own_length(tiny_mixtral):
    lm = load(tiny_mixtral, LoadOptions(dtype="bfloat16"))
    batch = new_batch(lm)
    cache, _ = prefill(lm, [1, 2, 3])
    batch.join("a", cache, 3)
    with pytest.raises(ValueError, match="already in the batch"):
        batch.join("a", cache, 3)
    with pytest.raises(ValueError, match="3 cached tokens, not 4"):
        batch.join("b", cache, 4)
