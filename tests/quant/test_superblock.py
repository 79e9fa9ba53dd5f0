"""Super-block scales (the ``k`` schemes): names, sizes, exact storage round trip, error, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.config import LoadOptions
from moe_local.convert.writer import quantize_checkpoint
from moe_local.format.expert_keys import join_gate_up
from moe_local.loading.loader import load
from moe_local.quant import quantize
from moe_local.quant.schemes import QType, bits_per_weight, parse_qtype
from moe_local.quant.superblock import (
    exact_recovery,
    expand,
    quantize_params,
    recover_codes,
    superblocks,
)
from moe_local.quant.tensor import QuantizedTensor
from moe_local.recipes import load_recipe


def _weight(o: int = 96, i: int = 576, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=gen) * 0.02
    w[:, :5] *= 10  # outlier channels: groups of very different ranges inside one super-block
    return w


def test_names_parse_and_print_back():
    qt = parse_qtype("int4-g32k")
    assert qt == QType(4, 32, "rtn", superblock=True) and qt.full_name == "int4-g32k"
    assert parse_qtype("INT3-G16K-HQQ").full_name == "int3-g16k-hqq"
    assert parse_qtype("int4-g32").superblock is False
    with pytest.raises(ValueError, match="not gptq"):
        parse_qtype("int4-g32k-gptq")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_qtype("int4-g32q")


def test_bits_per_weight_counts_codes_and_super_pairs():
    assert bits_per_weight(parse_qtype("int4-g32k")) == pytest.approx(4 + 16 / 32 + 32 / 256)
    assert bits_per_weight(parse_qtype("int2-g16k")) == pytest.approx(2 + 1 + 0.125)
    assert bits_per_weight(parse_qtype("int4-g32k")) < bits_per_weight(parse_qtype("int4-g32"))


def test_expanded_params_give_their_codes_back():
    gen = torch.Generator().manual_seed(1)
    scale = torch.rand(64, 18, generator=gen) * 0.01 + 1e-4
    zero = torch.randn(64, 18, generator=gen) * 8
    sc, oc, sup = quantize_params(scale, zero, 32)
    assert sup.shape == (64, superblocks(18, 32), 2) == (64, 3, 2)  # 18 groups: 8 + 8 + a partial 2
    s16, z16 = expand(sc, oc, sup, 32)
    got_sc, got_oc = recover_codes(s16, z16, sup, 32)
    assert torch.equal(got_sc, sc) and torch.equal(got_oc, oc)
    assert exact_recovery(sc, oc, sup, 32)
    assert float(((s16.float() - scale) / scale).abs().max()) < 0.5  # the smallest groups lose most


@pytest.mark.parametrize("name", ["int4-g32k", "int4-g32k-hqq", "int3-g16k", "int2-g16k-hqq", "int8-g64k"])
def test_stored_tensors_round_trip_exactly(name):
    w = _weight()
    qt = parse_qtype(name)
    q = quantize(w, qt)
    stored = q.tensors()
    assert set(stored) == {"packed", "scale_codes", "offset_codes", "superscales"}
    assert stored["scale_codes"].dtype == torch.uint8 and stored["offset_codes"].dtype == torch.int8
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    # the file's bytes are what bits_per_weight says, up to the row's partial last super-block
    assert stored_bytes * 8 / w.numel() == pytest.approx(bits_per_weight(qt), rel=0.03)
    back = QuantizedTensor.from_tensors({k: v.clone() for k, v in stored.items()}, q.shape, qt)
    assert torch.equal(back.dequantize(), q.dequantize())
    assert back._scale_codes is None  # recovered from the expanded scales, not held twice
    assert all(torch.equal(back.tensors()[k], stored[k]) for k in stored)


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, 64), (3, 16), (2, 16)])
def test_error_stays_within_two_percent_of_fp16_group_params(bits, group):
    w = _weight(seed=2)
    for method in ("rtn", "hqq"):
        plain = quantize(w, QType(bits, group, method))
        k = quantize(w, QType(bits, group, method, superblock=True))
        err_plain = float((plain.dequantize() - w).norm())
        err_k = float((k.dequantize() - w).norm())
        assert err_k <= 1.02 * err_plain, (method, err_k, err_plain)


def test_bad_stored_codes_are_refused():
    q = quantize(_weight(), parse_qtype("int4-g32k"))
    stored = q.tensors()
    zero_code = dict(stored, scale_codes=torch.zeros_like(stored["scale_codes"]))
    with pytest.raises(ValueError, match="a stored code is 0"):
        QuantizedTensor.from_tensors(zero_code, q.shape, q.qtype)
    with pytest.raises(ValueError, match="expected tensors"):
        QuantizedTensor.from_tensors(q.tensors() | {"scales": q.scales}, q.shape, q.qtype)
    wrong = dict(stored, offset_codes=stored["offset_codes"].to(torch.uint8))
    with pytest.raises(ValueError, match=r"offset_codes must be torch\.int8"):
        QuantizedTensor.from_tensors(wrong, q.shape, q.qtype)
    with pytest.raises(ValueError, match="superscales must be"):
        QuantizedTensor(q.packed, q.scales, q.zeros, q.shape, q.qtype)


def test_unrecoverable_codes_are_kept_and_saved_as_stored():
    q = quantize(_weight(), parse_qtype("int4-g32k"))
    stored = q.tensors()
    sup = stored["superscales"].clone()
    sup[..., 0] = 2.0**-24  # tiny scales under large offsets: each zero point clamps at fp16's max
    sup[..., 1] = 1000.0
    odd = dict(stored, superscales=sup, offset_codes=torch.full_like(stored["offset_codes"], 100))
    back = QuantizedTensor.from_tensors(odd, q.shape, q.qtype)
    assert back._scale_codes is not None
    assert all(torch.equal(back.tensors()[k], odd[k]) for k in odd)


def test_gate_and_up_join_code_for_code():
    qt = parse_qtype("int4-g32k-hqq")
    gate, up = quantize(_weight(seed=3), qt), quantize(_weight(seed=4), qt)
    joined = join_gate_up(gate, up, concatenated=True)
    assert isinstance(joined, QuantizedTensor) and joined.qtype == qt
    assert torch.equal(joined.dequantize(), torch.cat([gate.dequantize(), up.dequantize()]))


def test_bf16_linear_matches_its_dequantized_weight():
    q = quantize(_weight(o=128, i=512), parse_qtype("int4-g32k"))
    x = torch.randn(3, 512).to(torch.bfloat16)
    want = x.float() @ q.dequantize().T
    got = q.linear(x).float()
    assert float((got - want).norm() / want.norm()) < 0.02  # bf16 output, int8 activations on AVX2


def _recipe(tmp_path, name: str, k: str):
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[[rule]]\nmatch = "*.experts.*"\nscheme = "int4-g16{k}-hqq"\n'
        f'[[rule]]\nmatch = "*.self_attn.*"\nscheme = "int4-g16{k}"\n'
    )
    return load_recipe(str(path))


def test_quantize_and_load_a_checkpoint(tiny_mixtral, tmp_path):
    recipe = _recipe(tmp_path, "k", "k")
    dry = quantize_checkpoint(tiny_mixtral, tmp_path / "dry", recipe, dry_run=True)
    report = quantize_checkpoint(tiny_mixtral, tmp_path / "q", recipe)
    assert dry.bytes_out == report.bytes_out  # the plan's sizes are the written ones
    quantize_checkpoint(tiny_mixtral, tmp_path / "p", _recipe(tmp_path, "plain", ""))
    manifest = json.loads((tmp_path / "q" / "moe_local.json").read_text())
    assert "int4-g16k-hqq" in json.dumps(manifest)
    ref = load(tiny_mixtral)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    errs = {}
    for name in ("q", "p"):
        lm = load(tmp_path / name, LoadOptions(dtype="float32"))
        with torch.no_grad():
            want, got = ref.model(ids).logits.float(), lm.model(ids).logits
        errs[name] = float((got - want).norm() / want.norm())
    assert errs["q"] < 1.15 * errs["p"], errs  # 8-bit codes of the params cost little


def test_the_cheap_recovery_test_never_vouches_for_codes_that_do_not_come_back():
    from moe_local.quant.superblock import surely_recoverable

    gen = torch.Generator().manual_seed(7)
    vouched = 0
    for trial in range(60):  # scales from 1 down to 1e-8 and zero points with exact zeros
        scale = torch.rand(16, 18, generator=gen) ** 3 * 10.0 ** -(trial % 8) + 1e-9
        zero = torch.randn(16, 18, generator=gen) * 8 * (torch.rand(16, 18, generator=gen) > 0.3)
        sc, oc, sup = quantize_params(scale, zero, 32)
        s16, z16 = expand(sc, oc, sup, 32)
        if surely_recoverable(s16, z16):
            vouched += 1
            assert exact_recovery(sc, oc, sup, 32), trial
    assert 5 <= vouched < 60  # it vouches for ordinary weights and declines the tiny ones


def test_a_weight_read_from_a_blob_lets_the_blob_go():
    q = quantize(_weight(), parse_qtype("int4-g32k"))
    stored = q.tensors()
    blob = torch.cat([t.reshape(-1).view(torch.uint8) for t in stored.values()])  # one buffer, as on disk
    views, pos = {}, 0
    for name, t in stored.items():
        n = t.numel() * t.element_size()
        views[name] = blob[pos : pos + n].view(t.dtype).view(t.shape)
        pos += n
    back = QuantizedTensor.from_tensors(views, q.shape, q.qtype)
    held = back.held_tensors()
    # nothing it holds keeps the blob alive: its scale codes are dead bytes nbytes would not count
    assert all(t.untyped_storage().data_ptr() != blob.untyped_storage().data_ptr() for t in held)
    assert torch.equal(back.dequantize(), q.dequantize())
