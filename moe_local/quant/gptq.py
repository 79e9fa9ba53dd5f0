"""GPTQ: calibration-aware group-wise quantization (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers").

GPTQ minimizes the layer's output error ``||X W^T - X W_hat^T||^2`` instead of the weight error. With
``H = 2 X^T X`` (the Hessian of that loss in each weight row), it quantizes the input columns one at a
time and spreads each column's rounding error over the columns not yet quantized, using the
Optimal-Brain-Surgeon update ``W[:, k] -= err * U[j, k]`` where ``U`` is the upper Cholesky factor of
``H^-1`` and ``err = (w_j - w_hat_j) / U[j, j]``. All output rows are processed at once (they share
``H``); only the column loop is sequential. Updates are applied lazily: eagerly inside a sub-block of
``INNER_BLOCK`` columns, with a small matmul to the rest of the current block after each sub-block, and
with one large matmul to all later columns after each block of ``block_size`` columns.

Group-wise params follow the package convention (see ``moe_local.quant.rtn``): when the column loop
reaches the first column of a group, that group's fp16 scale and zero are chosen by the RTN min/max
rule from the group's current, error-updated weights; codes are assigned with the rounded fp16 params,
so ``QuantizedTensor.dequantize`` reproduces exactly the ``W_hat`` the error feedback used.

With ``act_order`` the columns are visited by decreasing Hessian diagonal, and the params of every
group are fixed up front from the original weights ("static groups"), so the result is still stored in
the natural column order with contiguous groups.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from moe_local.quant.pack import pack_codes
from moe_local.quant.rtn import DEFAULT_CHUNK_ELEMS, check_weight, row_chunks, rtn_fp16_params
from moe_local.quant.schemes import QType, parse_qtype
from moe_local.quant.tensor import QuantizedTensor

# Shapes: [O, I] weight, [I, O] its transpose (the working layout: a column is a contiguous row),
# [I, I] Hessian and its factors, [n, I] calibration activations, [G, O] per-group params (transposed).
# Legend: O=out features, I=in features, n=tokens, G=groups per row (I / g), g=group size.

INNER_BLOCK = 16  # columns updated eagerly (rank-1) before a small matmul catches up the rest of a block
STAGE_TOKENS = 256  # smaller batches are staged and folded into the Hessian together
TRI_INV_LEAF = 256  # triangular blocks at most this size are inverted by a direct solve
DAMP_RETRIES = 4  # extra attempts, each with 10x the dampening, when a Cholesky factorization fails


class HessianAccumulator:
    """Accumulates the GPTQ Hessian ``H = 2/N * sum_t x_t x_t^T`` of one linear layer's inputs.

    ``H`` is kept as a running mean in float32 on the device of the first batch (later batches are
    moved there), so it stays well scaled however many tokens are seen. Batches smaller than
    ``STAGE_TOKENS`` rows are copied into a staging buffer and folded into ``H`` by one ``addmm_``
    when it fills (or when the Hessian is read), so many small batches (e.g. the few tokens routed to
    one expert per step) cost about as much as one large one; nothing synchronizes with the device.

    Attributes:
        in_features: the input width ``I``.
    """

    def __init__(self, in_features: int) -> None:
        """Create an empty accumulator.

        Args:
            in_features: the input width ``I`` of the layer (> 0).

        Raises:
            ValueError: when ``in_features`` is not a positive int.
        """
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self._count = 0  # tokens folded into _h
        self._h: torch.Tensor | None = None  # [I, I] float32 running mean of 2 x x^T
        self._stage: torch.Tensor | None = None  # [STAGE_TOKENS, I] float32 rows not yet in _h
        self._staged = 0  # rows of _stage in use

    @property
    def count(self) -> int:
        """Number of tokens (rows of ``x``) added so far."""
        return self._count + self._staged

    @property
    def device(self) -> torch.device | None:
        """The device the Hessian lives on (None before the first non-empty ``add``)."""
        return None if self._h is None else self._h.device

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of layer inputs.

        Args:
            x: float activations ``[..., I]`` (e.g. ``[n, I]`` or ``[batch, seq, I]``); every row is a token.

        Raises:
            ValueError: when ``x`` is not a floating-point tensor with last dim ``I``.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point tensor, got {got}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dim {self.in_features} (in features), got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)  # [n, I]
        n = x2.shape[0]
        if n == 0:
            return
        if self._h is None:
            self._h = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        if n >= STAGE_TOKENS:
            self._flush()
            self._fold(x2.to(device=self._h.device, dtype=torch.float32))
            return
        if self._stage is None:
            self._stage = self._h.new_empty(STAGE_TOKENS, self.in_features)
        if self._staged + n > STAGE_TOKENS:
            self._flush()
        self._stage[self._staged : self._staged + n].copy_(x2)  # converts dtype and device
        self._staged += n

    def _fold(self, x2: torch.Tensor) -> None:
        """Fold float32 rows ``[n, I]`` into the running mean."""
        total = self._count + x2.shape[0]
        # H <- H * old / total + 2 / total * x^T x
        self._h.addmm_(x2.T, x2, beta=self._count / total, alpha=2.0 / total)
        self._count = total

    def _flush(self) -> None:
        """Fold the staged rows into the running mean."""
        if self._staged:
            self._fold(self._stage[: self._staged])
            self._staged = 0

    def _hessian_view(self) -> torch.Tensor:
        """The up-to-date Hessian itself (not a copy)."""
        if self._h is None:
            raise ValueError("no calibration tokens: the Hessian accumulator is empty")
        self._flush()
        return self._h

    def hessian(self) -> torch.Tensor:
        """Return the accumulated Hessian.

        Returns:
            ``2/N * X^T X`` ``[I, I]`` float32 (a copy; later ``add`` calls do not change it).

        Raises:
            ValueError: when no calibration tokens were added.
        """
        return self._hessian_view().clone()


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """Run the body with one intra-op CPU thread (no-op off CPU), restoring the thread count after.

    Args:
        device: the device the work runs on.

    Returns:
        A context manager.
    """
    n_threads = torch.get_num_threads()
    if device.type != "cpu" or n_threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def _check_hessian(
    hessian: torch.Tensor | HessianAccumulator | None, n_in: int, device: torch.device
) -> torch.Tensor:
    """Validate the Hessian and return a float32 working copy on ``device``."""
    if hessian is None:
        raise ValueError("no calibration tokens: GPTQ needs a Hessian, got None")
    if isinstance(hessian, HessianAccumulator):
        hessian = hessian._hessian_view()  # the copy below is the only one made
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        got = hessian.dtype if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be a floating-point tensor or a HessianAccumulator, got {got}")
    if tuple(hessian.shape) != (n_in, n_in):
        raise ValueError(
            f"hessian must be [{n_in}, {n_in}] for a weight with I={n_in}, got {tuple(hessian.shape)}"
        )
    h = hessian.to(device=device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("hessian contains NaN or inf values")
    if not bool((h.diagonal() != 0).any()):
        raise ValueError("no calibration tokens: the Hessian is all zero")
    return h


def _upper_triangular_inverse(r: torch.Tensor) -> torch.Tensor:
    """Invert an upper-triangular matrix by recursive 2x2 blocking (about 2x faster than a solve).

    ``[[A, B], [0, D]]^-1 = [[A^-1, -A^-1 B D^-1], [0, D^-1]]``: the work is two matmuls per level.

    Args:
        r: ``[n, n]`` upper-triangular float matrix with a nonzero diagonal.

    Returns:
        ``r^-1`` ``[n, n]``, upper triangular.
    """
    n = r.shape[0]
    if n <= TRI_INV_LEAF:
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        return torch.linalg.solve_triangular(r, eye, upper=True)
    m = n // 2
    out = torch.zeros_like(r)
    a_inv = _upper_triangular_inverse(r[:m, :m])
    d_inv = _upper_triangular_inverse(r[m:, m:])
    out[:m, :m] = a_inv
    out[m:, m:] = d_inv
    torch.mm(torch.mm(a_inv, r[:m, m:]), d_inv, out=out[:m, m:]).neg_()
    return out


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Dampen ``h`` in place and return the upper Cholesky factor ``U`` of its inverse (``H^-1 = U^T U``).

    Args:
        h: float32 ``[I, I]`` Hessian with a positive diagonal (dead inputs already patched).
        damp: dampening as a fraction of the mean diagonal; multiplied by 10 on each retry when a
            factorization fails numerically.

    Returns:
        ``U`` ``[I, I]`` float32, upper triangular.

    Raises:
        ValueError: when the Hessian is not positive definite even after the retries.
    """
    diag = h.diagonal()
    mean_diag = float(diag.mean())
    added = 0.0
    for attempt in range(DAMP_RETRIES + 1):
        target = mean_diag * (damp if attempt == 0 else max(damp, 1e-4) * 10.0**attempt)
        diag.add_(target - added)
        added = target
        # With J the order reversal, J H J = L L^T gives H = R R^T for the upper R = J L J, so
        # H^-1 = R^-T R^-1 and U = R^-1: one factorization and one triangular inverse.
        chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        if int(info) == 0:
            r = chol.flip(0, 1)
            del chol
            return _upper_triangular_inverse(r)
    raise ValueError(
        f"hessian is not positive definite even with dampening {added / mean_diag:.3g} * mean(diag)"
    )


