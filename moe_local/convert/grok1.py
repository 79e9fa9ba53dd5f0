"""``convert grok1``: xAI's JAX release of Grok-1 (``ckpt-0``) to a safetensors checkpoint of the family.

The release (github.com/xai-org/grok-1, ``checkpoint.py``) is one pickle per parameter,
``tensor{i:05d}_000``, numbered in the order JAX flattens the Haiku parameter tree: module paths
sorted as strings, so the embeddings, the final norm, then the decoder layers in the string order
of ``decoder_layer_N`` (0, 1, 10, 11, ...), each with its 12 parameters in the order of
``LAYER_PARAMS``. Every file is read with ``jax_pickle``'s restricted unpickler and checked
against the shape its place implies; JAX's [in, out] weights are transposed to PyTorch's
[out, in], int8 weights dequantized (codes times scales), and the result written in bfloat16 in
the layout of ``moe_local.models.grok`` (hpcai-tech/grok-1's names), one shard per file read, so
memory holds one parameter (one stack of 8 experts, 1.6 GB of int8) at a time, never the model.
Legend: E=experts, H=hidden size, I=expert intermediate size, V=vocabulary.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from moe_local.convert.jax_pickle import ReleaseTensor, load_tensor
from moe_local.convert.outdir import (
    check_output,
    check_partial,
    clear_partial,
    is_ours,
    make_partial,
    os_error_line,
    publish,
    save_safetensors,
)
from moe_local.errors import CheckpointError, MoeLocalError

Progress = Callable[[str, int, int], None]
# Grok-1's configuration (the release's run.py), in the family's field names
GROK1 = {
    "vocab_size": 131072,
    "hidden_size": 6144,
    "intermediate_size": 32768,
    "num_hidden_layers": 64,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "attn_output_multiplier": 0.08838834764831845,
    "embedding_multiplier_scale": 78.38367176906169,
    "output_multiplier_scale": 0.5773502691896257,
    "max_attn_value": 30.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}
# one decoder layer's parameters in flattening order: (Haiku module path, checkpoint name, kind)
LAYER_PARAMS = (
    ("moe/linear", "moe_block.experts.{e}.linear.weight", "up"),
    ("moe/linear_1", "moe_block.experts.{e}.linear_1.weight", "down"),
    ("moe/linear_v", "moe_block.experts.{e}.linear_v.weight", "up"),
    ("multi_head_attention/key", "attn.k_proj.weight", "kv"),
    ("multi_head_attention/linear", "attn.o_proj.weight", "o"),
    ("multi_head_attention/query", "attn.q_proj.weight", "q"),
    ("multi_head_attention/value", "attn.v_proj.weight", "kv"),
    ("rms_norm", "pre_attn_norm.scale", "norm"),
    ("rms_norm_1", "post_attn_norm.scale", "norm"),
    ("rms_norm_2", "pre_moe_norm.scale", "norm"),
    ("rms_norm_3", "post_moe_norm.scale", "norm"),
    ("router", "moe_block.gate.weight", "router"),
)


def layer_order(layers: int) -> list[int]:
    """Decoder layers in the order their parameters were flattened (string order of their names)."""
    return sorted(range(layers), key=lambda i: f"decoder_layer_{i}")


def _expected(kind: str, c: dict) -> tuple[int, ...]:
    """The JAX shape of a parameter of ``kind`` ([in, out] for weights)."""
    h, i, e = c["hidden_size"], c["intermediate_size"], c["num_experts"]
    d = h // c["num_attention_heads"]
    return {
        "embed": (c["vocab_size"], h),
        "norm": (h,),
        "up": (e, h, i),
        "down": (e, i, h),
        "kv": (h, c["num_key_value_heads"] * d),
        "q": (h, c["num_attention_heads"] * d),
        "o": (c["num_attention_heads"] * d, h),
        "router": (h, e),
    }[kind]


def release_plan(config: dict) -> list[tuple[str, str, str]]:
    """(file name, checkpoint name pattern, kind) for every file of a release of ``config``'s sizes."""
    plan = [("embeddings", "model.embed_tokens.weight", "embed"), ("rms_norm", "model.norm.scale", "norm")]
    for n in layer_order(config["num_hidden_layers"]):
        plan += [
            (f"decoder_layer_{n}/{m}", f"model.layers.{n}.{name}", kind) for m, name, kind in LAYER_PARAMS
        ]
    return [(f"tensor{i:05d}_000", name, kind) for i, (_, name, kind) in enumerate(plan)]


def _torch_tensors(t: ReleaseTensor, name: str, kind: str, num_experts: int) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one release parameter, in bfloat16 and PyTorch's layout."""
    if kind in ("up", "down"):  # [E, in, out] -> one [out, in] per expert, dequantized one at a time
        return {name.format(e=e): t.get(e).t().contiguous().to(torch.bfloat16) for e in range(num_experts)}
    v = t.get()
    if kind not in ("norm", "embed"):
        v = v.t()
    return {name: v.contiguous().to(torch.bfloat16)}


def convert_grok1(
    ckpt: str | Path,
    out: str | Path,
    *,
    config: dict | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Convert the release folder ``ckpt`` (``ckpt-0``) into a safetensors checkpoint folder ``out``.

    Args:
        ckpt: the folder of ``tensorNNNNN_000`` files.
        out: the folder to create.
        config: the model's sizes (``GROK1`` by default; tests give tiny ones).
        tokenizer: the release's ``tokenizer.model`` to copy beside the weights (optional).
        overwrite: replace an existing OUT that moe-local wrote.
        progress: ``progress(stage, done, total)`` after each file.

    Returns:
        The folder.

    Raises:
        MoeLocalError: a file is missing, unreadable, refused by the unpickler, or of the wrong shape.
    """
    ckpt, out = Path(ckpt), Path(out)
    c = {**GROK1, **(config or {})}
    plan = release_plan(c)
    missing = [f for f, _, _ in plan if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{ckpt} is not Grok-1's ckpt-0: {len(missing)} of its {len(plan)} tensor files are missing "
            f"(first: {missing[0]})"
        )
    sources = [ckpt] + ([Path(tokenizer).parent] if tokenizer else [])
    check_output(out, sources, overwrite=overwrite)
    partial = out.with_name(out.name + ".partial")
    check_partial(partial)
    try:
        clear_partial(partial)
        make_partial(partial, "convert grok1")
        index: dict[str, str] = {}
        for i, (fname, name, kind) in enumerate(plan):
            t = load_tensor(ckpt / fname)
            if t.shape != (shape := _expected(kind, c)):
                raise CheckpointError(
                    f"{ckpt / fname}: shape {list(t.shape)}, but {name} is {list(shape)} here"
                )
            tensors = _torch_tensors(t, name, kind, c["num_experts"])
            del t
            shard = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            save_safetensors(tensors, partial / shard, metadata={"format": "pt"})
            index.update(dict.fromkeys(tensors, shard))
            if progress:
                progress("tensors", i + 1, len(plan))
        (partial / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": index})
        )
        (partial / "config.json").write_text(json.dumps(_config_json(c), indent=1))
        if tokenizer:
            shutil.copyfile(tokenizer, partial / "tokenizer.model")
        publish(partial, out)
    except BaseException as exc:
        if is_ours(partial):
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):
            raise MoeLocalError(os_error_line(out, exc)) from exc
        raise
    return out


def _config_json(c: dict) -> dict:
    return {
        "architectures": ["Grok1ForCausalLM"],
        "model_type": "grok-1",
        **c,
        "torch_dtype": "bfloat16",
    }
