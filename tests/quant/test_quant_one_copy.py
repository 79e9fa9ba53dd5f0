"""One copy of each weight: the kernel layout replaces the codes, converts back exactly, same numbers."""

from __future__ import annotations

import pytest
import torch

from moe_local.quant import (
    QType,
    QuantizedTensor,
    QuantLinear,
    int8_kernel,
    kernels,
    native,
    pack_codes,
    quantize,
)
from moe_local.quant.pack import unpack_codes

HAS_INT4 = kernels.int4_kernel_available() and kernels.layout_reversible()
HAS_INT8 = int8_kernel.int8_kernel_available()
BF16_REL = 1e-2  # as in test_quant_tensor: bf16 weights/scales and output against an fp32 reference


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about torch's kernels and their layouts: moe-local's own one (``native``,
    which reads the stored codes and converts nothing) is tested in test_native.py."""
    monkeypatch.setattr(native, "available", lambda: False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _blob_backed(
    bits: int, o: int = 144, i: int = 256, group: int = 64
) -> tuple[QuantizedTensor, torch.Tensor]:
    """A weight whose tensors are views into one byte buffer, as an expert read from disk is."""
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(bits + o))
    qt = quantize(w, QType(bits, group))
    parts = [t.contiguous().view(torch.uint8).flatten() for t in qt.tensors().values()]
    blob = torch.cat([*parts, torch.zeros(4096, dtype=torch.uint8)])  # other tensors of the expert
    views, offset = {}, 0
    for name, t in qt.tensors().items():
        n = t.numel() * t.element_size()
        views[name] = blob[offset : offset + n].view(t.dtype).view(t.shape)
        offset += n
    return QuantizedTensor.from_tensors(views, qt.shape, qt.qtype), blob


def _held_storages(qt: QuantizedTensor) -> dict[int, int]:
    """data_ptr -> bytes of every storage the weight references (its attributes and kernel cache)."""
    tensors = [v for v in vars(qt).values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in qt._kernel.values() if isinstance(v, torch.Tensor)]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _x(m: int, i: int = 256) -> torch.Tensor:
    return torch.randn(m, i, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)


@pytest.mark.skipif(not HAS_INT4, reason="no reversible CPU int4 layout in this torch")
@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("o", [16, 48, 64, 80, 144])  # whole row blocks and short last blocks
def test_int4_layout_converts_back_exactly(bits: int, o: int) -> None:
    i = 128
    codes = torch.randint(0, 1 << bits, (o, i), generator=torch.Generator().manual_seed(o), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    layout = kernels.pack_int4_weight(packed, bits, (o, i))
    shifted = codes.to(torch.int32) + 8 - (1 << (bits - 1))
    assert torch.equal(layout, torch.ops.aten._convert_weight_to_int4pack_for_cpu(shifted, 1))
    assert torch.equal(kernels.unpack_int4_weight(layout, bits, (o, i)), packed)
    for start, end in [(0, o), (0, 1), (o - 1, o), (3, o - 5), (16, min(o, 40))]:
        assert torch.equal(kernels.unpack_int4_rows(layout, bits, (o, i), start, end), codes[start:end])


@pytest.mark.parametrize("kind", ["4", "3", "2", "8-split", "8-group"])
def test_first_kernel_call_leaves_one_copy(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bits = int(kind[0])
    if not (HAS_INT4 if kind != "8-group" else HAS_INT8):
        pytest.skip("no CPU kernel for these bits in this torch")
    if kind == "8-group":
        monkeypatch.setattr(int8_kernel, "SPLIT_MAX_WEIGHTS", 0)  # as for a large weight
    qt, blob = _blob_backed(bits)
    packed, scales, zeros = (t.clone() for t in qt.tensors().values())
    ref = qt.dequantize()
    assert _held_storages(qt) == {blob.untyped_storage().data_ptr(): blob.numel()}
    qt.linear(_x(3))
    held = _held_storages(qt)
    assert blob.untyped_storage().data_ptr() not in held  # the blob can be freed
    assert sum(held.values()) == qt.nbytes + qt.kernel_cache_nbytes
    o, i = qt.shape
    groups = o * i // 64
    codes = o * i if bits == 8 else o * i // 2  # the kernel layouts: 8 or 4 bits a code, once
    # per group: bf16 (s, b) for the int4 kernel, twice for the nibbles, bf16 scale + fp32 zero term
    params = {"8-split": 8, "8-group": 2 + 4}.get(kind, 4) * groups
    assert qt.nbytes == scales.nbytes + zeros.nbytes and qt.kernel_cache_nbytes == codes + params
    # converting back is exact: the saved tensors, the reference path and dequantize are unchanged
    assert all(torch.equal(a, b) for a, b in zip(qt.tensors().values(), (packed, scales, zeros), strict=True))
    assert torch.equal(qt.dequantize(), ref)
    for start, end in [(0, 1), (5, 70), (130, 144)]:
        assert torch.equal(qt.dequantize_rows(start, end), ref[start:end])
    x = _x(120)
    fresh = quantize_like(packed, scales, zeros, qt)
    assert torch.equal(qt.linear(x, use_kernel=False), fresh.linear(x, use_kernel=False))
    qt.clear_kernel_cache()
    assert qt.kernel_cache_nbytes == 0 and torch.equal(qt.packed, packed)


def quantize_like(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, qt: QuantizedTensor
) -> QuantizedTensor:
    return QuantizedTensor(packed.clone(), scales.clone(), zeros.clone(), qt.shape, qt.qtype)


@pytest.mark.skipif(not HAS_INT4, reason="no reversible CPU int4 layout in this torch")
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_int4_numerics_bit_identical_to_torch_conversion(bits: int) -> None:
    qt, _ = _blob_backed(bits)
    shifted = unpack_codes(qt.packed, bits, qt.shape[1]).to(torch.int32) + 8 - (1 << (bits - 1))
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(shifted, 1)
    s = qt.scales.to(torch.float32)  # the (s, b) pairs as built before the one-copy layout
    b = (float(1 << (bits - 1)) - qt.zeros.to(torch.float32)) * s
    scale_bias = torch.stack((s, b), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    for m in (1, 7, 96):
        x = _x(m)
        expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, 64, scale_bias)
        assert torch.equal(qt.linear(x), expected)
    # the reference path reads codes back from the layout for more rows than the kernel takes
    # (and runs bf16 rows as a float32 matmul)
    x = _x(200)
    expected = torch.nn.functional.linear(x.float(), qt.dequantize(torch.float32)).to(torch.bfloat16)
    assert torch.equal(qt.linear(x), expected)


@pytest.mark.skipif(not HAS_INT8, reason="this torch has no CPU int8 weight matmul")
@pytest.mark.parametrize("group", [16, 64, 128])
@pytest.mark.parametrize("m", [1, 5, 200])
@pytest.mark.parametrize("split_max", [0, 1 << 21])  # large weights: per group; small ones: nibbles
def test_8bit_kernels_close_to_reference(
    group: int, m: int, split_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    for name in ("int8_linear", "split_linear"):
        real = getattr(int8_kernel, name)
        monkeypatch.setattr(
            int8_kernel, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    monkeypatch.setattr(int8_kernel, "SPLIT_MAX_WEIGHTS", split_max)
    qt = quantize(torch.randn(80, 256, generator=torch.Generator().manual_seed(group)), QType(8, group))
    x = _x(m)
    ref = x.float() @ qt.dequantize().T
    y = qt.linear(x)
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < BF16_REL
    assert _rel(qt.linear(x, use_kernel=False), ref) < BF16_REL
    nibbles = split_max and HAS_INT4 and group != 16  # the int4 kernel takes groups of 32 to 256
    assert calls == ["split_linear" if nibbles else "int8_linear"]


@pytest.mark.skipif(not HAS_INT4, reason="no reversible CPU int4 layout in this torch")
def test_prepare_kernel_converts_once(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = quantize(torch.randn(64, 128), QType(4, 64))
    assert not qt.prepare_kernel(torch.float32)
    assert qt.kernel_cache_nbytes == 0
    assert qt.prepare_kernel(torch.bfloat16)
    converted = qt.kernel_cache_nbytes
    assert converted and qt.nbytes == qt.scales.nbytes + qt.zeros.nbytes

    def fail(*args: object) -> torch.Tensor:
        raise AssertionError("converted twice")

    monkeypatch.setattr(kernels, "pack_int4_weight", fail)
    qt.linear(_x(2, 128))
    assert qt.kernel_cache_nbytes == converted
    assert not quantize(torch.randn(64, 128), QType(4, 16)).prepare_kernel()  # no kernel for group 16


@pytest.mark.skipif(not HAS_INT4, reason="no reversible CPU int4 layout in this torch")
def test_pinned_codes_and_one_way_layouts_keep_the_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _x(2)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    pinned, _ = _blob_backed(4)
    pinned.linear(x)
    assert pinned.nbytes == sum(t.nbytes for t in pinned.tensors().values())  # codes kept for copies
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "kernel_layout", lambda: kernels.Layout(0))
    one_way, _ = _blob_backed(4)
    expected = quantize_like(*one_way.tensors().values(), one_way).linear(x)
    assert torch.equal(one_way.linear(x), expected)
    assert one_way.nbytes == sum(t.nbytes for t in one_way.tensors().values())


@pytest.mark.skipif(not HAS_INT4, reason="no reversible CPU int4 layout in this torch")
def test_quant_linear_holds_one_copy_and_saves_the_codes() -> None:
    lin = torch.nn.Linear(256, 96)
    layer = QuantLinear.from_linear(lin, "int4-g64")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    weight = layer.quantized()
    y = layer(_x(3))
    assert layer.quantized() is weight and weight.nbytes == weight.scales.nbytes + weight.zeros.nbytes
    assert [name for name, _ in layer.named_buffers()] == ["bias"]  # the codes live in the weight, once
    after = layer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert layer.to("cpu").quantized() is weight  # nothing moved: the kernel layout stays
    other = QuantLinear.from_linear(torch.nn.Linear(256, 96), "int4-g64")
    other.load_state_dict(after)
    assert torch.equal(other(_x(3)), y)
    with pytest.raises(RuntimeError, match="packed"):
        other.load_state_dict({k: v for k, v in after.items() if k != "packed"})


@pytest.mark.skipif(not HAS_INT8, reason="this torch has no CPU int8 weight matmul")
def test_int8_kernel_same_numbers_in_row_chunks_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_kernel, "SPLIT_MAX_WEIGHTS", 0)  # the per-group kernel
    qt = quantize(torch.randn(200, 256, generator=torch.Generator().manual_seed(3)), QType(8, 64))
    x = _x(9)
    y = qt.linear(x)
    assert int8_kernel.int8_kernel_available() and "int8" in qt._kernel
    monkeypatch.setattr(int8_kernel, "_PARTIAL_BYTES", 9 * 2 * 64)  # 64 output rows per call
    monkeypatch.setattr(int8_kernel, "_THREADED_MACS", 0)  # torch's threads for every call
    assert torch.equal(qt.linear(x), y)


@pytest.mark.skipif(not HAS_INT4, reason="no reversible CPU int4 layout in this torch")
def test_api_prepare_kernel_takes_any_part() -> None:
    from moe_local.quant.api import prepare_kernel

    layer = QuantLinear.from_linear(torch.nn.Linear(128, 64), "int4-g64")
    assert prepare_kernel(layer, torch.bfloat16) and layer.quantized().kernel_cache_nbytes
    assert not prepare_kernel(torch.zeros(4, 4), torch.bfloat16) and not prepare_kernel(None, torch.bfloat16)
    y = layer(_x(2, 128))
    assert layer.quantized().nbytes == layer.scales.nbytes + layer.zeros.nbytes and y.shape == (2, 64)
