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

    The module holds the weight itself, not its tensors as buffers, so that a weight whose kernel
    layout replaced its codes (``QuantizedTensor``) stays one copy in memory. ``state_dict()``,
    ``load_state_dict()`` and ``.to()`` still see the weight's stored tensors under their names
    (``packed``/``scales``/``zeros`` for group-wise schemes, ``weight``/``absmax``/... for
    bitsandbytes), and so does attribute access (``module.packed``); the bias is a buffer. The scheme
    and the shape are constructor arguments (they fix the tensors' shapes). Dtype casts (``.half()``,
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
            weight: the quantized weight ``[O, I]`` (kept: ``quantized()`` returns it until it is
                replaced by ``load_state_dict`` or a device move).
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
        self._names = tuple(weight.tensors())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._set_weight(weight)

    def __getattr__(self, name: str) -> Any:
        # the weight's stored tensors read like the buffers they once were (module.packed)
        names = self.__dict__.get("_names", ())
        if name in names:
            return self.__dict__["_weight"].tensors()[name]
        return super().__getattr__(name)

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

    def _key(self) -> tuple[tuple[int, int, torch.device], ...]:
        return tuple((t.data_ptr(), t._version, t.device) for t in self._weight.held_tensors())

    def _set_weight(self, weight: QuantizedWeight) -> None:
        self._weight = weight
        self._seen = self._key()

    def _rebuild(self, tensors: dict[str, torch.Tensor]) -> None:
        shape = (self.out_features, self.in_features)
        self._set_weight(type(self._weight).from_tensors(tensors, shape, self.scheme))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # Module.to(dtype) / .half() / .bfloat16() cast every float tensor; the quantization
        # statistics (fp16 scales and zeros, fp32 absmax, ...) only follow device moves (the bias is
        # cast like nn.Linear's). A call that changes no tensor (.to() where they are) keeps the
        # weight, and so its kernel layout.
        super()._apply(fn, recurse)
        tensors = self.quantized().tensors()
        moved = {}
        for name, t in tensors.items():
            new = fn(t)
            if t.is_floating_point() and new.dtype != t.dtype:
                new = t.to(new.device)
            moved[name] = new
        if any(moved[name] is not t for name, t in tensors.items()):
            self._rebuild(moved)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name, t in self.quantized().tensors().items():
            destination[prefix + name] = t if keep_vars else t.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        keys = {name: prefix + name for name in self._names}
        found = {name: state_dict[key] for name, key in keys.items() if key in state_dict}
        if strict:
            missing_keys.extend(key for name, key in keys.items() if name not in found)
        if found and len(found) < len(keys):
            error_msgs.append(f"{prefix or 'QuantLinear '}needs all of {', '.join(self._names)} together")
        elif found:
            if local_metadata.get("assign_to_params_buffers", False):
                tensors = {n: t.detach() for n, t in found.items()}
            else:  # like Module's copy into its buffers: its own memory, on its device, in its dtypes
                now = self.quantized().tensors()
                tensors = {n: t.detach().to(now[n].device, now[n].dtype, copy=True) for n, t in found.items()}
            try:
                self._rebuild(tensors)
            except ValueError as exc:
                error_msgs.append(f"{prefix or 'QuantLinear '}does not match its scheme: {exc}")
        rest = {k: v for k, v in state_dict.items() if k not in keys.values()}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def quantized(self) -> QuantizedWeight:
        """The quantized weight.

        Returns:
            The weight (with its kernel cache), rebuilt (with a fresh kernel cache) whenever
            ``load_state_dict`` loads new tensors, ``.to(device)`` moves them or one of the tensors it
            holds is modified in place (``module.scales.mul_(2)``).
        """
        if self._key() != self._seen:
            self._rebuild(self._weight.tensors())
        return self._weight

    def prepare_kernel(self, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Build the weight's CPU kernel layout now (see ``QuantizedWeight.prepare_kernel``).

        Args:
            dtype: the activations' dtype.

        Returns:
            True when the weight will run on a kernel for ``dtype``.
        """
        ready = self.quantized().prepare_kernel(dtype)
        self._seen = self._key()  # the weight's own conversion, not a change from outside
        return ready

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
        weight = self.quantized()
        layouts = len(weight._kernel)
        out = weight.linear(x, self.bias, use_kernel=self.use_kernel)
        if len(weight._kernel) != layouts:  # a first kernel call replaced the codes by their layout
            self._seen = self._key()
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, qtype={self.scheme.full_name}"
        )
