"""``QuantizedWeight``: the contract every quantized weight matrix keeps, and ``SchemeKind``.

A quantized weight ``[O, I]`` is a handful of named tensors plus two pieces of JSON-able metadata,
its ``shape`` and its ``scheme`` (whose ``full_name`` the registry parses back), so every kind can
live in the same blobs and be rebuilt with ``from_tensors``. It computes ``x @ W_hat.T + bias`` with
``linear`` and may build a kernel layout of itself on first use or on ``prepare_kernel``
(``kernel_cache_nbytes``), which may replace its stored tensors in memory (``nbytes``).

A ``SchemeKind`` ties one family of schemes (``QType``, ``BnbType``) to its parser, its quantizer
and its ``QuantizedWeight`` implementation; ``moe_local.quant.registry`` holds the kinds.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, Self

import torch

# Shapes: [O, I] weight, [..., I] activations, [..., O] outputs.  O=out features, I=in features.


class Scheme(Protocol):
    """What every scheme object offers (``QType``, ``BnbType``); schemes are frozen dataclasses."""

    @property
    def bits(self) -> int:
        """Bits per stored code."""
        ...

    @property
    def full_name(self) -> str:
        """The name the kind's parser reads back, e.g. ``"int4-g64"`` or ``"nf4-dq"``."""
        ...


