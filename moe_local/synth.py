"""``synth``: checkpoints with the real dimensions of known MoE models and random weights.

For measuring speed at real sizes without downloading them. The moe-local format is written
directly at the recipe's bit widths (random codes, plausible scales: no bf16 expert is ever
made), one expert blob after another, at close to disk speed; ``--format hf`` writes a bf16
Hugging Face checkpoint a layer at a time, with the tensor names the family uses on disk.
Legend: E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from moe_local.convert.outdir import (
    check_not_source,
    check_output,
    check_partial,
    clear_partial,
    is_ours,
    make_partial,
    os_error_line,
    publish,
)
from moe_local.errors import MoeLocalError, first_line
from moe_local.recipes import Recipe

# Public configuration facts of the models (their config.json on the hub).
LIKE: dict[str, tuple[str, dict]] = {
    "mixtral-8x7b": ("mixtral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, rope_theta=1e6)),
    "mixtral-8x22b": ("mixtral", dict(
        hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32768,
        max_position_embeddings=65536, rope_theta=1e6)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=40960, norm_topk_prob=True)),
    "deepseek-v2-lite": ("deepseek_v2", dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, n_group=1, topk_group=1,
        topk_method="greedy", vocab_size=102400, max_position_embeddings=163840, rope_scaling=None)),
    "gpt-oss-20b": ("gpt_oss", dict(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        vocab_size=201088, sliding_window=128, max_position_embeddings=131072)),
}  # fmt: skip
# More known shapes, kept apart from LIKE (whose set tests pin): the families moe-local defines
# itself (moe_local.models), with their released config.json values, and the 16x2 shape.
MORE_LIKE: dict[str, tuple[str, dict]] = {
    "deepseek-moe-16b": ("deepseek", dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
        vocab_size=102400, max_position_embeddings=4096, rope_theta=10000.0)),
    "skywork-moe": ("skywork_moe", dict(
        hidden_size=4608, intermediate_size=12288, num_hidden_layers=52, num_attention_heads=36,
        num_key_value_heads=36, num_experts=[16], num_experts_per_tok=2, moe_use_logits_norm=True,
        moe_gate_norm_std=1.0, moe_feature_no_mul_topk=True, vocab_size=65536,
        max_position_embeddings=8192, rope_theta=10000.0)),
    "grok-1": ("grok-1", dict(
        hidden_size=6144, intermediate_size=32768, num_hidden_layers=64, num_attention_heads=48,
        num_key_value_heads=8, num_experts=8, num_experts_per_tok=2, vocab_size=131072,
        max_position_embeddings=8192)),
    # the "16 experts, top-2" shape: Microsoft's Phi-3.5-MoE (its own family, phimoe: Mixtral's
    # layout with sparsemixer routing); no public checkpoint of model_type mixtral has 16 experts
    # google/switch-base-8: encoder-decoder, top-1 experts in every other block of both stacks
    "switch-base-8": ("switch_transformers", dict(
        d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
        num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_experts=8, expert_capacity=64,
        vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dense_act_fn="relu", is_gated_act=False, router_bias=False, router_jitter_noise=0.01)),
    "phi-3.5-moe-16x2": ("phimoe", dict(
        hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, vocab_size=32064,
        max_position_embeddings=131072, rope_theta=10000.0)),
}  # fmt: skip
Progress = Callable[[str, int, int, int], None]
_POOL = 64 * 2**20  # random bytes that expert codes are sliced from (fast, and every expert differs)


def synth_config(like: str, layers: int | None = None):
    """The config of a known model (``LIKE``, ``MORE_LIKE``) or of a config.json path, cut to ``layers``."""
    from transformers import AutoConfig

    from moe_local.models import register_families

    register_families()  # the --like families moe-local defines itself
    known = {**LIKE, **MORE_LIKE}
    if like in known:
        model_type, kw = known[like]
        config = AutoConfig.for_model(model_type, **kw)
    elif Path(like).is_file():
        config = _config_from_file(Path(like))
    else:
        raise MoeLocalError(f"unknown --like {like!r}; choose {', '.join(known)} or a config.json path")
    if layers is not None:
        if layers < 1:
            raise MoeLocalError("--layers must be at least 1")
        config.num_hidden_layers = layers
        if getattr(config, "is_encoder_decoder", False):
            config.num_decoder_layers = layers  # both stacks cut alike
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 256, 257, 258
    if getattr(config, "is_encoder_decoder", False):
        config.decoder_start_token_id = config.pad_token_id  # as T5's: the decoder starts from pad
    return config


def _config_from_file(path: Path):
    """A transformers config from a config.json file, read as data (never the folder's code)."""
    from transformers import AutoConfig

    from moe_local.loading.validate import check_raw, check_values
    from moe_local.models import register_families

    register_families()
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MoeLocalError(f"--like {path} is not a JSON config file ({type(exc).__name__})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise MoeLocalError(f"--like {path} is not a model config: it has no model_type")
    check_raw(raw, path)  # sizes before transformers builds lists from them
    model_type = raw.pop("model_type")
    raw.pop("auto_map", None)  # remote code is never run; the built-in class is used
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError, KeyError) as exc:
        first = first_line(exc)
        raise MoeLocalError(f"--like {path}: not a valid {model_type!r} config ({first})") from exc
    check_values(config, path)  # no weight files to bound: synth writes them
    return config


def _random_weight(shape: tuple[int, ...], name: str, gen: torch.Generator, pool: torch.Tensor | None = None):
    """A bf16 weight of about 0.02 rms; from the random byte pool when given (fast at real sizes)."""
    if len(shape) == 1:  # norms and biases
        return (
            torch.ones(shape, dtype=torch.bfloat16)
            if "norm" in name
            else torch.zeros(shape, dtype=torch.bfloat16)
        )
    n = 1
    for d in shape:
        n *= d
    if pool is None or pool.numel() < 2:
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16)
    done = 0
    while done < n:  # int8 noise, uniform in [-128, 127]: rms 74, scaled to 0.02
        take = min(n - done, pool.numel())
        start = int(torch.randint(0, pool.numel() - take + 1, (1,), generator=gen))
        out[done : done + take] = pool[start : start + take].view(torch.int8).to(torch.bfloat16) * (0.02 / 74)
        done += take
    return out.view(shape)


