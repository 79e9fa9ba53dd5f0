"""Quantization recipes: ordered rules from tensor-name patterns to a scheme.

A recipe is a TOML file with ``[[rule]]`` tables (``match`` a glob over tensor names,
``scheme`` like ``int4-g64-hqq``, ``nf4``, ``mxfp4`` or ``keep``); the first rule that matches a
tensor decides. An expert rule may instead give ``choose = [schemes]`` and ``bits = N``: the
quantizer measures each expert part of each layer under every scheme listed and picks per layer
and part the mix of least measured error within N bits per weight (``moe_local.convert.allocate``).
Routers, embeddings, norms and lm_head are never put below 8 bits unless a rule names them
(its pattern contains the protected word, e.g. ``*.lm_head.*``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from moe_local.errors import MoeLocalError

RECIPE_DIR = Path(__file__).parent / "quant_recipes"
EXPERTS_PATTERN = "*.experts.*"  # every family's expert parts are named SITE.experts.PART
_EXPERT_PROBE = "model.layers.0.mlp.experts.gate_up"
DEFAULT_GROUP_SIZE = 64  # the experts' group when the recipe keeps them and --group-size is not given
PROTECTED_WORDS = ("embed", "norm", "lm_head", "router", ".gate.", "gate.weight", "shared_expert_gate")


WEIGHT_READ_REASON = "the model's forward reads its .weight"
_WEIGHT_READ_RE = re.compile(r"\bself\.(\w+)\.weight\b")


@dataclass(frozen=True)
class Rule:
    """One line of a recipe: tensors matching ``pattern`` get ``scheme`` (None keeps them).

    ``reason`` is set on the keep rules moe-local adds itself (``Recipe.keeping``): why the
    tensor cannot be quantized whatever the recipe says.
    """

    pattern: str
    scheme: object | None  # QType, BnbType, Mxfp4Type, or None for "keep"
    index: int
    reason: str = ""
    choices: tuple = ()  # a choice rule's group-wise schemes; ``scheme`` is the one nearest ``bits``
    bits: float | None = None  # a choice rule's budget: mean bits per weight over what it matches

    @property
    def label(self) -> str:
        """How the rule reads: the scheme's name, ``keep``, or ``choose(a|b|c)@2.6``."""
        if self.choices:
            return f"choose({'|'.join(q.full_name for q in self.choices)})@{self.bits:g}"
        return self.scheme.full_name if self.scheme is not None else "keep"


