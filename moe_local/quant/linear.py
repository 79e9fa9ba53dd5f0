"""``QuantLinear``: a drop-in ``nn.Linear`` replacement backed by any ``QuantizedWeight``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moe_local.quant.base import QuantizedWeight, Scheme
from moe_local.quant.registry import quantize_scheme

# Shapes: [..., I] input, [..., O] output.  I=in features, O=out features.


class QuantLinear(nn.Module):
    """``y = x @ W_hat.T + bias`` with ``W_hat`` stored quantized (inference).

    The weight's stored tensors (``tensors()``: ``packed``/``scales``/``zeros`` for group-wise
    schemes, ``weight``/``absmax``/... for bitsandbytes) and the bias are buffers, so
    ``state_dict()``, ``load_state_dict()`` and ``.to()`` work as for any module; the scheme and the
    shape are constructor arguments (they fix the buffers' shapes). Dtype casts (``.half()``,
    ``.to(dtype)``) only reach the bias: the quantization statistics keep their dtypes.

    Attributes:
        in_features: ``I``.
        out_features: ``O``.
        scheme: the quantization scheme (a ``QType``, a ``BnbType``, ...); ``qtype`` reads it too.
        use_kernel: passed to the weight's ``linear`` (None: automatic choice).
    """

    bias: torch.Tensor | None

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        """Wrap a quantized weight.

        Args:
            weight: the quantized weight ``[O, I]`` (kept: ``quantized()`` returns it until a buffer
                changes).
            bias: optional ``[O]`` float bias (kept in its dtype).

        Raises:
            ValueError: when ``weight`` is not a ``QuantizedWeight`` or ``bias`` is not a float ``[O]``
                tensor.
        """
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise ValueError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.scheme = weight.scheme
        self.use_kernel: bool | None = None
        if bias is not None and not (
            isinstance(bias, torch.Tensor)
            and bias.is_floating_point()
            and tuple(bias.shape) == (self.out_features,)
        ):
            raise ValueError(f"bias must be a float tensor of shape ({self.out_features},)")
        tensors = weight.tensors()
        self._names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._weight_type = type(weight)
        self._cached: tuple[tuple[tuple[int, int, str], ...], QuantizedWeight] = (self._key(), weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme | str, **options: Any) -> QuantLinear:
        """Quantize an ``nn.Linear``'s weight; its bias is kept unquantized.

        Args:
            linear: the layer to replace.
            scheme: a ``QType``, a ``BnbType`` or a scheme name such as ``"int4-g64"`` or ``"nf4"``.
            **options: passed to the scheme's quantizer, e.g. ``hqq_config=HqqConfig(...)`` when the
                scheme's method is ``hqq``.

        Returns:
            The quantized layer on the linear's device.

        Raises:
            ValueError: when ``linear`` is not an ``nn.Linear`` or its weight cannot be quantized.
            BitsandbytesNotInstalledError: for a bitsandbytes scheme without bitsandbytes.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantize_scheme(linear.weight.detach(), scheme, **options), bias)

    @property
    def qtype(self) -> Scheme:
        """The quantization scheme (the same object as ``scheme``)."""
        return self.scheme

    def _key(self) -> tuple[tuple[int, int, str], ...]:
        bufs = [getattr(self, name) for name in self._names]
        return tuple((t.data_ptr(), t._version, str(t.device)) for t in bufs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # Module.to(dtype) / .half() / .bfloat16() cast every float buffer; the quantization
        # statistics (fp16 scales and zeros, fp32 absmax, ...) only follow device moves (the bias is
        # cast like nn.Linear's).
        kept = {name: getattr(self, name) for name in self._names if getattr(self, name).is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def quantized(self) -> QuantizedWeight:
        """View the current buffers as the quantized weight.

        Returns:
            The weight sharing the buffers, rebuilt (with a fresh kernel cache) whenever a buffer is
            replaced or modified in place, e.g. by ``load_state_dict`` or ``.to(device)``.
        """
        key = self._key()
        if self._cached[0] != key:
            tensors = {name: getattr(self, name) for name in self._names}
            shape = (self.out_features, self.in_features)
            self._cached = (key, self._weight_type.from_tensors(tensors, shape, self.scheme))
        return self._cached[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the weight.

        Args:
            dtype: output float dtype.

        Returns:
            ``W_hat`` ``[O, I]`` in ``dtype``.
        """
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: ``[..., I]`` float activations.

        Returns:
            ``[..., O]`` in ``x.dtype``.
        """
        return self.quantized().linear(x, self.bias, use_kernel=self.use_kernel)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, qtype={self.scheme.full_name}"
        )