def check_shape(shape: Any) -> tuple[int, int]:
    """Validate a weight shape ``(O, I)``.

    Args:
        shape: any sequence of two positive integers.

    Returns:
        ``(O, I)`` as Python ints.

    Raises:
        ValueError: when ``shape`` is not two positive ints.
    """
    shape = tuple(shape)
    if len(shape) != 2 or any(not isinstance(d, numbers.Integral) or d <= 0 for d in shape):
        raise ValueError(f"shape must be two positive ints (out, in), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class QuantizedWeight(ABC):
    """A weight ``[O, I]`` stored quantized, with its dequantization and its matmul.

    Implementations define ``scheme``, ``tensors``, ``from_tensors``, ``dequantize`` and ``linear``;
    device moves, pinning and byte counts follow from ``tensors`` / ``from_tensors`` here. Kernel
    caches live in the ``_kernel`` dict each implementation creates, so that moves and rebuilds
    never carry them over.

    Attributes:
        shape: ``(O, I)``.
    """

    shape: tuple[int, int]
    _kernel: dict[Any, Any]

    @property
    @abstractmethod
    def scheme(self) -> Scheme:
        """The scheme the weight was quantized with (``from_tensors`` takes it back)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Name the stored tensors for serialization.

        Returns:
            The tensors (not copies), all on one device; ``from_tensors`` takes exactly these keys.
        """

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: Any) -> Self:
        """Rebuild a weight from ``tensors()`` output.

        Args:
            tensors: exactly the keys ``tensors()`` returns for ``scheme``.
            shape: ``(O, I)``.
            scheme: the scheme the tensors were made with.

        Returns:
            The weight (sharing memory with ``tensors``), with an empty kernel cache.

        Raises:
            ValueError: on missing or extra keys, or tensors of the wrong dtype, shape or device.
        """

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the whole weight.

        Args:
            dtype: output float dtype.

        Returns:
            ``W_hat`` ``[O, I]`` in ``dtype``.
        """

    @abstractmethod
    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, *, use_kernel: bool | None = None
    ) -> torch.Tensor:
        """Compute ``x @ W_hat.T + bias``.

        Args:
            x: activations ``[..., I]`` (float dtype, same device as the weight).
            bias: optional ``[O]``.
            use_kernel: None: the implementation's automatic choice; True: its fast kernel where it
                has one; False: the dequantize path.

        Returns:
            ``[..., O]`` in ``x.dtype``.

        Raises:
            ValueError: when ``x`` is not a float tensor with last dim ``I`` or ``bias`` is not ``[O]``.
        """

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return next(iter(self.tensors().values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors this weight holds (excludes any kernel cache).

        ``nbytes + kernel_cache_nbytes`` is what the weight keeps in memory: an implementation whose
        kernel layout replaces some stored tensors counts those in ``kernel_cache_nbytes`` only.
        """
        return sum(_nbytes(t) for t in self.held_tensors())

    def held_tensors(self) -> list[torch.Tensor]:
        """The stored tensors this weight holds now (``tensors()`` may rebuild others on demand).

        Returns:
            The tensors (not copies); all of ``tensors()`` unless a kernel layout replaced some.
        """
        return list(self.tensors().values())

    def _kernel_cache_tensors(self) -> Iterable[torch.Tensor]:
        """The tensors of the kernel cache that count towards ``kernel_cache_nbytes``."""
        return [v for v in self._kernel.values() if isinstance(v, torch.Tensor)]

    @property
    def kernel_cache_nbytes(self) -> int:
        """Bytes held by the kernel-layout cache that ``linear`` builds (0 before any kernel call)."""
        return sum(_nbytes(t) for t in self._kernel_cache_tensors())

    def clear_kernel_cache(self) -> None:
        """Drop the kernel-layout copy of the weight built by ``linear``."""
        self._kernel.clear()

    def prepare_kernel(self, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Build the kernel layout ``linear`` would build on its first call with ``dtype`` inputs, now.

        Args:
            dtype: the activations' dtype.

        Returns:
            True when the weight will run on a kernel for ``dtype`` (the default: False, nothing done).
        """
        return False

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Self:
        """Return a copy on ``device`` (``self`` when already there); kernel caches are not carried over.

        Args:
            device: the target device.
            non_blocking: passed to ``Tensor.to``: asynchronous when copying from pinned host memory
                to an accelerator (the caller synchronizes before the source is reused).

        Returns:
            The weight on ``device``.
        """
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()}
        return type(self).from_tensors(moved, self.shape, self.scheme)

    def is_pinned(self) -> bool:
        """Whether every stored tensor is in page-locked host memory (False off the CPU)."""
        return self.device.type == "cpu" and all(t.is_pinned() for t in self.tensors().values())

    def pin_memory(self) -> Self:
        """Return a copy in page-locked host memory, so device copies can run asynchronously.

        Pinning needs CUDA: without it (and for weights that are not on the CPU, or already pinned)
        this returns ``self`` unchanged. The kernel cache is not carried over to the copy.

        Returns:
            The pinned weight, or ``self``.
        """
        if self.device.type != "cpu" or not torch.cuda.is_available() or self.is_pinned():
            return self
        pinned = {name: t.pin_memory() for name, t in self.tensors().items()}
        return type(self).from_tensors(pinned, self.shape, self.scheme)

    def _check_linear_args(self, x: Any, bias: Any) -> None:
        """Validate ``linear``'s arguments against the weight's shape (one-line ValueErrors)."""
        o, i = self.shape
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point tensor, got {got}")
        if x.dim() == 0 or x.shape[-1] != i:
            raise ValueError(f"x must have last dim {i} (in features), got shape {tuple(x.shape)}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (o,)):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({o},), got {got}")


@dataclass(frozen=True)
class SchemeKind:
    """One family of quantization schemes, as ``moe_local.quant.registry`` knows it.

    Attributes:
        name: a short label, e.g. ``"group-wise"`` or ``"bitsandbytes"``.
        scheme_type: the class of its scheme objects (``QType``, ``BnbType``).
        weight_type: its ``QuantizedWeight`` implementation; ``rebuild`` is its ``from_tensors``.
        parse: scheme name -> scheme; raises ValueError for names that are not of this kind.
        quantize: ``quantize(w, scheme, **options)`` -> weight, for a float ``w`` ``[O, I]``; raises
            ValueError on a weight or option it cannot take.
    """

    name: str
    scheme_type: type
    weight_type: type[QuantizedWeight]
    parse: Callable[[str], Scheme]
    quantize: Callable[..., QuantizedWeight]

    def rebuild(
        self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: Any
    ) -> QuantizedWeight:
        """Rebuild a weight of this kind from its ``tensors()`` (see ``QuantizedWeight.from_tensors``)."""
        return self.weight_type.from_tensors(tensors, shape, scheme)
