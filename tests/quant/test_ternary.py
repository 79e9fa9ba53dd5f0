"""Ternary codes (``tern-g64k``): packing, sizes, the saved form, kernels and a checkpoint end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.config import LoadOptions
from moe_local.convert.writer import quantize_checkpoint
from moe_local.format.expert_keys import join_gate_up
from moe_local.loading.loader import load
from moe_local.quant import native, quantize
from moe_local.quant.pack import (
    pack_codes,
    pack_ternary,
    ternary_packed_size,
    ternary_to_2bit,
    unpack_codes,
    unpack_ternary,
)
from moe_local.quant.schemes import QType, bits_per_weight, parse_qtype
from moe_local.quant.tensor import QuantizedTensor
from moe_local.recipes import load_recipe


def _codes(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 3, (rows, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [4, 20, 64, 576, 1536, 14336])
def test_five_codes_a_byte_round_trip(n):
    codes = _codes(3, n)
    packed = pack_ternary(codes)
    assert packed.shape == (3, ternary_packed_size(n)) == (3, -(-n // 5))
    assert int(packed.max()) <= 242
    assert torch.equal(unpack_ternary(packed, n), codes)
    assert torch.equal(ternary_to_2bit(packed, n), pack_codes(codes, 2))


def test_the_torch_repacking_equals_the_native_one(monkeypatch):
    codes = _codes(5, 576, seed=1)
    packed = pack_ternary(codes)
    fast = ternary_to_2bit(packed, 576)
    monkeypatch.setattr(native, "ternary_to_2bit", lambda p, n: None)  # as without a C compiler
    assert torch.equal(ternary_to_2bit(packed, 576), fast)


def test_bytes_that_are_not_ternary_and_codes_above_two_are_refused():
    packed = pack_ternary(_codes(2, 576))
    packed[1, 7] = 243
    with pytest.raises(ValueError, match="at most 242"):
        ternary_to_2bit(packed, 576)
    with pytest.raises(ValueError, match="at most 242"):
        unpack_ternary(packed, 576)
    with pytest.raises(ValueError, match="0, 1 or 2"):
        pack_ternary(torch.full((1, 10), 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="116 bytes"):
        ternary_to_2bit(packed[:, :100], 576)


def test_names_bits_and_validation():
    qt = parse_qtype("tern-g64k-hqq")
    assert qt == QType(2, 64, "hqq", superblock=True, ternary=True)
    assert qt.full_name == "tern-g64k-hqq" and qt.qmax == 2 and qt.stored_bits == 1.6
    assert bits_per_weight(qt) == pytest.approx(1.6 + 16 / 64 + 32 / 256)  # 1.975: under 2 bits
    assert bits_per_weight(parse_qtype("tern-g128")) == pytest.approx(1.85)
    with pytest.raises(ValueError, match="bits must be 2"):
        QType(4, 64, ternary=True)


def _weight(o: int = 64, i: int = 576, seed: int = 0) -> torch.Tensor:
    return torch.randn(o, i, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("name", ["tern-g64k-hqq", "tern-g32", "tern-g64k"])
def test_saved_five_to_a_byte_held_as_two_bit_codes(name):
    q = quantize(_weight(), parse_qtype(name))
    codes = unpack_codes(q.packed, 2, 576)
    assert int(codes.max()) == 2  # three levels used, never a fourth
    stored = q.tensors()
    assert stored["packed"].shape == (64, 116)  # 1.6 bits a code on disk
    back = QuantizedTensor.from_tensors(stored, q.shape, q.qtype)
    assert back.packed.shape == (64, 144) and torch.equal(back.dequantize(), q.dequantize())
    err = float((q.dequantize() - _weight()).norm() / _weight().norm())
    # the best three levels of a Gaussian group leave ~0.43 of its norm; min/max rtn ~0.59
    assert err < (0.62 if name == "tern-g32" else 0.46)


def test_bf16_linear_runs_the_two_bit_kernels():
    q = quantize(_weight(o=128, i=512, seed=2), parse_qtype("tern-g64k-hqq"))
    x = torch.randn(3, 512).to(torch.bfloat16)
    want = x.float() @ q.dequantize().T
    assert float((q.linear(x).float() - want).norm() / want.norm()) < 0.02


def test_gate_and_up_join_code_for_code():
    qt = parse_qtype("tern-g64k-hqq")
    gate, up = quantize(_weight(seed=3), qt), quantize(_weight(seed=4), qt)
    joined = join_gate_up(gate, up, concatenated=True)
    assert torch.equal(joined.dequantize(), torch.cat([gate.dequantize(), up.dequantize()]))


def _recipe(tmp_path, experts: str):
    path = tmp_path / f"{experts}.toml"
    path.write_text(
        f'[[rule]]\nmatch = "*.experts.*"\nscheme = "{experts}"\n'
        '[[rule]]\nmatch = "*.self_attn.*"\nscheme = "int8-g32"\n'
    )
    return load_recipe(str(path))


def test_quantize_and_load_a_checkpoint(tiny_mixtral, tmp_path):
    recipe = _recipe(tmp_path, "tern-g32k-hqq")
    dry = quantize_checkpoint(tiny_mixtral, tmp_path / "dry", recipe, dry_run=True)
    report = quantize_checkpoint(tiny_mixtral, tmp_path / "q", recipe)
    assert dry.bytes_out == report.bytes_out  # the plan's sizes are the written ones
    quantize_checkpoint(tiny_mixtral, tmp_path / "q2", _recipe(tmp_path, "int2-g32k-hqq"))
    manifest = json.loads((tmp_path / "q" / "moe_local.json").read_text())
    assert "tern-g32k-hqq" in json.dumps(manifest)
    ref = load(tiny_mixtral)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    errs = {}
    for name in ("q", "q2"):
        lm = load(tmp_path / name, LoadOptions(dtype="float32"))
        with torch.no_grad():
            want, got = ref.model(ids).logits.float(), lm.model(ids).logits
        assert torch.isfinite(got).all()
        errs[name] = float((got - want).norm() / want.norm())
    # three levels against four: coarser (random weights are the worst case), not broken
    assert errs["q2"] < errs["q"] < min(1.6 * errs["q2"], 0.9), errs
    lm = load(tmp_path / "q", LoadOptions(dtype="float32"))
    experts = next(m for m in lm.model.modules() if hasattr(m, "store"))
    w = experts.store.get(experts.layer, 0)
    assert int(unpack_codes(w.down.packed, 2, w.down.shape[1]).max()) <= 2  # read back as 0..2
