"""The per-token cost of constrained decoding, against the decode time of a demo-shaped model.

Constrained decoding (``moe_local.grammar``) runs one mask per generated token: advance the
matcher over the sampled token, compute the next-token bitmask, unpack it and fill the forbidden
logits with -inf. This measures that whole step (``GrammarMask.__call__``) on a vocabulary of
the demo's size (49,152 tokens, SmolLM2's), for a JSON schema, any JSON object and a forced
tool call, while sampling random logits under the mask (the worst case for the engine's caches:
every step goes somewhere new). It then times a decode step of a random Mixtral with the demo's
shape (SmolLM2-135M upcycled to 8 experts, top 2; fp32, no expert offload: the fastest the demo
can decode here, so the ratio is an upper bound) and prints mask time / decode time.

The tokenizer: ``--tokenizer FOLDER`` (SmolLM2's, or any fast tokenizer), else a byte-level BPE of
49,152 tokens trained here in seconds on synthetic words and JSON. Compare engines with
``--engine outlines-core`` (when installed; its index is built ahead, so its compile time is
printed too).

    python benchmarks/bench_grammar.py                  # about a minute on one core
    python benchmarks/bench_grammar.py --tokenizer ~/SmolLM2-135M --decode-layers 30
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}


def synthetic_tokenizer(vocab: int = VOCAB):
    """A byte-level BPE of ``vocab`` tokens trained on synthetic words and JSON (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")
    words = [
        "".join(rng.choice(syllables) for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))) for _ in range(60000)
    ]

    def lines():
        for _ in range(40000):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
            value = rng.randint(0, 10 ** rng.randint(1, 6))
            yield f'{text} {{"{rng.choice(words)}": {value}, "x": "{rng.choice(words)}"}}'

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def time_llguidance(tokenizer, vocab: int, tokens: int, seed: int) -> dict[str, dict[str, float]]:
    """Per-token mask time (µs) of moe_local.grammar for three grammars."""
    from moe_local.grammar import GrammarCompiler
    from moe_local.server.tool_calls import HermesSyntax
    from moe_local.server.tools import call_grammar, check_tools

    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    setup_ms = (time.perf_counter() - t0) * 1e3
    tools = check_tools([{"type": "function", "function": {"name": "save_person", "parameters": SCHEMA}}])
    grammars = {
        "json_schema": lambda: compiler.json_schema(SCHEMA),
        "json_object": lambda: compiler.json_schema(None),
        "tool_call": lambda: compiler.lark(call_grammar(HermesSyntax(), tools, ["save_person"], json.dumps)),
    }
    out = {}
    for name, make in grammars.items():
        t0 = time.perf_counter()
        grammar = make()
        compile_ms = (time.perf_counter() - t0) * 1e3
        times = _run_mask(compiler.processor(grammar, 0), tokenizer.eos_token_id, vocab, tokens, seed)
        out[name] = {"compile_ms": compile_ms, **_stats(times)}
    out["tokenizer"] = {"setup_ms": setup_ms}
    return out


def _run_mask(mask, eos: int, vocab: int, tokens: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    seen: list[int] = []
    times = []
    while len(times) < tokens:
        logits = torch.randn(vocab, generator=gen)
        t0 = time.perf_counter()
        masked = mask(seen, logits)
        times.append(time.perf_counter() - t0)
        token = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
        if token == eos or mask.done():  # a complete value: start again (one long run of masks)
            mask.matcher.reset()
            seen, mask.fed = [], 0
            continue
        seen.append(token)
    return times


def time_outlines(tokenizer, vocab: int, tokens: int, seed: int) -> dict[str, dict[str, float]]:
    """The same loop with outlines-core (index built ahead of the first token)."""
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    special = set(tokenizer.all_special_ids)
    texts: dict[str, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i not in special:  # byte-level pieces as their text (incomplete UTF-8 is lossy: timing only)
            texts.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(i)
    vocabulary = Vocabulary(tokenizer.eos_token_id, texts)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index = Index(regex, vocabulary)
    compile_ms = (time.perf_counter() - t0) * 1e3
    guide = Guide(index)
    gen = torch.Generator().manual_seed(seed)
    times = []
    while len(times) < tokens:
        logits = torch.randn(vocab, generator=gen)
        t0 = time.perf_counter()
        allowed = torch.tensor(guide.get_tokens(), dtype=torch.long)
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        times.append(time.perf_counter() - t0)
        token = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
        guide.advance(token)
        if guide.is_finished():
            guide = Guide(index)
    return {"json_schema": {"compile_ms": compile_ms, **_stats(times)}}


def _stats(times: list[float]) -> dict[str, float]:
    us = sorted(t * 1e6 for t in times)
    return {"mean_us": statistics.fmean(us), "median_us": us[len(us) // 2], "p95_us": us[int(len(us) * 0.95)]}


def time_decode(vocab: int, layers: int, steps: int) -> float:
    """Seconds per decode step of a random demo-shaped Mixtral (fp32, all experts in RAM)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from moe_local.generation import cache_keyword
    from moe_local.tiny import tiny_config

    config = tiny_config(
        "mixtral",
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    cache = DynamicCache(config=config)
    keyword = cache_keyword(model)
    ids = torch.randint(0, vocab, (1, 32))
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, **{keyword: cache}, use_cache=True, logits_to_keep=1)
        for _ in range(steps):
            token = out.logits[0, -1].argmax().view(1, 1)
            t0 = time.perf_counter()
            out = model(input_ids=token, **{keyword: cache}, use_cache=True, logits_to_keep=1)
            out.logits[0, -1].float().cpu()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    """Print the mask cost per token and its share of a decode step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", help="a fast tokenizer's folder (default: a synthetic 49,152-token BPE)"
    )
    parser.add_argument("--tokens", type=int, default=400, help="masks to time per grammar")
    parser.add_argument("--decode-layers", type=int, default=30, help="layers of the demo-shaped model (30)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--engine", choices=["llguidance", "outlines-core"], default="llguidance")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the noisy shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = synthetic_tokenizer()
    vocab = max(len(tokenizer), VOCAB)
    timing = time_llguidance if args.engine == "llguidance" else time_outlines
    masks = timing(tokenizer, vocab, args.tokens, args.seed)
    decode_s = time_decode(vocab, args.decode_layers, args.decode_steps)
    print(f"engine {args.engine}, vocabulary {vocab}, torch threads {args.threads}")
    print(f"decode step of a demo-shaped model ({args.decode_layers} layers, fp32): {decode_s * 1e3:.1f} ms")
    for name, row in masks.items():
        if "mean_us" not in row:
            print(f"{name}: setup {row['setup_ms']:.0f} ms (once per model)")
            continue
        share = row["mean_us"] / (decode_s * 1e6)
        print(
            f"{name}: compile {row['compile_ms']:.1f} ms; mask per token mean {row['mean_us']:.0f} us, "
            f"median {row['median_us']:.0f} us, p95 {row['p95_us']:.0f} us = {share:.1%} of a decode step"
        )


if __name__ == "__main__":
    main()