@dataclass(frozen=True)
class Recipe:
    """A named, ordered list of rules."""

    name: str
    description: str
    rules: tuple[Rule, ...]

    def with_method(self, method: str) -> Recipe:
        """The same rules with every quantized scheme made with ``method``.

        ``rtn``, ``hqq`` and ``gptq`` keep each rule's bits and group size; the bitsandbytes
        methods ``nf4``, ``fp4`` and ``int8`` replace the scheme (their bits are fixed). Rules that
        name a protected tensor (``lm_head.*``) keep their scheme: a 4-bit method never reaches them;
        ``mxfp4`` rules keep theirs too (the format is one method).
        """
        from moe_local.quant import BnbType, QType

        def convert(scheme, pattern: str):
            if scheme is None or any(w.strip(".") in pattern for w in PROTECTED_WORDS):
                return scheme
            if hasattr(scheme, "block_size"):  # mxfp4: its elements and scales are fixed by the spec
                return scheme
            if method in ("nf4", "fp4", "int8"):
                return BnbType(method)
            if scheme.superblock and method == "gptq":  # gptq sets group scales itself: plain fp16 ones
                return QType(scheme.bits, scheme.group_size, method)
            return dataclasses.replace(scheme, method=method)

        rules = tuple(
            dataclasses.replace(
                r,
                scheme=convert(r.scheme, r.pattern),
                choices=tuple(dict.fromkeys(convert(q, r.pattern) for q in r.choices)),
            )
            for r in self.rules
        )
        return Recipe(f"{self.name}+{method}", self.description, rules)

    def with_experts(self, bits: int | None = None, group_size: int | None = None) -> Recipe:
        """The same rules behind a first rule that sets every expert tensor's bits and group size.

        What is not given comes from the scheme the recipe gives the experts (its method too;
        rtn in groups of ``DEFAULT_GROUP_SIZE`` when it keeps them).

        Args:
            bits: the experts' bits (``--bits``), or None for the recipe's.
            group_size: the experts' group size (``--group-size``), or None for the recipe's.

        Raises:
            MoeLocalError: an unsupported value, experts the recipe keeps with no bits given, or
                bitsandbytes experts (their bits and blocks are fixed).
        """
        from moe_local.quant import QType

        if bits is None and group_size is None:
            return self
        base = self.scheme_for(_EXPERT_PROBE)
        if base is not None and not hasattr(base, "group_size"):
            kind = "mxfp4" if hasattr(base, "block_size") else f"bitsandbytes {base.full_name}"
            raise MoeLocalError(
                f"--bits and --group-size do not apply to {kind} experts (their bits and blocks are fixed)"
            )
        if bits is None and base is None:
            raise MoeLocalError(f"recipe {self.name} keeps the experts: --group-size needs --bits")
        bits = base.bits if bits is None else bits
        group = group_size or (base.group_size if base is not None else DEFAULT_GROUP_SIZE)
        try:
            scheme = QType(
                bits,
                group,
                base.method if base is not None else "rtn",
                bool(getattr(base, "superblock", False)),
            )
        except ValueError as exc:
            raise MoeLocalError(f"--bits {bits} --group-size {group}: {exc}") from exc
        rules = (Rule(EXPERTS_PATTERN, scheme, 0), *self.rules)
        return Recipe(f"{self.name}+experts-{scheme.full_name}", self.description, rules)

    def keeping(self, names: dict[str, str]) -> Recipe:
        """The same rules behind keep rules for ``names`` (tensor name -> the one-line reason).

        Args:
            names: tensors no rule may quantize, e.g. from ``forward_weight_reads``.

        Returns:
            The recipe (``self`` when ``names`` is empty); ``reason_for`` gives each reason.
        """
        if not names:
            return self
        rules = tuple(Rule(n, None, 0, why) for n, why in sorted(names.items()))
        return Recipe(self.name, self.description, (*rules, *self.rules))

    @property
    def has_choices(self) -> bool:
        """Whether a rule leaves its schemes to measurement (``choose`` and ``bits``)."""
        return any(r.choices for r in self.rules)

    def choice_rule_for(self, tensor: str) -> Rule | None:
        """The choice rule (``choose`` and ``bits``) that decides ``tensor``, else None."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(tensor, rule.pattern):
                return rule if rule.choices else None
        return None

    def with_assignment(self, schemes: dict[str, object]) -> Recipe:
        """The same rules behind one exact rule per tensor of ``schemes`` (what an allocation chose)."""
        rules = tuple(Rule(name, q, 0) for name, q in sorted(schemes.items()))
        return Recipe(self.name, self.description, (*rules, *self.rules))

    def reason_for(self, tensor: str) -> str | None:
        """Why ``tensor`` is kept whatever the rules say (a rule from ``keeping``), else None."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(tensor, rule.pattern):
                return rule.reason or None
        return None

    def describe(self) -> str:
        """The rules in order, one line: ``*.experts.* int2-g64-hqq, ..., * keep``."""
        return ", ".join(f"{r.pattern} {r.label}" for r in self.rules)

    def scheme_for(self, tensor: str, in_features: int | None = None):
        """Return the scheme for ``tensor`` (None: keep it as it is).

        Args:
            tensor: the tensor's name.
            in_features: its input width; when the rule's group size does not divide it, the
                group steps down to the largest of 64, 32 or 16 that does, and when none does
                the tensor is kept as it is (as llama.cpp does; the manifest records the scheme
                each tensor got, ``fallback_for`` says why).

        Returns:
            A ``QType``/``BnbType``, or None.
        """
        protected = [w for w in PROTECTED_WORDS if w in tensor]
        for rule in self.rules:
            if fnmatch.fnmatchcase(tensor, rule.pattern):
                named = any(w.strip(".") in rule.pattern for w in protected)
                if rule.scheme is not None and protected and rule.scheme.bits < 8 and not named:
                    return None
                return _fit_group(rule.scheme, in_features)
        return None

    def fallback_for(self, tensor: str, in_features: int) -> object | None:
        """The scheme a rule asked for ``tensor`` when no group size divides its width, else None.

        ``scheme_for`` keeps such a tensor; this names what it would have been, for the summary.
        """
        asked = self.scheme_for(tensor)
        if asked is not None and self.scheme_for(tensor, in_features) is None:
            return asked
        return None


def _fit_group(scheme, in_features: int | None):
    """``scheme`` with a group size that divides ``in_features``; None (keep) when none does.

    Real checkpoints have such widths (an ``o_proj`` of 252 inputs): one tensor kept in its
    own dtype costs little, refusing the model costs the model.
    """
    if scheme is not None and in_features is not None and hasattr(scheme, "fits"):
        return scheme if scheme.fits(in_features) else None  # mxfp4: whole blocks of 32 or keep
    group = getattr(scheme, "group_size", None)
    if scheme is None or in_features is None or group is None or in_features % group == 0:
        return scheme
    for smaller in (64, 32, 16):
        if smaller < group and in_features % smaller == 0:
            return dataclasses.replace(scheme, group_size=smaller)
    return None


