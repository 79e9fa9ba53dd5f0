"""Build a transformers model with its parameters on the meta device (no weight memory)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moe_local.errors import MoeLocalError, UnsupportedModelError
from moe_local.loading.validate import REMOTE_CODE, build_error
from moe_local.models import register_families

_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.randn, torch.rand}
_BIG = 1 << 16  # elements: weights this size or larger are created on meta, never allocated
SWITCH = "switch_transformers"  # encoder-decoder, no causal-LM class: built from moe_local.models.switch


def _numel(args: tuple) -> int:
    dims = args[0] if args and isinstance(args[0], tuple | list | torch.Size) else args
    n = 1
    for d in dims:
        if not isinstance(d, int):
            return 0
        n *= d
    return n


class _BigTensorsOnMeta(TorchFunctionMode):
    """Creates large factory tensors (weights being built) on meta; small ones (rotary tables) stay real.

    Constructors allocate every weight before it is registered; without this, building a model
    would touch (and keep in the allocator) as much memory as its largest layers.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None and _numel(args) >= _BIG:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside this context, every new parameter lives on the meta device; buffers stay real.

    Buffers such as rotary frequencies are computed at construction and are not in
    checkpoints, so they must stay on the CPU; parameters are filled from the checkpoint later.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        with _BigTensorsOnMeta():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_on_meta(config, dtype: torch.dtype):
    """Instantiate the causal-LM class of ``config`` (Switch: its encoder-decoder) with meta parameters.

    Args:
        config: a transformers config (from ``load_config``, so already checked).
        dtype: dtype of the model's parameters once loaded.

    Returns:
        The model, in eval mode, parameters on meta.

    Raises:
        UnsupportedModelError: transformers has no causal-LM class for the family, or only the
            folder's own code (auto_map) has one: moe-local never runs it.
        CheckpointError: transformers fails to build it (a config value it does not accept).
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    register_families()  # the families moe-local defines itself (moe_local.models)
    if getattr(config, "model_type", None) == SWITCH:  # transformers' class, experts on the interface
        return _build(config, dtype, lambda: _switch_class()._from_config(config, dtype=dtype))
    adapted = adapted_class(getattr(config, "model_type", None))
    if adapted is not None:  # transformers' class with its experts moved onto the interface
        # a multimodal wrapper's causal LM is its text model (as transformers' auto class builds it)
        own = config if isinstance(config, adapted.config_class) else config.get_text_config()
        return _build(config, dtype, lambda: adapted._from_config(own, dtype=dtype))
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        auto_map = getattr(config, "auto_map", None)
        if isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map:
            raise UnsupportedModelError(REMOTE_CODE)
        raise UnsupportedModelError(
            f"family {config.model_type!r} is not supported: transformers has no causal-LM class for it"
        )
    # trust_remote_code=False: the built-in class, never the folder's auto_map code or a prompt
    return _build(
        config, dtype, lambda: AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    )


def _build(config, dtype: torch.dtype, make):
    try:
        with parameters_on_meta():
            model = make()
    except MoeLocalError:
        raise
    except Exception as exc:  # model constructors raise anything on values they do not expect
        raise build_error(config, exc) from exc
    return model.eval()


def adapted_class(model_type: str | None) -> type | None:
    """moe-local's adaptation of transformers' class for ``model_type`` (``ADAPTED_EXPERTS``), or None.

    The module's ``register()`` (where it has one) registers the checkpoint renames its class needs.
    """
    from moe_local.loading.families import ADAPTED_EXPERTS

    name = ADAPTED_EXPERTS.get(model_type) if isinstance(model_type, str) else None
    if name is None:
        return None
    module = importlib.import_module(name)
    register = getattr(module, "register", None)
    if register is not None:
        register()
    return module.MODEL_CLASSES[model_type]


def _switch_class():
    from moe_local.models.switch import SwitchForConditionalGeneration, register_switch

    register_switch()  # its checkpoint renames, under its own class name
    return SwitchForConditionalGeneration
