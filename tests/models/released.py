"""Helpers for the families moe-local defines itself: folders in the released layout, oracles, checks.

A released-layout folder is written tensor by tensor from names the test spells out (never by the
package's own save path), with the released config.json as a dict, a tokenizer, and an
``auto_map`` pointing at a modeling file that records being imported: moe-local must never run it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_local.config import LoadOptions, SamplingParams
from moe_local.generation import generate
from moe_local.loading.loader import load
from moe_local.tiny import make_tokenizer

PROMPT = [5, 6, 7, 8, 9]
TOKENS = 16


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors: matrices ~N(0, 0.2) (decisive routing), vectors near 1 (norm scales)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.2 * torch.randn(shape, generator=gen)
    return out


def booby_trap(folder: Path, module: str, marker: Path) -> None:
    """A modeling file that writes ``marker`` if anything imports it, named by config.json's auto_map."""
    (folder / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the folder code ran')\n"
        "raise RuntimeError('remote code must never be imported')\n"
    )


def write_released(
    folder: Path, config: dict, tensors: dict[str, torch.Tensor], *, trap: str, marker: Path
) -> Path:
    """Write config.json exactly as given, the tensors as one safetensors file, a tokenizer and the trap."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"}
    )
    make_tokenizer().save_pretrained(folder)
    booby_trap(folder, trap, marker)
    return folder


def hf_greedy(model, prompt=PROMPT, tokens=TOKENS) -> list[int]:
    """transformers' own greedy decoding of ``tokens`` tokens (no early stop)."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


def check_exact_everywhere(folder: Path, want: list[int], marker: Path, tmp_path: Path) -> None:
    """Greedy tokens equal ``want`` in memory and with a one-expert budget; a quantized copy generates."""
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    params = SamplingParams(max_tokens=len(want), ignore_eos=True)
    lm = load(folder, LoadOptions(dtype="float32"))
    assert lm.sites, "the experts must be on transformers' experts interface"
    assert generate(lm, PROMPT, params).tokens == want
    one = max(lm.store.get(s.layer, 0).nbytes for s in lm.sites)
    budgeted = load(folder, LoadOptions(dtype="float32", expert_memory=one))
    assert generate(budgeted, PROMPT, params).tokens == want
    assert budgeted.store.stats().total.misses > 0
    out = tmp_path / "quantized"
    quantize_checkpoint(folder, out, load_recipe("experts-4bit"))
    q = load(out)
    vocab = lm.config.vocab_size
    result = generate(q, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(result.tokens) == 4 and all(0 <= t < vocab for t in result.tokens)
    assert not marker.exists(), "code from the model folder ran"


def headers_only_checkpoint(folder: Path, config: dict, shapes: dict[str, list[int]]) -> None:
    """config.json and a sparse bf16 safetensors file with every tensor's header and no data written."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    header, at = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + at)  # sparse: the model's full size, no blocks written
