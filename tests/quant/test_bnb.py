"""bitsandbytes weight types: BnbType names, BnbTensor accuracy, serialization, QuantLinear over them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

from moe_local.quant import QuantLinear, bnb_backend, bnb_tensor  # noqa: E402
from moe_local.quant.bnb import quantize_bnb  # noqa: E402
from moe_local.quant.bnb_backend import (  # noqa: E402
    BitsandbytesNotInstalledError,
    bitsandbytes_available,
    pack_4bit_for_cpu,
)
from moe_local.quant.bnb_tensor import BnbTensor  # noqa: E402
from moe_local.quant.bnb_type import BnbType, parse_bnb_type  # noqa: E402

N_OUT, N_IN = 256, 512
KINDS = ("nf4", "fp4", "int8")

# linear() against x @ dequantize().T in fp32 (measured on gaussian data, N_OUT x N_IN):
#   4-bit CPU kernel: bf16 activations and bf16 block scales, ~3.3e-3; int8 kernel: activations are
#   quantized to int8 per row as well, ~7.5e-3; use_kernel=False: the same W_hat, ~1e-7.
KERNEL_VS_DEQ = {"nf4": 1e-2, "fp4": 1e-2, "int8": 1.5e-2}
# ... and against the original dense weight (quantization error; measured nf4 0.092, fp4 0.123,
# int8 0.0106 with the kernel / 0.0073 without).
VS_DENSE = {"nf4": 0.12, "fp4": 0.15, "int8": 0.02}
# bf16 inputs give a bf16 output: rounding adds up to ~4e-3 on top.
BF16_EXTRA = 6e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _w(o: int = N_OUT, i: int = N_IN, seed: int = 0) -> torch.Tensor:
    return torch.randn(o, i, generator=torch.Generator().manual_seed(seed))


def _x(*lead: int, i: int = N_IN) -> torch.Tensor:
    return torch.randn(*lead, i, generator=torch.Generator().manual_seed(sum(lead) + 7))


@pytest.fixture(scope="module")
def qweights() -> dict[str, tuple[torch.Tensor, BnbTensor]]:
    w = _w()
    return {kind: (w, quantize_bnb(w, kind)) for kind in (*KINDS, "nf4-dq")}


# --- type names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nf4", BnbType("nf4")),
        ("fp4-b128", BnbType("fp4", 128)),
        ("NF4-B64", BnbType("nf4")),
        (" nf4-b32-dq ", BnbType("nf4", 32, True)),
        ("fp4-dq", BnbType("fp4", 64, True)),
        ("int8", BnbType("int8")),
    ],
)
def test_parse_bnb_type(text: str, expected: BnbType) -> None:
    parsed = parse_bnb_type(text)
    assert parsed == expected
    assert parse_bnb_type(parsed.full_name) == parsed


def test_full_names() -> None:
    assert BnbType("nf4").full_name == "nf4"
    assert BnbType("fp4", 128).full_name == "fp4-b128"
    assert BnbType("nf4", 64, True).full_name == "nf4-dq"
    assert BnbType("int8").full_name == "int8"
    assert str(BnbType("fp4", 256, True)) == "fp4-b256-dq"
    assert BnbType("int8").bits == 8 and BnbType("nf4").bits == 4


@pytest.mark.parametrize(
    "text", ["int4", "nf4-b100", "nf4-b16", "int8-b128", "int8-dq", "nf4-g64", "", "fp8"]
)
def test_parse_bnb_type_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bnb_type(text)


@pytest.mark.parametrize(
    "args", [("q4",), ("nf4", 48), ("nf4", True), ("int8", 128), ("int8", 64, True), ("nf4", 64, 1)]
)
def test_bnb_type_rejects(args: tuple) -> None:
    with pytest.raises(ValueError):
        BnbType(*args)


# --- accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_dequantized_and_dense(qweights, kind: str, lead: tuple[int, ...], dtype) -> None:
    w, qt = qweights[kind]
    x = _x(*lead)
    bias = torch.randn(N_OUT, generator=torch.Generator().manual_seed(3))
    y = qt.linear(x.to(dtype), bias)
    assert y.shape == (*lead, N_OUT) and y.dtype == dtype
    extra = BF16_EXTRA if dtype == torch.bfloat16 else 0.0
    ref_deq = x @ qt.dequantize().T + bias
    ref_dense = x @ w.T + bias
    assert _rel(y, ref_deq) < KERNEL_VS_DEQ[kind] + extra
    assert _rel(y, ref_dense) < VS_DENSE[kind] + extra


@pytest.mark.parametrize("kind", (*KINDS, "nf4-dq"))
def test_dequantize_path_is_exact(qweights, kind: str) -> None:
    _, qt = qweights[kind]
    x = _x(5)
    assert _rel(qt.linear(x, use_kernel=False), x @ qt.dequantize().T) < 1e-5
    xb = x.bfloat16()
    y = qt.linear(xb, use_kernel=False)
    assert y.dtype == torch.bfloat16
    assert _rel(y, xb.float() @ qt.dequantize(torch.bfloat16).float().T) < BF16_EXTRA


def test_weight_error_bounds(qweights) -> None:
    # Relative Frobenius error of W_hat on a gaussian weight (measured nf4 0.092, fp4 0.122, int8 0.0075).
    for kind, bound in (("nf4", 0.095), ("fp4", 0.125), ("int8", 0.008), ("nf4-dq", 0.095)):
        w, qt = qweights[kind]
        assert _rel(qt.dequantize(), w) < bound, kind


def test_double_quant_close_to_plain(qweights) -> None:
    plain, dq = qweights["nf4"][1], qweights["nf4-dq"][1]
    assert dq.nbytes < plain.nbytes
    x = _x(3)
    assert _rel(dq.linear(x), plain.linear(x)) < 2e-2


def test_dequantize_dtypes(qweights) -> None:
    for kind in KINDS:
        qt = qweights[kind][1]
        d32 = qt.dequantize()
        assert d32.dtype == torch.float32 and d32.shape == (N_OUT, N_IN)
        assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16
        assert _rel(qt.dequantize(torch.float64), d32) < 1e-7


# --- bitsandbytes equivalence -----------------------------------------------------------------


@pytest.mark.parametrize("btype", ["nf4", "fp4-b128", "nf4-dq", "fp4-b32-dq"])
def test_quantize_matches_bitsandbytes(monkeypatch, btype: str) -> None:
    bt = parse_bnb_type(btype)
    w = _w(96, 200)  # 200 % 64 != 0: row chunks still have to start on block boundaries
    monkeypatch.setattr(bnb_tensor, "QUANT_CHUNK_ELEMS", 4000)  # several chunks
    qt = quantize_bnb(w, bt)
    q, state = bnbf.quantize_4bit(
        w, blocksize=bt.blocksize, quant_type=bt.kind, compress_statistics=bt.double_quant
    )
    t = qt.tensors()
    assert torch.equal(t["weight"], q)
    assert torch.equal(t["absmax"], state.absmax)
    assert torch.equal(t["quant_map"], state.code)
    if bt.double_quant:
        assert torch.equal(t["nested_absmax"], state.state2.absmax)
        assert float(t["nested_offset"]) == float(state.offset)
    assert torch.equal(qt.dequantize(), bnbf.dequantize_4bit(q, state))


def test_int8_matches_bitsandbytes(monkeypatch) -> None:
    w = _w(96, 200)
    monkeypatch.setattr(bnb_tensor, "QUANT_CHUNK_ELEMS", 4000)
    t = quantize_bnb(w, "int8").tensors()
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.half())
    assert torch.equal(t["weight"], cb) and torch.equal(t["SCB"], scb)


def test_cpu_layout_matches_bitsandbytes(qweights) -> None:
    convert = getattr(bnbf, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU 4-bit layout")
    qt = qweights["fp4"][1]
    expected, _ = convert(qt.tensors()["weight"].clone(), qt.quant_state())
    assert torch.equal(pack_4bit_for_cpu(qt.tensors()["weight"], qt.shape), expected)


def test_quant_state_round_trip(qweights) -> None:
    for kind in ("nf4", "nf4-dq"):
        qt = qweights[kind][1]
        state = qt.quant_state()
        back = BnbTensor.from_quant_state(qt.tensors()["weight"], state)
        assert back.btype == qt.btype and back.shape == qt.shape
        assert torch.equal(back.dequantize(), qt.dequantize())
        packed = state.as_dict(packed=True)
        assert any(k.startswith("quant_state.bitsandbytes__") for k in packed)
    with pytest.raises(ValueError):
        qweights["int8"][1].quant_state()


# --- serialization ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", (*KINDS, "nf4-dq"))
def test_tensors_round_trip_through_bytes(qweights, kind: str) -> None:
    _, qt = qweights[kind]
    # As stored in an expert blob: every tensor as raw bytes, plus (shape, name) metadata.
    blob = {
        name: (t.contiguous().view(torch.uint8).clone(), t.dtype, t.shape) for name, t in qt.tensors().items()
    }
    meta = {"shape": list(qt.shape), "btype": qt.btype.full_name}
    tensors = {name: raw.view(dtype).reshape(shape) for name, (raw, dtype, shape) in blob.items()}
    back = BnbTensor.from_tensors(tensors, tuple(meta["shape"]), meta["btype"])
    assert back.btype == qt.btype and back.nbytes == qt.nbytes
    x = _x(4)
    for use_kernel in (None, False):
        assert torch.equal(back.linear(x, use_kernel=use_kernel), qt.linear(x, use_kernel=use_kernel))


def test_nbytes(qweights) -> None:
    blocks = N_OUT * N_IN // 64
    assert qweights["nf4"][1].nbytes == N_OUT * N_IN // 2 + 4 * blocks + 16 * 4
    assert qweights["int8"][1].nbytes == N_OUT * N_IN + 4 * N_OUT
    dq = N_OUT * N_IN // 2 + blocks + 4 * (blocks // 256) + 256 * 4 + 16 * 4 + 4
    assert qweights["nf4-dq"][1].nbytes == dq


def test_from_tensors_rejects(qweights) -> None:
    qt = qweights["nf4"][1]
    t = qt.tensors()
    with pytest.raises(ValueError, match="expects tensors"):
        BnbTensor.from_tensors({k: v for k, v in t.items() if k != "absmax"}, qt.shape, qt.btype)
    with pytest.raises(ValueError, match="absmax"):
        BnbTensor.from_tensors({**t, "absmax": t["absmax"].half()}, qt.shape, qt.btype)
    with pytest.raises(ValueError, match="weight"):
        BnbTensor.from_tensors(t, (N_OUT, N_IN + 2), qt.btype)
    with pytest.raises(ValueError):
        BnbTensor.from_tensors(t, qt.shape, "nf4-dq")
    with pytest.raises(ValueError):
        BnbTensor.from_tensors(t, (N_OUT, 0), qt.btype)


def test_to_same_device_is_identity(qweights) -> None:
    qt = qweights["nf4"][1]
    assert qt.to("cpu") is qt
    assert qt.device == torch.device("cpu")


# --- paths and edge cases ---------------------------------------------------------------------


@pytest.mark.parametrize("btype", ["nf4", "fp4-b128", "nf4-dq", "int8"])
def test_shapes_without_cpu_kernel(btype: str) -> None:
    # O % 32 != 0 and I % blocksize != 0: the 4-bit weight takes bitsandbytes' generic path.
    w = _w(40, 96)
    qt = quantize_bnb(w, btype)
    x = _x(3, i=96)
    bound = KERNEL_VS_DEQ[qt.btype.kind]
    assert _rel(qt.linear(x), x @ qt.dequantize().T) < bound
    assert qt.kernel_cache_nbytes == 0


def test_kernel_cache_and_token_threshold(monkeypatch) -> None:
    qt = quantize_bnb(_w(64, 128), "nf4")
    x = _x(6, i=128)
    monkeypatch.setattr(bnb_tensor, "KERNEL_MAX_TOKENS", 4)
    generic = qt.linear(x)  # 6 rows > 4: dequantize_4bit + matmul, no cache
    assert qt.kernel_cache_nbytes == 0
    assert _rel(generic, x @ qt.dequantize().T) < 1e-5
    forced = qt.linear(x, use_kernel=True)
    if bnb_backend.cpu_4bit_packer() is not None:
        assert qt.kernel_cache_nbytes == 64 * 128 // 2 + 2 * 64 * 128 // 64
    assert _rel(forced, generic) < KERNEL_VS_DEQ["nf4"]
    qt.clear_kernel_cache()
    assert qt.kernel_cache_nbytes == 0


@pytest.mark.parametrize("kind", KINDS)
def test_zero_rows_and_empty_input(qweights, kind: str) -> None:
    _, qt = qweights[kind]
    assert qt.linear(torch.zeros(0, N_IN)).shape == (0, N_OUT)
    assert qt.linear(torch.zeros(2, 0, N_IN)).shape == (2, 0, N_OUT)
    x = _x(3)
    x[1] = 0
    y = qt.linear(x)
    assert torch.isfinite(y).all() and float(y[1].abs().max()) == 0.0
    w = _w(64, 128)
    w[5] = 0
    zq = quantize_bnb(w, kind)
    assert float(zq.dequantize()[5].abs().max()) == 0.0
    assert torch.isfinite(zq.linear(_x(2, i=128))).all()


def test_linear_no_autograd(qweights) -> None:
    x = _x(2).requires_grad_()
    y = qweights["nf4"][1].linear(x)
    assert not y.requires_grad


def test_linear_rejects(qweights) -> None:
    qt = qweights["nf4"][1]
    with pytest.raises(ValueError, match="last dim"):
        qt.linear(torch.randn(2, N_IN + 1))
    with pytest.raises(ValueError, match="floating-point"):
        qt.linear(torch.ones(2, N_IN, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias"):
        qt.linear(torch.randn(2, N_IN), torch.randn(N_OUT + 1))


def test_quantize_rejects() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize_bnb(torch.randn(8), "nf4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_bnb(torch.ones(4, 8, dtype=torch.int32), "nf4")
    with pytest.raises(ValueError, match="NaN"):
        quantize_bnb(torch.full((4, 64), float("nan")), "int8")
    with pytest.raises(ValueError, match="fp16"):
        quantize_bnb(torch.full((4, 64), 1e6), "int8")
    with pytest.raises(ValueError):
        quantize_bnb(_w(4, 64), "nf5")


# --- QuantLinear over a BnbTensor ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_quant_linear_bnb(kind: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(N_IN, N_OUT)
    layer = QuantLinear.from_linear(lin, kind)
    x = _x(2, 3)
    with torch.no_grad():
        ref = lin(x)
    # nn.Linear's uniform init: smaller errors than the gaussian bounds.
    assert _rel(layer(x), ref) < VS_DENSE[kind]
    assert kind in repr(layer)

    fresh = QuantLinear(quantize_bnb(torch.zeros(N_OUT, N_IN), kind), torch.zeros(N_OUT))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))

    half = layer.to(torch.bfloat16)
    assert half.bias.dtype == torch.bfloat16
    for name, t in half.quantized().tensors().items():
        assert t.dtype != torch.bfloat16, name
    y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < VS_DENSE[kind] + BF16_EXTRA


def test_quant_linear_bnb_rejects() -> None:
    with pytest.raises(ValueError):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1), "nf4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bias"):
        QuantLinear(quantize_bnb(_w(32, 64), "nf4"), torch.zeros(31))


# --- optional dependency ----------------------------------------------------------------------


def test_missing_bitsandbytes_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(BitsandbytesNotInstalledError) as info:
        quantize_bnb(_w(32, 64), "nf4")
    assert str(info.value) == "bitsandbytes is not installed: pip install bitsandbytes"
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    assert not bitsandbytes_available()


def test_import_is_lazy() -> None:
    code = (
        "import sys\n"
        "sys.modules['bitsandbytes'] = None\n"
        "import moe_local.quant, moe_local.quant.bnb as m\n"
        "t = m.parse_bnb_type('nf4-b128')\n"
        "try:\n"
        "    m.quantize_bnb(__import__('torch').ones(32, 128), t)\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
        "del sys.modules['bitsandbytes']\n"
        "import moe_local.quant.bnb\n"
        "print('LOADED', 'bitsandbytes' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "ERR bitsandbytes is not installed: pip install bitsandbytes" in out.stdout
    assert "LOADED False" in out.stdout