def _gptq_columns(
    w: torch.Tensor,
    h: torch.Tensor,
    qtype: QType,
    damp: float,
    block_size: int,
    act_order: bool,
    record_w_hat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the GPTQ column loop.

    Args:
        w: float weight ``[O, I]`` (validated by ``check_weight``).
        h: float32 Hessian ``[I, I]`` on ``w``'s device (a working copy: modified in place).
        qtype: the scheme (bits and group size).
        damp: dampening fraction of the mean Hessian diagonal.
        block_size: columns per lazy-update block (>= 1).
        act_order: visit columns by decreasing Hessian diagonal, with static group params.
        record_w_hat: also return the reconstruction the error feedback used (for testing).

    Returns:
        ``(codes [O, I] uint8, scales [O, G] fp16, zeros [O, G] fp16, w_hat [O, I] float32 or None)``,
        all in the natural column order.
    """
    o, i = w.shape
    g = qtype.group_size
    qmax = qtype.qmax
    n_groups = i // g
    wt = w.to(torch.float32).T.contiguous()  # [I, O] working copy: row j is weight column j

    dead = h.diagonal() == 0
    if bool(dead.any()):
        h.diagonal()[dead] = 1.0
        wt[dead] = 0.0

    scales_t = torch.empty(n_groups, o, dtype=torch.float32, device=w.device)  # [G, O] fp16 values
    zeros_t = torch.empty(n_groups, o, dtype=torch.float32, device=w.device)  # [G, O] fp16 values
    inv_scales_t = torch.empty(n_groups, o, dtype=torch.float32, device=w.device)  # [G, O] 1 / scale
    if act_order:
        # Static groups: params from the original weights, so visiting order cannot split a group.
        scale, zero = rtn_fp16_params(wt.T.reshape(o, n_groups, g), qmax)  # [O, G, 1]
        scales_t.copy_(scale.view(o, n_groups).T)
        zeros_t.copy_(zero.view(o, n_groups).T)
        torch.reciprocal(scales_t, out=inv_scales_t)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        wt = wt[perm]
        h = h[perm][:, perm]
        col_group = (perm // g).tolist()
    else:
        perm = None
        col_group = [j // g for j in range(i)]
        # A group must start at a block start or lie inside one block, so its columns are current
        # (all pending updates applied) when its params are chosen: use a multiple of g, or a divisor.
        # (g is a power of two, so a power of two below it divides it.)
        block_size = block_size // g * g if block_size >= g else 1 << (block_size.bit_length() - 1)

    u = _inverse_hessian_factor(h, damp)  # [I, I] upper
    del h
    codes_t = torch.empty(i, o, dtype=torch.uint8, device=w.device)  # [I, O]
    w_hat_t = torch.empty(i, o, dtype=torch.float32, device=w.device) if record_w_hat else None
    err_t = torch.empty(min(block_size, i), o, dtype=torch.float32, device=w.device)  # [B, O]
    q = torch.empty(o, dtype=torch.float32, device=w.device)
    w_hat = torch.empty_like(q)

    for b in range(0, i, block_size):
        e = min(b + block_size, i)
        with _single_thread(w.device):  # small ops: a second thread only adds synchronization stalls
            for s in range(b, e, INNER_BLOCK):
                se = min(s + INNER_BLOCK, e)
                for j in range(s, se):
                    k = col_group[j]
                    if not act_order and j % g == 0:
                        wg = wt[j : j + g].T.unsqueeze(1)  # [O, 1, g] the group's current weights
                        scale, zero = rtn_fp16_params(wg, qmax)  # [O, 1, 1]
                        scales_t[k], zeros_t[k] = scale.view(o), zero.view(o)
                        torch.reciprocal(scales_t[k], out=inv_scales_t[k])
                    col = wt[j]  # [O]
                    scale, zero = scales_t[k], zeros_t[k]
                    # Same arithmetic as rtn.assign_codes and QuantizedTensor.dequantize_rows.
                    torch.mul(col, inv_scales_t[k], out=q).add_(zero).round_().clamp_(0, qmax)
                    codes_t[j].copy_(q)
                    torch.sub(q, zero, out=w_hat).mul_(scale)
                    if w_hat_t is not None:
                        w_hat_t[j] = w_hat
                    err = torch.sub(col, w_hat, out=err_t[j - b]).div_(u[j, j])
                    if j + 1 < se:
                        wt[j + 1 : se].addr_(u[j, j + 1 : se], err, alpha=-1.0)
                if se < e:
                    wt[se:e].addmm_(u[s:se, se:e].T, err_t[s - b : se - b], alpha=-1.0)
        if e < i:
            wt[e:].addmm_(u[b:e, e:].T, err_t[: e - b], alpha=-1.0)

    if perm is not None:
        inv = torch.argsort(perm)
        codes_t = codes_t[inv]
        if w_hat_t is not None:
            w_hat_t = w_hat_t[inv]
    scales = scales_t.T.to(torch.float16).contiguous()
    zeros = zeros_t.T.to(torch.float16).contiguous()
    w_hat_out = None if w_hat_t is None else w_hat_t.T.contiguous()
    return codes_t.T.contiguous(), scales, zeros, w_hat_out


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | HessianAccumulator | None,
    qtype: QType | str,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedTensor:
    """Quantize a weight matrix with GPTQ, minimizing the output error on the calibration inputs.

    Args:
        w: float weight ``[O, I]`` (any float dtype); ``I`` must be divisible by the group size. The
            work runs in float32 on ``w``'s device.
        hessian: ``[I, I]`` Hessian of the layer inputs, ``2/N * X^T X`` (e.g.
            ``HessianAccumulator.hessian()``), or the accumulator itself (saves one ``[I, I]`` copy).
            Inputs whose diagonal entry is 0 (never active) are quantized as if their weights were 0.
        qtype: a ``QType`` or a scheme name such as ``"int4-g64"``; its method is ignored and kept as
            given on the result.
        damp: dampening added to the Hessian diagonal, as a fraction of its mean (> 0 keeps ``H``
            invertible); multiplied by 10, up to 4 times, if a Cholesky factorization still fails.
        block_size: columns per lazy-update block; a speed knob only (the result is the same up to
            float rounding). In natural order it is rounded down to a multiple of the group size (or
            to a power of two below it) so groups never straddle blocks.
        act_order: visit columns by decreasing Hessian diagonal; group params are then fixed from the
            original weights before the loop ("static groups"). Codes and groups are stored in the
            natural column order either way.

    On CPU the sequential column loop runs with one intra-op thread (``torch.set_num_threads(1)``,
    restored afterwards): its ops are too small to gain from more, and under CPU contention the
    per-op thread synchronization made it up to 10x slower. The large matmuls use all threads.

    Returns:
        The quantized tensor, on ``w``'s device; ``dequantize()`` is exactly the reconstruction the
        algorithm's error feedback used.

    Raises:
        ValueError: on no calibration tokens (``hessian`` None, empty or all zero), a Hessian of the
            wrong shape or with NaN/inf, a malformed weight or NaN/inf weights, an unsupported scheme,
            or bad ``damp`` / ``block_size``.
    """
    qt = parse_qtype(qtype) if isinstance(qtype, str) else qtype
    if not isinstance(qt, QType):
        raise ValueError(f"qtype must be a QType or a scheme name, got {type(qtype).__name__}")
    o, i = check_weight(w, qt.group_size)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (0.0 <= damp < math.inf):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    h = _check_hessian(hessian, i, w.device)

    codes, scales, zeros, _ = _gptq_columns(w, h, qt, float(damp), block_size, bool(act_order))
    packed = torch.cat(
        [pack_codes(codes[start:end], qt.bits) for start, end in row_chunks(o, i, DEFAULT_CHUNK_ELEMS)]
    )
    return QuantizedTensor(packed, scales, zeros, (o, i), qt)
