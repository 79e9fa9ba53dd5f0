"""``QuantLinear``: a drop-in ``nn.Linear`` replacement backed by a ``QuantizedTensor``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_local.quant.api import quantize
from moe_local.quant.hqq import HqqConfig
from moe_local.quant.schemes import QType, parse_qtype
from moe_local.quant.tensor import TENSOR_NAMES, QuantizedTensor

# Shapes: [..., I] input, [..., O] output.  I=in features, O=out features.


class QuantLinear(nn.Module):
    """``y = x @ W_hat.T + bias`` with ``W_hat`` stored quantized.

    The packed codes, scales, zeros and the bias are buffers, so ``state_dict()``,
    ``load_state_dict()`` and ``.to()`` work as for any module; ``qtype`` and the shape are
    constructor arguments (they fix the buffers' shapes).

    Attributes:
        in_features: ``I``.
        out_features: ``O``.
        qtype: the quantization scheme.
        use_kernel: passed to ``QuantizedTensor.linear`` (None: automatic choice).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, qtensor: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        """Wrap a quantized weight.

        Args:
            qtensor: the quantized weight ``[O, I]``.
            bias: optional ``[O]`` float bias (kept in its dtype).

        Raises:
            ValueError: when ``bias`` is not a float tensor of shape ``[O]``.
        """
        super().__init__()
        self.out_features, self.in_features = qtensor.shape
        self.qtype = qtensor.qtype
        self.use_kernel: bool | None = None
        if bias is not None and not (
            isinstance(bias, torch.Tensor)
            and bias.is_floating_point()
            and tuple(bias.shape) == (self.out_features,)
        ):
            raise ValueError(f"bias must be a float tensor of shape ({self.out_features},)")
        for name, t in qtensor.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._cached: tuple[tuple[tuple[int, int, int], ...], QuantizedTensor] | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, qtype: QType | str, *, hqq_config: HqqConfig | None = None
    ) -> QuantLinear:
        """Quantize an ``nn.Linear``'s weight; its bias is kept unquantized.

        Args:
            linear: the layer to replace.
            qtype: a ``QType`` or a scheme name such as ``"int4-g64"``.
            hqq_config: optimization parameters when the scheme's method is ``hqq``.

        Returns:
            The quantized layer on the linear's device.

        Raises:
            ValueError: when ``linear`` is not an ``nn.Linear`` or its weight cannot be quantized.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        qt = parse_qtype(qtype) if isinstance(qtype, str) else qtype
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantize(weight, qt, hqq_config=hqq_config), bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # Module.to(dtype) / .half() / .bfloat16() cast every float buffer; scales and zeros must stay
        # fp16, so they only follow device moves (the bias is cast like nn.Linear's).
        kept = {name: getattr(self, name) for name in ("scales", "zeros")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != torch.float16:
                setattr(self, name, old.to(new.device))
        return self

    def quantized(self) -> QuantizedTensor:
        """View the current buffers as a ``QuantizedTensor``.

        Returns:
            A cached ``QuantizedTensor`` sharing the buffers, rebuilt (with a fresh kernel cache)
            whenever a buffer is replaced or modified in place, e.g. by ``load_state_dict``.
        """
        bufs = (self.packed, self.scales, self.zeros)
        key = tuple((t.data_ptr(), t._version, t.device.index or 0) for t in bufs)
        if self._cached is None or self._cached[0] != key:
            tensors = dict(zip(TENSOR_NAMES, bufs, strict=True))
            qt = QuantizedTensor.from_tensors(tensors, (self.out_features, self.in_features), self.qtype)
            self._cached = (key, qt)
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
            f"bias={self.bias is not None}, qtype={self.qtype}"
        )
