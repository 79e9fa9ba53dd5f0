"""CUDA paths: the same equality with transformers on a GPU. Skipped cleanly without one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_local.config import LoadOptions, SamplingParams
from moe_local.generation import generate
from moe_local.loading.loader import load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("budget", [None, 64 * 1024])
def test_cuda_matches_transformers(tiny_checkpoint, family, budget):
    folder = tiny_checkpoint(family)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to("cuda")
    lm = load(folder, LoadOptions(dtype="float32", device="cuda", expert_memory=budget))
    ids = torch.randint(0, 250, (1, 16), device="cuda")
    with torch.no_grad():
        want, got = ref(ids).logits, lm.model(ids).logits
    assert float((want - got).abs().max() / want.abs().max()) < 1e-4
    prompt = ids[0].tolist()
    ours = generate(lm, prompt, SamplingParams(max_tokens=16, ignore_eos=True)).tokens
    theirs = ref.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None)
    assert ours == theirs[0, 16:].tolist()
