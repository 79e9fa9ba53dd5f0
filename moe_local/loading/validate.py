"""Checks on a model folder's config.json before anything is built from it.

A config.json is data from a model folder, possibly broken or hostile: transformers builds what
it says (a billion layers, more experts per token than there are experts) and fails late, after
minutes, or never. ``load_config``, which every command goes through, calls these checks so a
bad value is named in one line before any model is built, and a folder that would need its own
Python code is refused: moe-local never runs code from a model folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

from moe_local.errors import CheckpointError, first_line
from moe_local.units import human_bytes

REMOTE_CODE = (
    "this checkpoint needs its own Python code (auto_map); moe-local does not run code from model folders"
)
TOKENIZER_REMOTE_CODE = (
    "this checkpoint's tokenizer needs its own Python code (auto_map in tokenizer_config.json); "
    "moe-local does not run code from model folders"
)

# Names families give the same quantity (transformers' attribute_map aliases some of them).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "moe_k", "top_k_experts")
_EXPERTS_MAX = 1 << 14  # released MoEs have up to 512 experts per layer
_SIZE_MAX = 1 << 20
# field -> (least, most): an integer in that range, or null. The bounds are far beyond any released
# model yet small enough that building the model on meta stays quick.
LIMITS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 1 << 17),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1 << 12),
    "num_key_value_heads": (1, 1 << 12),
    "head_dim": (1, 1 << 14),
    "vocab_size": (1, 1 << 24),
    "intermediate_size": (1, _SIZE_MAX),
    "moe_intermediate_size": (1, _SIZE_MAX),
    "shared_expert_intermediate_size": (1, _SIZE_MAX),
    "max_position_embeddings": (1, 1 << 30),
    "sliding_window": (0, 1 << 30),  # 0: "off" beside use_sliding_window false (Qwen); _check_attention
    "n_shared_experts": (0, 1 << 10),
    "kv_lora_rank": (1, 1 << 16),
    "q_lora_rank": (1, 1 << 16),
    "qk_rope_head_dim": (1, 1 << 14),
    "qk_nope_head_dim": (1, 1 << 14),
    "v_head_dim": (1, 1 << 14),
    "first_k_dense_replace": (0, 1024),
    "decoder_sparse_step": (1, 1024),
    "moe_layer_freq": (1, 1024),
    "n_group": (1, _EXPERTS_MAX),
    "topk_group": (1, _EXPERTS_MAX),
    **dict.fromkeys(EXPERT_COUNT_FIELDS, (0, _EXPERTS_MAX)),  # 0: a dense variant (Qwen-MoE)
    **dict.fromkeys(TOP_K_FIELDS, (0, _EXPERTS_MAX)),
}
# Bits per weight no checkpoint moe-local reads goes below (its lowest scheme and GPTQ's are 2-bit):
# the weight files must hold at least this much for what the config implies.
_MIN_BITS_PER_WEIGHT = 1

Getter = Callable[[str], object]


def needs_remote_code(raw: dict, known_types: Iterable[str]) -> bool:
    """Whether config.json names a family transformers lacks and points at the folder's own code."""
    return bool(raw.get("auto_map")) and raw.get("model_type") not in known_types


def check_raw(raw: dict, where: Path) -> None:
    """Check config.json's sizes as written, before transformers reads it (some build lists from them).

    Args:
        raw: the parsed config.json.
        where: the file, for messages.

    Raises:
        CheckpointError: a size is not an integer or is out of range (the message names field and value).
    """
    for scope in (raw, raw.get("text_config")):
        if isinstance(scope, dict):
            _check_ranges(scope.get, where)
    for key in ("rope_parameters", "rope_scaling"):
        if raw.get(key) is not None and not isinstance(raw.get(key), dict):
            raise CheckpointError(f"{where}: {key} = {_show(raw.get(key))} must be a JSON object or null")
    for key in ("dtype", "torch_dtype"):
        value = raw.get(key)
        if isinstance(value, str) and not _is_dtype_name(value):
            raise CheckpointError(f"{where}: {key} = {value!r} is not a torch dtype (e.g. bfloat16)")


def check_config(config, where: Path, tested: Iterable[str], expert_width: dict[str, str]) -> None:
    """Check a transformers config's fields against each other and against the folder's weight files.

    Args:
        config: the config transformers read (aliases and defaults applied).
        where: config.json, for messages; its folder holds the weights.
        tested: families whose MoE layer placement the bound below knows.
        expert_width: family -> the field that sizes one expert.

    Raises:
        CheckpointError: a value is out of range or contradicts another, or the config implies
            more weights than the folder's files could hold.
    """
    get = check_values(config, where)
    model_type = _text_config(config).model_type
    _check_bytes(get, model_type in tuple(tested), expert_width.get(model_type), where)


