"""A restricted unpickler for xAI's Grok-1 release: numpy arrays and ``QuantizedWeight8bit``, nothing else.

Each ``ckpt-0/tensorNNNNN_000`` file of the release is one pickled numpy array, or one
``QuantizedWeight8bit`` (an int8 ``weight`` and its ``scales``). Unpickling normally imports and
calls whatever the file names; here every global is looked up in a fixed table of stand-ins that
only collect data (shape, dtype, bytes), so a file can build nothing else: any other global, an
object array or a big-endian one is refused in one line. numpy itself is never imported.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_local.errors import CheckpointError

# numpy's dtype codes -> torch (the kinds a JAX checkpoint holds)
_CODES = {
    "f4": torch.float32,
    "f2": torch.float16,
    "f8": torch.float64,
    "i1": torch.int8,
    "u1": torch.uint8,
    "i2": torch.int16,
    "i4": torch.int32,
    "i8": torch.int64,
    "b1": torch.bool,
}
_BFLOAT16 = "bfloat16"  # ml_dtypes' scalar type, by name: JAX's bf16 arrays pickle through it


class _BFloat16Type:
    """Stands in for ``ml_dtypes.bfloat16`` (the type a bf16 dtype pickles with)."""


class _Dtype:
    """Stands in for ``numpy.dtype``: keeps the code and the byte order of its pickled state."""

    def __init__(self, spec, align=False, copy=True) -> None:
        if spec is _BFloat16Type:
            self.torch = torch.bfloat16
        elif isinstance(spec, str) and spec.lstrip("<>|=") in _CODES:
            self.torch = _CODES[spec.lstrip("<>|=")]
        else:
            raise CheckpointError(f"an array of dtype {spec!r}: not a numeric dtype of the Grok-1 release")
        self.order = "<"

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str):
            self.order = state[1]


class _Array:
    """Stands in for ``numpy.ndarray``: its pickled state becomes a torch tensor (``tensor``)."""

    def __init__(self, *args) -> None:
        self.tensor: torch.Tensor | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CheckpointError("an array in an unknown pickle layout")
        _, shape, dtype, fortran, data = state
        if not isinstance(dtype, _Dtype) or not isinstance(data, bytes | bytearray):
            raise CheckpointError("an array of objects: refused (only numeric arrays are read)")
        if dtype.order == ">":
            raise CheckpointError("a big-endian array: not the Grok-1 release's layout")
        shape = tuple(int(d) for d in shape)
        flat = (
            torch.frombuffer(bytearray(data), dtype=dtype.torch)
            if data
            else torch.empty(0, dtype=dtype.torch)
        )
        if flat.numel() != _numel(shape):
            raise CheckpointError(f"an array of shape {list(shape)} holds {flat.numel()} values")
        self.tensor = (
            flat.reshape(shape[::-1]).permute(*reversed(range(len(shape))))
            if fortran
            else flat.reshape(shape)
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _reconstruct(cls, shape, typecode) -> _Array:
    if cls is not _Array:
        raise CheckpointError("an array subclass: refused")
    return _Array()


@dataclass
class QuantizedWeight8bit:
    """The release's quantized weight: ``weight`` (int8) times ``scales``, broadcast."""

    weight: object = None
    scales: object = None

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise CheckpointError("a QuantizedWeight8bit without exactly weight and scales")
        self.weight, self.scales = state["weight"], state["scales"]


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _Array,
    ("numpy", "dtype"): _Dtype,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
    ("model", "QuantizedWeight8bit"): QuantizedWeight8bit,
    **{
        (m, _BFLOAT16): _BFloat16Type
        for m in ("ml_dtypes", "ml_dtypes._ml_dtypes", "ml_dtypes._custom_floats")
    },
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise CheckpointError(
                f"the pickle names {module}.{name}: only arrays and QuantizedWeight8bit are read"
            )
        return found

    def persistent_load(self, pid):
        raise CheckpointError("the pickle refers to a persistent object: refused")


def _tensor(obj, where: Path) -> torch.Tensor:
    if isinstance(obj, _Array) and obj.tensor is not None:
        return obj.tensor
    raise CheckpointError(f"{where}: expected an array")


@dataclass
class ReleaseTensor:
    """One file's tensor, dequantized on demand (a whole expert stack would be 4x its int8 size).

    Attributes:
        values: the array, or a quantized weight's int8 codes.
        scales: a quantized weight's scales (broadcast against ``values``), else None.
    """

    values: torch.Tensor
    scales: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def get(self, index: int | None = None) -> torch.Tensor:
        """The float32 values, or those of ``index`` along the first dimension (one expert)."""
        if self.scales is None:
            v = self.values if index is None else self.values[index]
            return v.float()
        if index is None:
            return self.values.float() * self.scales.float()
        s = self.scales[0] if self.scales.shape[0] == 1 else self.scales[index]  # 1: shared by all
        return self.values[index].float() * s.float()


def load_tensor(path: Path) -> ReleaseTensor:
    """Read one release file: an array, or a quantized weight (int8 codes and their scales).

    Raises:
        CheckpointError: unreadable, not an array or quantized weight, or scales that do not broadcast.
    """
    try:
        with open(path, "rb") as f:
            obj = _Unpickler(f).load()
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, QuantizedWeight8bit):
        weight, scales = _tensor(obj.weight, path), _tensor(obj.scales, path)
        try:
            torch.broadcast_shapes(weight.shape, scales.shape)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path}: scales {list(scales.shape)} do not fit weight {list(weight.shape)}"
            ) from exc
        if scales.dim() != weight.dim():
            raise CheckpointError(
                f"{path}: scales {list(scales.shape)} do not fit weight {list(weight.shape)}"
            )
        return ReleaseTensor(weight, scales)
    return ReleaseTensor(_tensor(obj, path))
