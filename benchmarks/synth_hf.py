"""Write a Mixtral-shaped bf16 Hugging Face checkpoint with random weights, shard by shard.

The folder looks like a real ``save_pretrained`` Mixtral checkpoint: ``config.json`` (from
transformers' ``MixtralConfig``), ``model-0000k-of-0000n.safetensors`` shards of about
``--shard-mb`` MB with ``model.safetensors.index.json``, per-expert tensors
``model.layers.{L}.block_sparse_moe.experts.{e}.w1/w2/w3.weight``, the router
``...block_sparse_moe.gate.weight``, attention ``q/k/v/o_proj``, norms, ``embed_tokens`` and
``lm_head``, plus the small byte-level tokenizer of ``moe_local.tiny.make_tokenizer()``.

Only one shard's tensors are in memory at a time, so a checkpoint larger than RAM can be written.
The default (hidden 1024, expert FFN 3584, 8 layers, 8 experts, vocab 32000) is about 1.6 GB.

Usage::

    python benchmarks/synth_hf.py /tmp/synth-mixtral                      # the 1.6 GB default
    python benchmarks/synth_hf.py OUT --hidden 4096 --ffn 14336 --layers 32 --heads 32 --kv-heads 8
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TOKENIZER_IDS = 261  # 256 byte tokens + 5 specials of moe_local.tiny.make_tokenizer()

# Legend: H=hidden size, F=expert FFN (intermediate) size, V=vocab, E=experts, D=head dim.


@dataclass(frozen=True)
class SynthSpec:
    """Shape of the synthetic Mixtral checkpoint."""

    hidden: int = 1024
    ffn: int = 3584
    layers: int = 8
    experts: int = 8
    top_k: int = 2
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 32000
    shard_mb: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not divisible by kv heads {self.kv_heads}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be in [1, experts], got {self.top_k}")
        if self.vocab < TOKENIZER_IDS:
            raise ValueError(f"vocab must hold the tokenizer's {TOKENIZER_IDS} ids, got {self.vocab}")

    @property
    def head_dim(self) -> int:
        """Per-head dimension D = H / heads."""
        return self.hidden // self.heads


def tensor_shapes(spec: SynthSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in file order (embeddings, layer by layer, final norm, lm_head)."""
    h, f, kv = spec.hidden, spec.ffn, spec.kv_heads * spec.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for layer in range(spec.layers):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.block_sparse_moe.gate.weight", (spec.experts, h)),
        ]
        for e in range(spec.experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            out += [(f"{q}.w1.weight", (f, h)), (f"{q}.w2.weight", (h, f)), (f"{q}.w3.weight", (f, h))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]
    return out


def _nbytes(shape: tuple[int, ...]) -> int:
    n = 2  # bf16
    for d in shape:
        n *= d
    return n


def plan_shards(spec: SynthSpec) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the tensors, in order, into shards of at most ``shard_mb`` MB (one tensor may exceed it)."""
    limit = spec.shard_mb * 1_000_000
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(spec):
        nb = _nbytes(shape)
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    return shards


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm weights near 1, matrices N(0, 1/fan_in) (embeddings N(0, 0.02**2)), as bf16."""
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    std = 0.02 if "embed_tokens" in name else shape[1] ** -0.5
    return torch.randn(shape, generator=gen).mul_(std).to(torch.bfloat16)


def mixtral_config(spec: SynthSpec):
    """The transformers ``MixtralConfig`` matching ``spec`` (bf16, untied embeddings)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        num_local_experts=spec.experts,
        num_experts_per_tok=spec.top_k,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=256,  # the ids of make_tokenizer()'s <s>, </s>, <pad>
        eos_token_id=257,
        pad_token_id=258,
        dtype="bfloat16",
    )


def write_synthetic_mixtral(out: str | Path, spec: SynthSpec | None = None, *, verbose: bool = False) -> Path:
    """Write a random Mixtral-shaped bf16 checkpoint to ``out``, one shard in memory at a time.

    Args:
        out: destination folder (created; existing files of the same names are overwritten).
        spec: shapes and sharding (default ``SynthSpec()``, about 1.6 GB).
        verbose: print each shard as it is written.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    from moe_local.tiny import make_tokenizer

    spec = spec or SynthSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(spec)
    gen = torch.Generator().manual_seed(spec.seed)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(name, shape, gen) for name, shape in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        total += nbytes
        weight_map.update(dict.fromkeys((name for name, _ in shard), fname))
        if verbose:
            print(f"{fname}: {len(shard)} tensors, {nbytes / 1e6:.0f} MB", file=sys.stderr)
    index = {"metadata": {"total_size": total, "synth_spec": asdict(spec)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    mixtral_config(spec).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def checkpoint_bytes(folder: str | Path) -> int:
    """Total tensor bytes of a checkpoint written by ``write_synthetic_mixtral`` (from its index)."""
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python benchmarks/synth_hf.py OUT [--hidden ...]``."""
    d = SynthSpec()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size H")
    p.add_argument("--ffn", type=int, default=d.ffn, help="expert FFN size (intermediate_size)")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads (must divide hidden)")
    p.add_argument("--kv-heads", type=int, default=d.kv_heads, help="key/value heads (must divide heads)")
    p.add_argument("--vocab", type=int, default=d.vocab, help=f"config vocab size (>= {TOKENIZER_IDS})")
    p.add_argument("--shard-mb", type=int, default=d.shard_mb, help="target shard size in MB (1e6 bytes)")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    spec = SynthSpec(
        a.hidden, a.ffn, a.layers, a.experts, a.top_k, a.heads, a.kv_heads, a.vocab, a.shard_mb, a.seed
    )
    folder = write_synthetic_mixtral(a.out, spec, verbose=True)
    print(f"{folder}: {checkpoint_bytes(folder) / 1e6:.0f} MB of bf16 tensors")


if __name__ == "__main__":
    main()
