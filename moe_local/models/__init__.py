"""Model families transformers does not define, written inside moe-local: the registry.

moe-local never runs a model folder's own code (``auto_map``), so a family published only as
remote code or in another framework gets its definition here, one module per family. Each module
of this package exposes:

- ``MODEL_TYPE``: the ``model_type`` its config.json says;
- ``CONFIG_CLASS``: a transformers config class of that model type;
- ``MODEL_CLASS``: its causal LM, a ``PreTrainedModel`` whose experts follow transformers' experts
  interface (fused 3-D ``gate_up_proj``/``down_proj``), so expert swap, offload and quantization
  apply unchanged;
- optionally ``CONVERSION``: transformers weight transforms (renamings and the converters that
  fuse per-expert tensors), registered as the family's checkpoint conversion mapping so its
  published per-expert keys map onto the fused experts exactly as Mixtral's do;
- optionally ``ARCHITECTURES``: class names a config.json's ``architectures`` may give instead of a
  ``model_type`` (a community port whose config names only its architecture);
- optionally ``ROUTER``: how the next layer's experts may be guessed for prefetch: ``"linear"``
  (the default: a bare ``[E, H]`` router weight whose logits order the experts) or None (the
  family routes some other way: no guess is made).

``register_families`` discovers the modules (``pkgutil`` over this package) and registers each
with transformers' auto classes once; every place moe-local builds a config or a model calls it.
This package imports nothing else of moe-local: it is the lowest layer.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from dataclasses import dataclass
from types import ModuleType

LINEAR = "linear"


@dataclass(frozen=True)
class Family:
    """One family defined in this package.

    Attributes:
        model_type: its config's ``model_type``.
        module: the module that defines it.
        config_class: its config class.
        model_class: its causal-LM class.
        router: ``"linear"`` (prefetch reads a bare router weight) or None (no next-layer guess).
        architectures: ``architectures`` names that identify a config.json without ``model_type``.
    """

    model_type: str
    module: ModuleType
    config_class: type
    model_class: type
    router: str | None = LINEAR
    architectures: tuple[str, ...] = ()


_lock = threading.Lock()
_families: dict[str, Family] | None = None
_registered = False


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        model_type = getattr(module, "MODEL_TYPE", None)
        if not isinstance(model_type, str):
            continue  # a helper module of the package, not a family
        if model_type in found:
            raise RuntimeError(f"two modules of {__name__} define model_type {model_type!r}")
        found[model_type] = Family(
            model_type=model_type,
            module=module,
            config_class=module.CONFIG_CLASS,
            model_class=module.MODEL_CLASS,
            router=getattr(module, "ROUTER", LINEAR),
            architectures=tuple(getattr(module, "ARCHITECTURES", ())),
        )
    return found


def families() -> dict[str, Family]:
    """Every family of this package by model type (discovered once)."""
    global _families
    with _lock:
        if _families is None:
            _families = _discover()
        return _families


def register_families() -> None:
    """Register every family with transformers' ``AutoConfig`` and ``AutoModelForCausalLM``, once.

    Idempotent and thread-safe. A folder whose config.json names one of these model types then
    builds moe-local's class, whatever its ``auto_map`` says: transformers prefers a registered
    class to remote code when ``trust_remote_code`` is False.
    """
    global _registered
    found = families()
    with _lock:
        if _registered:
            return
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        for fam in found.values():
            if fam.model_type not in CONFIG_MAPPING:
                AutoConfig.register(fam.model_type, fam.config_class)
            AutoModelForCausalLM.register(fam.config_class, fam.model_class, exist_ok=True)
            conversion = getattr(fam.module, "CONVERSION", None)
            if conversion:
                register_checkpoint_conversion_mapping(fam.model_type, list(conversion), overwrite=True)
        _registered = True


def family_of(model_type: str) -> Family | None:
    """The family of this package with ``model_type``, or None."""
    return families().get(model_type)


def family_of_architectures(architectures) -> Family | None:
    """The family whose ``ARCHITECTURES`` names the first of a config.json's ``architectures``, or None."""
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        return None
    for fam in families().values():
        if architectures[0] in fam.architectures:
            return fam
    return None


def router_kind(module_or_class) -> str | None:
    """The ``ROUTER`` hint of the family a model's module (or class) is defined in; ``"linear"`` otherwise."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    for fam in families().values():
        if cls.__module__ == fam.module.__name__:
            return fam.router
    return LINEAR
