"""bf16 float weights on the CPU: the native matrix-vector path and the float32 path for many rows."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_local.quant import dense, native, scratch

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


@pytest.fixture(autouse=True)
def _float32_many_rows(monkeypatch):
    """The float32 many-row path on every machine (``BF16_GEMM`` chooses torch's bf16 GEMM on some)."""
    monkeypatch.setattr(native, "BF16_GEMM", False)


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 product of the bf16 values: what every path approximates."""
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16])
def test_few_rows_run_on_the_native_kernel_within_one_bf16_rounding(rows: int) -> None:
    torch.manual_seed(rows)
    w = torch.randn(72, 200).bfloat16()  # 200: the 16-wide loop plus a tail
    x = torch.randn(rows, 200).bfloat16()
    got = dense.dense_linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 72)
    ref = _exact(x, w)
    # float32 sums of exact products, rounded once: within half a bf16 ulp plus float32 noise
    assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all()
    assert torch.equal(got, native.dense_bf16(x, w))


def test_many_rows_and_bias_run_in_float32_rounded_once() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(40, 64).bfloat16(), torch.randn(40).bfloat16()
    x = torch.randn(3, 50, 64).bfloat16()  # 150 rows
    got = dense.dense_linear(x, w, b)
    assert got.shape == (3, 50, 40) and got.dtype == torch.bfloat16
    want = F.linear(x.float(), w.float(), b.float()).bfloat16()
    assert torch.equal(got, want)
    few = dense.dense_linear(x[0, :2], w, b)  # a bias takes the float32 path at any row count
    assert torch.equal(few, F.linear(x[0, :2].float(), w.float(), b.float()).bfloat16())


def test_many_rows_on_a_cpu_with_bf16_products_run_torchs_bf16_gemm(monkeypatch) -> None:
    monkeypatch.setattr(native, "BF16_GEMM", True)
    torch.manual_seed(1)
    w, b = torch.randn(40, 64).bfloat16(), torch.randn(40).bfloat16()
    x = torch.randn(3, 50, 64).bfloat16()
    got = dense.dense_linear(x, w, b)
    assert got.shape == (3, 50, 40) and got.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(x, w, b))
    ref = _exact(x, w, b)
    assert ((got.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-2).all()  # float32 sums, bf16 out


def test_the_many_row_path_converts_a_block_of_rows_at_a_time(monkeypatch) -> None:
    monkeypatch.setattr(dense, "CONVERT_CHUNK_ELEMS", 64 * 8)  # 8 rows of W at a time
    w = torch.randn(30, 64).bfloat16()
    x = torch.randn(40, 64).bfloat16()
    assert torch.equal(dense.dense_linear(x, w), F.linear(x.float(), w.float()).bfloat16())


def test_other_dtypes_devices_and_autograd_stay_on_torch() -> None:
    w = torch.randn(8, 16)
    x = torch.randn(2, 16)
    assert torch.equal(dense.dense_linear(x, w), F.linear(x, w))  # float32: F.linear itself
    wg = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    out = dense.dense_linear(torch.randn(1, 16, dtype=torch.bfloat16), wg)
    assert out.requires_grad  # autograd needs torch's op
    with pytest.raises(RuntimeError):
        dense.dense_linear(torch.randn(1, 15, dtype=torch.bfloat16), wg.detach())  # F.linear's own error


def test_swapped_linears_share_their_parameters_and_keep_tied_weights() -> None:
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 32), nn.Linear(32, 50, bias=False))
    model[2].weight = model[0].weight  # tied, as an lm_head and its embeddings
    model = model.bfloat16()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    x = torch.randint(0, 50, (1, 3))
    with torch.no_grad():
        want = model(x)
        assert dense.use_native_dense(model) == 2
        got = model(x)
    assert all(isinstance(model[i], dense.NativeDenseLinear) for i in (1, 2))
    assert model[2].weight is model[0].weight
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # nothing copied
    assert "in_features=32, out_features=50" in repr(model[2])
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-7
    assert dense.use_native_dense(model) == 0  # already swapped


def test_a_bf16_checkpoint_computes_in_bf16_on_the_cpu_by_default() -> None:
    """auto: bf16 compute keeps a bf16 model its size (no float32 copy); fp32 checkpoints stay fp32."""
    from moe_local.loading.checkpoint import resolve_dtype

    class Config:
        dtype = "bfloat16"

    assert resolve_dtype("auto", Config(), "cpu") is torch.bfloat16
    Config.dtype = "float32"
    assert resolve_dtype("auto", Config(), "cpu") is torch.float32
    Config.dtype = "float16"
    assert resolve_dtype("auto", Config(), "cpu") is torch.float32


def test_the_reused_buffer_serves_calls_in_and_out_of_inference_mode(monkeypatch) -> None:
    """Created under inference_mode, the thread's buffer still takes in-place writes outside it."""
    monkeypatch.setattr(scratch, "_local", threading.local())  # this thread has no buffer yet
    w = torch.randn(20, 64).bfloat16()
    x = torch.randn(40, 64).bfloat16()  # the many-row path: rows widened into the buffer
    want = F.linear(x.float(), w.float()).bfloat16()
    with torch.inference_mode():
        assert torch.equal(dense.dense_linear(x, w), want)  # the buffer is made here
    assert torch.equal(dense.dense_linear(x, w), want)
