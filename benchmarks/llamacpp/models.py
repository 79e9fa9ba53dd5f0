"""The checkpoints both engines run: one synthetic bf16 Mixtral, in each engine's formats.

* ``bf16/``: the 1.6 GB Mixtral-shaped bf16 Hugging Face folder of ``benchmarks/synth_hf.py``;
  moe-local runs it as is.
* ``bf16.gguf``: the same folder converted by llama.cpp's ``convert_hf_to_gguf.py`` (through a
  view: see ``gguf_view``), ``--outtype bf16``.
* ``q4_0.gguf``: ``llama-quantize bf16.gguf q4_0.gguf Q4_0``.
* ``all-4bit/``: ``moe-local quantize bf16/ all-4bit/ --recipe all-4bit``.

Each is made once and kept in the cache; a missing one is remade from the previous one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .build import LlamaCpp

HERE = Path(__file__).resolve().parent
SYNTH = HERE.parent / "synth_hf.py"

# synth_hf.py arguments per shape: the default 1.6 GB model, and 2 layers of real Mixtral-8x7B
# (experts of 5.6 GB in bf16: a capped run then has room beyond moe-local's Python runtime)
SHAPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "mixtral-8x7b-2l": (
        *("--hidden", "4096", "--ffn", "14336"),
        *("--layers", "2", "--heads", "32", "--kv-heads", "8"),
    ),
}


def checkpoints_root(cache: Path, shape: str) -> Path:
    """Where a shape's checkpoints live in the benchmark cache (the default's path is unchanged)."""
    return cache / "checkpoints" if shape == "default" else cache / f"checkpoints-{shape}"


@dataclass(frozen=True)
class Checkpoints:
    """Paths of the four checkpoints under one cache folder."""

    root: Path

    @property
    def hf(self) -> Path:
        """The bf16 Hugging Face folder (moe-local's bf16 input, the converter's source)."""
        return self.root / "bf16"

    @property
    def view(self) -> Path:
        """The converter's view of ``hf`` (links to its shards, adjusted config and tokenizer)."""
        return self.root / "gguf-view"

    @property
    def bf16_gguf(self) -> Path:
        """llama.cpp's bf16 GGUF."""
        return self.root / "bf16.gguf"

    @property
    def q4_gguf(self) -> Path:
        """llama.cpp's Q4_0 GGUF."""
        return self.root / "q4_0.gguf"

    @property
    def ml_4bit(self) -> Path:
        """moe-local's all-4bit folder (llama.cpp Q4_0's choices of bits)."""
        return self.root / "all-4bit"


def run_logged(cmd: list[str], log, **kw) -> None:
    """Run ``cmd`` (printed first), raising on failure."""
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def gguf_view(hf: Path, view: Path) -> Path:
    """A folder the converter accepts for ``hf``, with the same weights (symlinked shards).

    The converter picks its model class from ``config.json``'s ``architectures``, which the
    synthetic config lacks; it is set to ``MixtralForCausalLM``. The byte tokenizer has no BPE
    merges, and llama.cpp refuses a GPT-2 style vocabulary without any, so the view's
    ``tokenizer.json`` gains one merge (two spaces) and its token, id 261, inside the padded
    32000-id vocabulary. Neither changes a weight.
    """
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in hf.iterdir():
        if f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json", "tokenizer_config.json"):
            (view / f.name).symlink_to(f.resolve())
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["MixtralForCausalLM"]
    (view / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((hf / "tokenizer.json").read_text())
    model = tok["model"]
    if not model.get("merges"):
        space = "\u0120"  # byte-level BPE's spelling of " "
        model["merges"] = [[space, space]]
        used = set(model["vocab"].values()) | {t["id"] for t in tok.get("added_tokens", [])}
        model["vocab"][space * 2] = max(used) + 1
    (view / "tokenizer.json").write_text(json.dumps(tok))
    return view


def ensure_checkpoints(
    root: Path, llama: LlamaCpp, *, shape: str = "default", log=print, timer=None
) -> Checkpoints:
    """Make whatever of the four checkpoints of ``shape`` (see ``SHAPES``) is missing under ``root``."""
    ck = Checkpoints(root)
    root.mkdir(parents=True, exist_ok=True)
    phase = timer or (lambda name: _NullPhase())
    if not (ck.hf / "model.safetensors.index.json").exists():
        with phase("synth bf16 checkpoint"):
            tmp = root / "bf16.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            run_logged([sys.executable, SYNTH, tmp, *SHAPES[shape]], log)
            tmp.rename(ck.hf)
    if not ck.bf16_gguf.exists():
        with phase("convert_hf_to_gguf (bf16)"):
            gguf_view(ck.hf, ck.view)
            tmp = ck.bf16_gguf.with_suffix(".partial")
            script = HERE / "gguf_convert.py"
            run_logged([sys.executable, script, llama.src, ck.view, tmp, "--outtype", "bf16"], log)
            tmp.rename(ck.bf16_gguf)
    if not ck.q4_gguf.exists():
        with phase("llama-quantize Q4_0"):
            tmp = ck.q4_gguf.with_suffix(".partial")
            run_logged([llama.tool("llama-quantize"), ck.bf16_gguf, tmp, "Q4_0"], log)
            tmp.rename(ck.q4_gguf)
    if not (ck.ml_4bit / "config.json").exists():
        with phase("moe-local quantize all-4bit"):
            cmd = ["moe-local", "quantize", ck.hf, ck.ml_4bit, "--recipe", "all-4bit", "--overwrite"]
            run_logged(cmd, log)
    return ck


class _NullPhase:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def gguf_sizes(path: Path, llama: LlamaCpp) -> tuple[int, int]:
    """(dense bytes, expert bytes) of a GGUF file, from its tensor table (``*_exps`` are experts)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from gguf import GGUFReader\n"
        "r = GGUFReader(sys.argv[2]); e = d = 0\n"
        "for t in r.tensors:\n"
        "    n = int(t.n_bytes)\n"
        "    if '_exps' in t.name: e += n\n"
        "    else: d += n\n"
        "print(d, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(llama.src / "gguf-py"), str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    dense, experts = (int(x) for x in out.stdout.split())
    return dense, experts


def moe_local_sizes(path: Path) -> tuple[int, int]:
    """(dense bytes, expert bytes) of a checkpoint as moe-local's ``inspect`` counts them."""
    from moe_local.inspection import inspect_model

    info = inspect_model(path)
    return int(info.dense_bytes), int(info.expert_bytes)