def forward_weight_reads(model) -> dict[str, str]:
    """The linear weights whose module the model's own forward code reads ``.weight`` of.

    A ``QuantLinear`` holds no ``.weight`` tensor, so such a module must stay an ``nn.Linear``.
    transformers 5.24 has these in MoE families: the DSA indexer of deepseek_v32, glm_moe_dsa,
    axk2, dots3_note and hy_v4 casts its input to ``weights_proj.weight.dtype`` (a module
    transformers itself keeps in float32), and hy_v4's causal LM casts to ``lm_head.weight.dtype``.
    Found by reading (never running) the ``forward`` source of each module's class, so a family
    added later is covered the day it appears.

    Args:
        model: the model (on the meta device is enough).

    Returns:
        ``{"<module>.weight": reason}`` for each ``nn.Linear`` child read that way.
    """
    from torch import nn

    read_by_class: dict[type, set[str]] = {}
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if cls not in read_by_class:
            try:
                source = inspect.getsource(cls.forward)
            except (OSError, TypeError):  # a builtin or generated forward: nothing to read
                source = ""
            read_by_class[cls] = set(_WEIGHT_READ_RE.findall(source))
        for attr in read_by_class[cls]:
            child = getattr(module, attr, None) if attr in module._modules else None
            if isinstance(child, nn.Linear):
                out[f"{name}.{attr}.weight" if name else f"{attr}.weight"] = WEIGHT_READ_REASON
    return out


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with moe-local."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """Load a shipped recipe by name or a recipe file by path.

    Raises:
        MoeLocalError: unknown name, unreadable file, TOML that does not parse (with its line),
            or a rule with a bad scheme or choice (with the rule's number).
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPE_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise MoeLocalError(f"unknown recipe {name_or_path!r}; shipped: {', '.join(builtin_recipes())}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise MoeLocalError(f"recipe {path} is not a UTF-8 text file") from exc
    except OSError as exc:
        raise MoeLocalError(f"cannot read recipe {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MoeLocalError(f"recipe {path.name} does not parse: {exc}") from exc
    raw_rules = data.get("rule")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise MoeLocalError(f"recipe {path.name} has no [[rule]] tables")
    rules = [_parse_rule(path.name, i, r) for i, r in enumerate(raw_rules, 1)]
    return Recipe(path.stem, str(data.get("description", "")), tuple(rules))


def _parse_rule(file: str, i: int, r: object) -> Rule:
    """Rule ``i`` of recipe ``file``: ``match`` with ``scheme``, or with ``choose`` and ``bits``."""
    from moe_local.quant import QType, bits_per_weight
    from moe_local.quant.api import parse_scheme

    if not isinstance(r, dict) or not isinstance(r.get("match"), str):
        raise MoeLocalError(f"recipe {file}: rule {i} needs string fields match and scheme")
    where = f"recipe {file}: rule {i} ({r['match']})"
    if "choose" in r:
        choose, bits = r["choose"], r.get("bits")
        if "scheme" in r:
            raise MoeLocalError(f"{where}: give scheme or choose, not both")
        if not isinstance(choose, list) or len(choose) < 2 or not all(isinstance(c, str) for c in choose):
            raise MoeLocalError(f"{where}: choose needs a list of two or more scheme names")
        if isinstance(bits, bool) or not isinstance(bits, (int, float)):
            raise MoeLocalError(f"{where}: choose needs bits = the mean bits per weight to fit in")
        if r["match"] != EXPERTS_PATTERN and ".experts." not in r["match"]:
            raise MoeLocalError(f"{where}: choose applies to expert tensors (a match inside *.experts.*)")
        try:
            choices = tuple(parse_scheme(c) for c in choose)
        except ValueError as exc:
            raise MoeLocalError(f"{where}: {exc}") from exc
        if not all(isinstance(q, QType) for q in choices):
            raise MoeLocalError(f"{where}: choose takes group-wise schemes (int4-g32k-hqq, tern-g64k, ...)")
        low, high = min(map(bits_per_weight, choices)), max(map(bits_per_weight, choices))
        if not low <= bits <= high:
            cost = f"{low:.3g} to {high:.3g} bits/weight"
            raise MoeLocalError(f"{where}: bits = {bits:g} is outside what its schemes cost ({cost})")
        nearest = min(choices, key=lambda q: (abs(bits_per_weight(q) - bits), bits_per_weight(q)))
        return Rule(r["match"], nearest, i, choices=choices, bits=float(bits))
    if not isinstance(r.get("scheme"), str):
        raise MoeLocalError(f"recipe {file}: rule {i} needs string fields match and scheme")
    scheme = None
    if r["scheme"] != "keep":
        try:
            scheme = parse_scheme(r["scheme"])
        except ValueError as exc:
            raise MoeLocalError(f"{where}: {exc}") from exc
    return Rule(r["match"], scheme, i)
