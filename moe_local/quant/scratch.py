"""Each computing thread's reused buffers (float32, bf16) for weight rows converted just before a matmul.

The many-row (prefill) paths dequantize or widen a block of weight rows at a time and multiply at
once. A fresh multi-MiB buffer per block costs page faults, which once a model was loaded cost
more than the conversion itself (3 ms against 0.3 ms per 1M weights on the 2-core machine); one
buffer per thread, grown when needed, costs them once.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def float32_rows(rows: int, cols: int, min_elems: int = 0) -> torch.Tensor:
    """A contiguous float32 ``[rows, cols]`` view of this thread's buffer (its contents undefined).

    The view is valid until the thread's next call: use it for one matmul, then let it go.

    Args:
        rows: rows of the view.
        cols: columns of the view.
        min_elems: size the buffer to at least this many elements when it must grow.

    Returns:
        The view.
    """
    return _rows("buf", torch.float32, rows, cols, min_elems)


def bf16_rows(rows: int, cols: int, min_elems: int = 0) -> torch.Tensor:
    """``float32_rows`` for bfloat16: a second buffer, so a block can be converted from the first."""
    return _rows("buf16", torch.bfloat16, rows, cols, min_elems)


def _rows(name: str, dtype: torch.dtype, rows: int, cols: int, min_elems: int) -> torch.Tensor:
    n = rows * cols
    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < n:
        # a normal tensor even when first needed under inference_mode: an inference tensor could
        # not be written in place by a later call outside it
        with torch.inference_mode(False):
            buf = torch.empty(max(n, min_elems), dtype=dtype)
            setattr(_local, name, buf)
    return buf[:n].view(rows, cols)
