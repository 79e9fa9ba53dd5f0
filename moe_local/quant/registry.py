"""The scheme registry: which ``SchemeKind`` parses, quantizes and rebuilds a scheme.

Built in, in the order ``parse_scheme`` tries them: group-wise integer (``QType``: ``int4-g64``,
``int3-g64-hqq``, ``int4-g128-gptq``) and bitsandbytes (``BnbType``: ``nf4``, ``fp4-b128``, ``nf4-dq``,
``int8``) and MXFP4 (``Mxfp4Type``: ``mxfp4``). ``register_scheme`` adds a kind; a scheme object
finds its kind by its type.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_local.quant.base import QuantizedWeight, Scheme, SchemeKind
from moe_local.quant.bnb import BITSANDBYTES
from moe_local.quant.groupwise import GROUPWISE
from moe_local.quant.mxfp4_tensor import MXFP4

# Shapes: [O, I] weight.  O=out features, I=in features.

_KINDS: list[SchemeKind] = [GROUPWISE, BITSANDBYTES, MXFP4]


def register_scheme(kind: SchemeKind) -> None:
    """Add a scheme kind; ``parse_scheme`` tries it after the ones registered before.

    Args:
        kind: the kind, whose ``name`` and ``scheme_type`` no registered kind has.

    Raises:
        ValueError: when ``kind`` is not a ``SchemeKind`` or clashes with a registered one.
    """
    if not isinstance(kind, SchemeKind):
        raise ValueError(f"register_scheme needs a SchemeKind, got {type(kind).__name__}")
    for known in _KINDS:
        if known.name == kind.name or known.scheme_type is kind.scheme_type:
            raise ValueError(f"scheme kind {kind.name!r} clashes with the registered {known.name!r}")
    _KINDS.append(kind)


def scheme_kinds() -> tuple[SchemeKind, ...]:
    """The registered kinds, in the order ``parse_scheme`` tries them."""
    return tuple(_KINDS)


def kind_of(scheme: Any) -> SchemeKind:
    """The kind a scheme object belongs to (by its type or the nearest registered base class).

    Args:
        scheme: a scheme object such as a ``QType`` or a ``BnbType``.

    Returns:
        Its registered kind.

    Raises:
        ValueError: when no registered kind has that type.
    """
    by_type = {kind.scheme_type: kind for kind in _KINDS}
    for cls in type(scheme).__mro__:
        if cls in by_type:
            return by_type[cls]
    names = ", ".join(kind.scheme_type.__name__ for kind in _KINDS)
    raise ValueError(f"scheme must be a {names} or a scheme name, got {type(scheme).__name__}")


def parse_scheme(text: str) -> Scheme:
    """Parse a stored scheme name: ``int4-g64[-hqq|-gptq]``, ``nf4``/``fp4-b128``/``int8``, ``mxfp4``.

    Args:
        text: the name; each registered kind's parser is tried in turn.

    Returns:
        The scheme of the first kind that reads it (a ``QType`` or a ``BnbType`` for the built-ins).

    Raises:
        ValueError: the name is none of them (the first kind's message, which names the usual form).
    """
    errors: list[ValueError] = []
    for kind in _KINDS:
        try:
            return kind.parse(text)
        except ValueError as exc:
            errors.append(exc)
    raise errors[0] from None  # the built-in kinds are always registered: never empty


def as_scheme(scheme: Any) -> Scheme:
    """A scheme object from itself or its name.

    Args:
        scheme: a registered kind's scheme object, or a name ``parse_scheme`` reads.

    Returns:
        The scheme object.

    Raises:
        ValueError: when ``scheme`` is neither.
    """
    if isinstance(scheme, str):
        return parse_scheme(scheme)
    kind_of(scheme)
    return scheme


def quantize_scheme(w: torch.Tensor, scheme: Any, **options: Any) -> QuantizedWeight:
    """Quantize ``w`` [O, I] with any registered scheme.

    Args:
        w: float weight ``[O, I]``.
        scheme: a ``QType`` (rtn/hqq), a ``BnbType`` (bitsandbytes), another registered scheme, or a name.
        **options: passed to the kind's quantizer, e.g. ``hqq_config=HqqConfig(...)`` for group-wise hqq.

    Returns:
        The quantized weight on ``w``'s device.

    Raises:
        ValueError: on an unknown scheme or a weight the scheme cannot quantize.
    """
    scheme = as_scheme(scheme)
    return kind_of(scheme).quantize(w, scheme, **options)


def rebuild(tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: Any) -> QuantizedWeight:
    """Rebuild a quantized weight of ``scheme`` from its ``tensors()``.

    Args:
        tensors: what the weight's ``tensors()`` returned.
        shape: ``(O, I)``.
        scheme: the scheme object or its name.

    Returns:
        The weight (sharing memory with ``tensors``).

    Raises:
        ValueError: on an unknown scheme or tensors that do not fit it.
    """
    scheme = as_scheme(scheme)
    return kind_of(scheme).rebuild(tensors, shape, scheme)