def check_values(config, where: Path) -> Getter:
    """Check a transformers config's values and their relations (no weight files needed).

    Args:
        config: a transformers config (its text config is checked).
        where: the config's file, for messages.

    Returns:
        The field reader used (an alias reads as absent, so messages name the field config.json has).

    Raises:
        CheckpointError: a value is out of range or contradicts another (the message names them).
    """
    text = _text_config(config)
    aliases = getattr(text, "attribute_map", None) or {}

    def get(name: str) -> object:
        return None if name in aliases else getattr(text, name, None)

    _check_ranges(get, where)
    _check_experts(get, where)
    _check_attention(get, where)
    _check_rope(get("rope_parameters"), where)
    return get


def _text_config(config):
    """The decoder's config: itself, or a multimodal config's text part."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_ranges(get: Getter, where: Path) -> None:
    for name, (lo, hi) in LIMITS.items():
        value = get(name)
        for v in value if isinstance(value, list) else [value]:  # Hunyuan: one value per layer
            if v is not None and (not _is_int(v) or not lo <= v <= hi):
                shown = _show(value)
                raise CheckpointError(f"{where}: {name} = {shown} must be an integer from {lo} to {hi}")
    pad, vocab = get("pad_token_id"), get("vocab_size")
    if _is_int(pad) and _is_int(vocab) and not -vocab <= pad < vocab:
        raise CheckpointError(f"{where}: pad_token_id = {pad} is outside the vocabulary (vocab_size {vocab})")


def _first(get: Getter, names: tuple[str, ...]) -> tuple[str, object]:
    for name in names:
        if get(name) is not None:
            return name, get(name)
    return "", None


def _check_experts(get: Getter, where: Path) -> None:
    e_name, experts = _first(get, EXPERT_COUNT_FIELDS)
    k_name, top_k = _first(get, TOP_K_FIELDS)
    if not experts or top_k is None:
        return
    counts = experts if isinstance(experts, list) else [experts]
    ks = top_k if isinstance(top_k, list) else [top_k] * len(counts)
    for e, k in zip(counts, ks, strict=False):
        if e and k > e:
            raise CheckpointError(
                f"{where}: {k_name} = {_show(top_k)} is larger than {e_name} = {_show(experts)}: "
                "a token cannot use more experts than there are"
            )
        if e and k < 1:
            raise CheckpointError(f"{where}: {k_name} = {_show(top_k)} must be at least 1 with {e} experts")
    groups, top_groups = get("n_group"), get("topk_group")
    if _is_int(groups) and _is_int(experts) and experts % groups:
        raise CheckpointError(f"{where}: n_group = {groups} does not divide {e_name} = {experts}")
    if _is_int(groups) and _is_int(top_groups) and top_groups > groups:
        raise CheckpointError(f"{where}: topk_group = {top_groups} is larger than n_group = {groups}")


def _check_attention(get: Getter, where: Path) -> None:
    """Heads, head size, window, norms and RoPE fraction: the values attention and norms divide by."""
    # after defaults, so use_sliding_window is known: Qwen's 0 means no window, Mixtral's a 0-token one
    if get("sliding_window") == 0 and get("use_sliding_window") is not False:
        raise CheckpointError(f"{where}: sliding_window = 0 must be at least 1 (or null for no window)")
    heads, kv_heads, hidden = get("num_attention_heads"), get("num_key_value_heads"), get("hidden_size")
    if _is_int(heads) and _is_int(kv_heads) and heads % kv_heads:
        raise CheckpointError(
            f"{where}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}"
        )
    implicit_head_dim = get("head_dim") is None and get("kv_lora_rank") is None  # MLA sizes heads apart
    if implicit_head_dim and _is_int(heads) and _is_int(hidden) and hidden % heads:
        raise CheckpointError(
            f"{where}: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads} "
            "and no head_dim is given"
        )
    for name in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        eps = get(name)
        if _is_number(eps) and not (math.isfinite(eps) and eps >= 0):
            raise CheckpointError(f"{where}: {name} = {eps!r} must be a number >= 0")
    factor = get("partial_rotary_factor")
    if isinstance(factor, int | float) and not 0 < factor <= 1:
        raise CheckpointError(f"{where}: partial_rotary_factor = {factor} must be in (0, 1]")


def _check_rope(params: object, where: Path) -> None:
    """rope_parameters, one dict or one per layer type: a positive, finite base and scaling factor."""
    if not isinstance(params, dict):
        return
    scopes = params.values() if params and all(isinstance(v, dict) for v in params.values()) else [params]
    for scope in scopes:
        for key in ("rope_theta", "factor"):
            value = scope.get(key)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise CheckpointError(f"{where}: rope_parameters {key} = {value!r} must be a positive number")


def implied_weights(get: Getter, tested: bool, width_field: str | None) -> tuple[int, str]:
    """A lower bound on the weights a model of this config holds, and what it is made of.

    Counts the embedding (vocab x hidden) and the experts: for a tested family every MoE layer's
    experts at two H x I matrices each (up and down; the gate is not counted); for others one
    layer's router (E x H), since where their MoE layers sit is not known here.
    """
    vocab, hidden = get("vocab_size"), get("hidden_size")
    if not (_is_int(vocab) and _is_int(hidden)):
        return 0, ""
    terms = [(vocab * hidden, f"vocab_size {vocab} x hidden_size {hidden}")]
    e_name, experts = _first(get, EXPERT_COUNT_FIELDS)
    experts = min(experts) if isinstance(experts, list) and experts else experts
    if _is_int(experts) and experts > 0:
        width = get(width_field) if tested and width_field else None
        width = min(width) if isinstance(width, list) and width else width
        if _is_int(width):
            layers = _moe_layers(get)
            shape = f"{e_name} {experts} x 2 x hidden_size {hidden} x {width_field} {width}"
            terms.append((layers * experts * 2 * hidden * width, f"{layers} MoE layers x {shape}"))
        else:
            terms.append((experts * hidden, f"{e_name} {experts} x hidden_size {hidden}"))
    total = sum(n for n, _ in terms)
    return total, max(terms)[1]


def _moe_layers(get: Getter) -> int:
    """MoE layers of a tested family: all, less DeepSeek's dense ones and Qwen's mlp-only ones."""
    layers = get("num_hidden_layers")
    if not _is_int(layers):
        return 1
    first = get("first_k_dense_replace") or 0
    step = get("decoder_sparse_step") or 1
    freq = get("moe_layer_freq") or 1  # DeepSeek-MoE: layer i is MoE when i % freq == 0
    mlp_only = get("mlp_only_layers") or []
    dense = set(mlp_only) if isinstance(mlp_only, list) else set()
    return sum(
        1 for i in range(layers) if i >= first and (i + 1) % step == 0 and i % freq == 0 and i not in dense
    )


def weight_file_bytes(folder: Path) -> int:
    """Bytes of the folder's weight files: safetensors shards, moe-local's dense file and expert blobs."""
    total = 0
    for pattern in ("*.safetensors", "*.bin", "experts/*.bin"):  # never a deep walk of a big tree
        for f in folder.glob(pattern):
            try:
                total += f.stat().st_size  # follows the hub cache's links to its blobs
            except OSError:
                continue  # a dangling link: the reader names it when it gets there
    return total


def _check_bytes(get: Getter, tested: bool, width_field: str | None, where: Path) -> None:
    weights, made_of = implied_weights(get, tested, width_field)
    held = weight_file_bytes(where.parent)
    need = weights * _MIN_BITS_PER_WEIGHT // 8
    if held and held < need:  # no weight files at all: the reader's own message says so
        raise CheckpointError(
            f"{where} implies at least {weights:,} weights ({made_of}) but the weight files hold only "
            f"{human_bytes(held)}: the config does not match the checkpoint"
        )


def tokenizer_needs_code(folder: Path) -> bool:
    """Whether the folder's tokenizer points at its own code (auto_map), in either config file."""
    import json

    for name, key in (("tokenizer_config.json", None), ("config.json", "AutoTokenizer")):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError, RecursionError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map and (key is None or (isinstance(auto_map, dict) and key in auto_map)):
            return True
    return False


def build_error(config, exc: Exception) -> CheckpointError:
    """The one-line error for transformers failing to build ``config``'s model.

    The config passed ``check_config``, so the cause is most likely a value transformers does not
    know (an activation, a RoPE type): when the failure names a value, say which field holds it.
    """
    where = Path(str(getattr(config, "name_or_path", "") or ".")) / "config.json"
    first = first_line(exc)
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        field = _field_holding(config.to_dict(), exc.args[0])
        if field:
            return CheckpointError(f"{where}: {field} = {exc.args[0]!r} is not a value transformers knows")
    return CheckpointError(
        f"transformers cannot build a {config.model_type!r} model from {where}: {type(exc).__name__}: {first}"
    )


def _field_holding(data: dict, value: str, prefix: str = "") -> str:
    for key, v in data.items():
        if v == value:
            return prefix + key
        if isinstance(v, dict):
            found = _field_holding(v, value, f"{prefix}{key}.")
            if found:
                return found
    return ""


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_dtype_name(value: str) -> bool:
    import torch

    return isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
