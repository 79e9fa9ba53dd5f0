"""``convert grok1``: a tiny release in xAI's format (pickled numpy arrays, int8 weights with bf16
scales, files numbered in JAX's flattening order) converts to a checkpoint moe-local runs exactly;
anything the restricted unpickler does not know is refused in one line and never built.

The release files are written here as JAX's checkpoint writer writes them (``pickle.dump`` of numpy
arrays and of a ``__main__.QuantizedWeight8bit``); bf16 scales are pickled the way numpy pickles
an ``ml_dtypes.bfloat16`` array (by the type's name), with a stand-in module for ml_dtypes.
"""

from __future__ import annotations

import pickle
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.grok1 import convert_grok1, layer_order, release_plan
from moe_local.convert.jax_pickle import load_tensor
from moe_local.errors import CheckpointError
from moe_local.generation import generate
from moe_local.loading.loader import load
from tests.models.released import PROMPT, TOKENS
from tests.models.test_grok import TINY, reference_greedy

SIZES = {k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")}
SIZES |= {
    k: TINY[k]
    for k in (
        "num_key_value_heads",
        "num_experts",
        "num_experts_per_tok",
        "attn_output_multiplier",
        "embedding_multiplier_scale",
        "max_attn_value",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
}
SIZES["num_hidden_layers"] = 12  # layer files come in the string order 0, 1, 10, 11, 2, ...


_RECONSTRUCT = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct


@dataclass
class QuantizedWeight8bit:  # the release's class, pickled as __main__.QuantizedWeight8bit
    weight: np.ndarray
    scales: object


QuantizedWeight8bit.__module__ = "__main__"


class _BF16:  # stands in for ml_dtypes.bfloat16, pickled by name
    pass


class _BF16Dtype:
    def __reduce__(self):
        return np.dtype, (_BF16, False, True), (3, "<", None, None, None, -1, -1, 0)


class _BF16Array:
    """Pickles as numpy pickles a bf16 array: _reconstruct, then (version, shape, dtype, fortran, bytes)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t.to(torch.bfloat16).contiguous()

    def __reduce__(self):
        raw = self.t.view(torch.int16).numpy().tobytes()
        state = (1, tuple(self.t.shape), _BF16Dtype(), False, raw)
        return _RECONSTRUCT, (np.ndarray, (0,), b"b"), state


@pytest.fixture
def release_globals(monkeypatch):
    fake = types.ModuleType("ml_dtypes")
    fake.bfloat16 = _BF16
    _BF16.__module__, _BF16.__qualname__ = "ml_dtypes", "bfloat16"
    monkeypatch.setitem(sys.modules, "ml_dtypes", fake)
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", QuantizedWeight8bit, raising=False)


def _write_release(folder, gen) -> dict[str, torch.Tensor]:
    """A tiny ckpt-0; returns the weights it holds, as moe-local should read them (hpcai layout, bf16)."""
    folder.mkdir()
    want: dict[str, torch.Tensor] = {}
    h = SIZES["hidden_size"]
    for fname, name, kind in release_plan(SIZES):
        n = SIZES["num_experts"]
        if kind == "norm":
            w = 1.0 + 0.1 * torch.randn(h, generator=gen)
            obj, want[name] = np.asarray(w.numpy()), w
        elif kind == "embed":
            w = 0.2 * torch.randn(SIZES["vocab_size"], h, generator=gen)
            obj, want[name] = np.asarray(w.numpy()), w
        else:  # int8 codes [.., in, out] with bf16 scales [.., 1, out], as the release stores weights
            from moe_local.convert.grok1 import _expected

            shape = _expected(kind, SIZES)
            codes = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
            scales = (0.2 / 64) * (0.5 + torch.rand(*shape[:-2], 1, shape[-1], generator=gen))
            scales = scales.to(torch.bfloat16)
            obj = QuantizedWeight8bit(codes.numpy(), _BF16Array(scales))
            w = codes.float() * scales.float()
            if kind in ("up", "down"):
                want |= {name.format(e=e): w[e].t().to(torch.bfloat16).float() for e in range(n)}
            else:
                want[name] = w.t().to(torch.bfloat16).float()
        with open(folder / fname, "wb") as f:
            pickle.dump(obj, f, protocol=4)
    for name in [k for k in want if k.endswith("scale") or "embed" in k]:
        want[name] = want[name].to(torch.bfloat16).float()
    return want


def test_plan_follows_jax_flattening_order():
    plan = release_plan(SIZES)
    assert len(plan) == 2 + 12 * SIZES["num_hidden_layers"]
    assert layer_order(12)[:4] == [0, 1, 10, 11]
    assert plan[0][1] == "model.embed_tokens.weight" and plan[1][1] == "model.norm.scale"
    assert plan[2][1] == "model.layers.0.moe_block.experts.{e}.linear.weight"
    assert plan[2 + 12 * 2][1].startswith("model.layers.10.")  # after layer 1 comes layer 10


def test_converted_release_runs_exactly(release_globals, tmp_path):
    gen = torch.Generator().manual_seed(3)
    want_tensors = _write_release(tmp_path / "ckpt-0", gen)
    out = convert_grok1(tmp_path / "ckpt-0", tmp_path / "grok-tiny", config=SIZES)
    from moe_local.tiny import make_tokenizer

    make_tokenizer().save_pretrained(out)
    cfg = TINY | SIZES
    want = reference_greedy(cfg, want_tensors)
    lm = load(out, LoadOptions(dtype="float32"))
    assert len(lm.sites) == 12
    assert generate(lm, PROMPT, SamplingParams(max_tokens=TOKENS, ignore_eos=True)).tokens == want


def test_unknown_globals_are_refused_and_never_built(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "tensor00000_000"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError) as info:
        load_tensor(path)
    assert "builtins.eval" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(np.array([object()], dtype=object)))
    with pytest.raises(CheckpointError, match=r"not a numeric dtype|objects"):
        load_tensor(path)


def test_a_wrong_release_is_refused_in_one_line(release_globals, tmp_path):
    folder = tmp_path / "ckpt-0"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="tensor files are missing"):
        convert_grok1(folder, tmp_path / "out", config=SIZES)
    _write_release(tmp_path / "ckpt-1", torch.Generator().manual_seed(0))
    bad = tmp_path / "ckpt-1" / release_plan(SIZES)[1][0]  # the final norm, given the embeddings' shape
    bad.write_bytes(pickle.dumps(np.zeros((3, 4), dtype=np.float32)))
    with pytest.raises(CheckpointError) as info:
        convert_grok1(tmp_path / "ckpt-1", tmp_path / "out", config=SIZES)
    assert "shape [3, 4]" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_refuses_a_folder_that_is_not_the_release(capsys, tmp_path):
    import moe_local.cli.convert  # noqa: F401  (registers ``convert``; app.py imports it once wired)
    from tests.helpers import assert_one_line_error, run_cli

    (tmp_path / "ckpt-0").mkdir()
    code, _, err = run_cli(capsys, "convert", "grok1", str(tmp_path / "ckpt-0"), str(tmp_path / "out"))
    assert_one_line_error(code, err, "is not Grok-1's ckpt-0")