def _random_quantized(shape: tuple[int, int], scheme, pool: torch.Tensor, gen: torch.Generator) -> dict:
    """Tensors of a quantized weight with random codes and scales giving weights of about 0.02 rms."""
    from moe_local.quant import QuantizedTensor
    from moe_local.quant.api import quantize_scheme
    from moe_local.quant.pack import packed_size

    o, i = shape
    if not hasattr(scheme, "group_size"):  # bitsandbytes: quantize a small random block's layout
        return quantize_scheme(torch.randn(o, i, generator=gen) * 0.02, scheme).tensors()
    n = o * packed_size(i, scheme.bits)
    start = int(torch.randint(0, pool.numel() - n, (1,), generator=gen)) if pool.numel() > n else 0
    packed = pool[start : start + n].clone().view(o, -1) if pool.numel() > n else torch.randint(
        0, 256, (o, n // o), dtype=torch.uint8, generator=gen)  # fmt: skip
    if getattr(scheme, "ternary", False):  # 2-bit codes of 0..2 only: code 3 becomes 2
        packed -= (packed & 0x55) & ((packed >> 1) & 0x55)  # lanes of 3 lose 1, nothing borrows
    groups = i // scheme.group_size
    scale = 0.02 * 3.46 / scheme.qmax  # uniform codes over the range give ~0.02 rms
    scales = torch.full((o, groups), scale, dtype=torch.float16)
    zeros = torch.full((o, groups), scheme.qmax / 2, dtype=torch.float16)
    sup = None
    if scheme.superblock:  # the same parameters moved onto the super-block grid its codes can say
        from moe_local.quant.superblock import snap_params

        scales, zeros, sup = snap_params(scales, zeros, scheme.group_size)
    return QuantizedTensor(packed, scales, zeros, (o, i), scheme, sup).tensors()


def synth(
    like: str,
    out: str | Path,
    *,
    layers: int | None = None,
    recipe: Recipe | None = None,
    fmt: str = "moe-local",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write a random checkpoint with the dimensions of ``like``.

    Args:
        like: a name in ``LIKE`` or ``MORE_LIKE``, or a config.json path.
        out: the folder to create.
        layers: keep only the first N layers.
        recipe: bit widths of the moe-local format (default ``experts-4bit``).
        fmt: ``moe-local`` or ``hf`` (bf16 Hugging Face safetensors).
        overwrite: replace an existing OUT.
        progress: ``progress(stage, done, total, bytes_written)``.

    Returns:
        The folder.
    """
    from moe_local.experts.sites import find_expert_sites
    from moe_local.loading.meta import build_on_meta
    from moe_local.recipes import load_recipe
    from moe_local.tiny import make_tokenizer

    if not Path(out).name:
        raise MoeLocalError(f"OUT {str(out)!r} names no folder; give the folder to create")
    out = Path(out)
    if fmt not in ("moe-local", "hf"):
        raise MoeLocalError(f"unknown --format {fmt!r}; choose moe-local or hf")
    sources = [Path(like).parent] if Path(like).is_file() else []
    partial = out.with_name(out.name + ".partial")
    check_output(out, sources, overwrite=overwrite, inside_ok=True)  # only a config is read from there
    check_not_source(partial, sources, "OUT.partial", inside_ok=True)
    check_partial(partial)
    config = synth_config(like, layers)
    meta = build_on_meta(config, torch.bfloat16)
    sites = find_expert_sites(meta)
    try:
        clear_partial(partial)
        make_partial(partial, f"synth {fmt}")
        config.save_pretrained(partial)
        make_tokenizer().save_pretrained(partial)
        gen = torch.Generator().manual_seed(0)
        if fmt == "hf":
            _write_hf(partial, config, meta, sites, gen, progress)
        else:
            _write_moe_local(partial, like, meta, sites, recipe or load_recipe("experts-4bit"), gen, progress)
        publish(partial, out)
    except BaseException as exc:
        if is_ours(partial):
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):
            raise MoeLocalError(os_error_line(out, exc)) from exc
        raise
    return out


def _write_moe_local(partial: Path, like: str, meta, sites, recipe: Recipe, gen, progress) -> None:
    from torch import nn

    from moe_local.convert.outdir import save_safetensors
    from moe_local.format.blob import checksum, layout_of, pack_blob, round_up, tensor_checksum
    from moe_local.format.manifest import DENSE_FILE, FORMAT_VERSION, MANIFEST, write_json_atomic

    pool = torch.randint(0, 256, (_POOL,), dtype=torch.uint8, generator=gen)
    expert_params = {f"{s.name}.{n}" for s in sites for n, _ in meta.get_submodule(s.name).named_parameters()}
    linears = {f"{n}.weight" for n, m in meta.named_modules() if isinstance(m, nn.Linear)}
    dense, schemes = {}, {}
    for name, p in meta.named_parameters():
        if name in expert_params:
            continue
        q = recipe.scheme_for(name, p.shape[-1]) if name in linears else None
        schemes[name] = q.full_name if q is not None else "keep"
        if q is None:
            dense[name] = _random_weight(tuple(p.shape), name, gen, pool)
        else:
            for k, t in _random_quantized(tuple(p.shape), q, pool, gen).items():
                dense[f"{name}.{k}"] = t
    save_safetensors(dense, partial / DENSE_FILE)
    (partial / "experts").mkdir()
    layers = {}
    for site in sites:
        mod = meta.get_submodule(site.name)
        shapes = {}
        for pname, p in mod.named_parameters():
            part = pname.removesuffix("_proj").replace("_proj_", "_")
            shape = tuple(p.shape[1:])
            if p.dim() == 3 and site.is_transposed:
                shape = (shape[1], shape[0])
            shapes[part] = shape
        parts_q = {
            p: (recipe.scheme_for(f"{site.name}.{p}", s[-1]) if len(s) == 2 else None)
            for p, s in shapes.items()
        }
        fname = f"experts/layer-{site.layer:04d}.bin"
        entries, slots, length, offset = [], None, 0, 0
        with open(partial / fname, "wb") as f:
            for e in range(site.num_experts):
                tensors = {}
                for part, shape in shapes.items():
                    q = parts_q[part]
                    if q is None:
                        tensors[part] = _random_weight(shape, part, gen, pool)
                    else:
                        for k, t in _random_quantized(shape, q, pool, gen).items():
                            tensors[f"{part}.{k}"] = t
                if slots is None:
                    slots, length = layout_of(tensors)
                blob = pack_blob(tensors, slots, length)
                f.write(blob)
                f.write(b"\0" * (round_up(length) - length))
                entries.append([offset, length, checksum(blob)])
                offset += round_up(length)
                if progress:
                    progress(f"layer {site.layer}", e + 1, site.num_experts, round_up(length))
        layers[str(site.layer)] = {
            "file": fname,
            "schemes": {p: (q.full_name if q is not None else "keep") for p, q in parts_q.items()},
            "shapes": {p: list(s) for p, s in shapes.items()},
            "slots": [s.to_json() for s in slots or []],
            "experts": entries,
        }
    manifest = {
        "format": "moe-local",
        "version": FORMAT_VERSION,
        "source": {"name": f"synthetic {like}", "index_sha256": hashlib.sha256(like.encode()).hexdigest()},
        "recipe": recipe.name,
        "model_type": meta.config.model_type,
        "dense": schemes,
        "dense_crc32": {k: tensor_checksum(t) for k, t in dense.items()},
        "layers": layers,
    }
    write_json_atomic(partial / MANIFEST, manifest)


def _disk_templates(model_type: str) -> dict[str, list[tuple[str, str]]]:
    """How the family names tensors on disk: in-memory name pattern -> [(disk pattern, part)].

    Learned from a tiny model of the family saved by transformers itself, so names are never guessed.
    """
    from transformers import AutoModelForCausalLM

    from moe_local.format.safetensors_io import CheckpointFiles
    from moe_local.loading.families import checkpoint_renamer
    from moe_local.loading.meta import build_on_meta
    from moe_local.tiny import FAMILIES, tiny_config

    if model_type not in FAMILIES:
        raise MoeLocalError(f"--format hf knows the on-disk names of {', '.join(FAMILIES)} only")
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type), trust_remote_code=False)
        model.save_pretrained(tmp)
        files = CheckpointFiles(tmp)
        meta = build_on_meta(tiny_config(model_type), torch.float32)
        rename = checkpoint_renamer(meta)
        out: dict[str, list[tuple[str, str]]] = {}
        for key in files.names():
            mem = _normalize(rename(key))
            part = ""
            m = re.search(r"\.experts\.\d+\.(\w+)\.(weight|bias)$", rename(key))
            if m:  # per-expert on disk: attach it to the fused in-memory parameter it becomes
                part = m.group(1) + ("" if m.group(2) == "weight" else "_bias")
                mem = re.sub(r"\.experts\.\{E\}\..*$", ".experts", mem)
            out.setdefault(mem, []).append((_normalize(key), part))
        return out


def _normalize(name: str) -> str:
    return re.sub(r"\.experts\.\d+\.", ".experts.{E}.", re.sub(r"layers\.\d+\.", "layers.{L}.", name))


def _write_hf(partial: Path, config, meta, sites, gen, progress) -> None:
    from moe_local.convert.outdir import save_safetensors

    pool = torch.randint(0, 256, (_POOL,), dtype=torch.uint8, generator=gen)
    templates = _disk_templates(config.model_type)
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    index: dict[str, str] = {}
    site_of = {s.name: s for s in sites}
    for name, p in meta.named_parameters():
        m = re.search(r"layers\.(\d+)\.", name)
        layer = int(m.group(1)) if m else -1
        norm = _normalize(name)
        mod_name = name.rsplit(".", 1)[0]
        if mod_name in site_of:  # fused in memory
            site = site_of[mod_name]
            fused = templates.get(norm)
            if fused:  # fused on disk too
                by_layer.setdefault(layer, {})[fused[0][0].replace("{L}", str(layer))] = _random_weight(
                    tuple(p.shape), name, gen, pool
                )
                continue
            per = templates.get(_normalize(mod_name), [])
            half = p.shape[1] // 2
            for disk, part in per:
                shape = _per_expert_shape(part, tuple(p.shape), half)
                if shape is None or not _belongs(part, name):
                    continue
                for e in range(site.num_experts):
                    key = disk.replace("{L}", str(layer)).replace("{E}", str(e))
                    by_layer.setdefault(layer, {})[key] = _random_weight(shape, key, gen, pool)
            continue
        for disk, _ in templates.get(norm, [(norm, "")]):
            key = disk.replace("{L}", str(layer))
            by_layer.setdefault(layer, {})[key] = _random_weight(tuple(p.shape), name, gen, pool)
    total = len(by_layer)
    for i, (_, tensors) in enumerate(sorted(by_layer.items())):
        fname = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_safetensors(tensors, partial / fname, metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, fname))
        if progress:
            progress("layers", i + 1, total, sum(t.numel() * 2 for t in tensors.values()))
    (partial / "model.safetensors.index.json").write_text(
        __import__("json").dumps({"metadata": {}, "weight_map": index}, indent=1)
    )


def _belongs(part: str, fused_name: str) -> bool:
    down = part.startswith(("w2", "down_proj"))
    return down == fused_name.endswith("down_proj")


def _per_expert_shape(part: str, fused: tuple[int, ...], half: int) -> tuple[int, ...] | None:
    """Shape of one expert's tensor ``part`` cut from the fused in-memory shape [E, ...]."""
    if part.startswith(("w1", "w3", "gate_proj", "up_proj")):
        return (half, fused[2]) if not part.endswith("bias") else (half,)
    if part.startswith(("w2", "down_proj")):
        return (fused[1], fused[2]) if not part.endswith("bias") else (fused[1],)
    return None
