"""Run llama.cpp's own ``convert_hf_to_gguf.py`` on the synthetic checkpoint (a child process).

Usage: ``python gguf_convert.py LLAMA_SRC HF_DIR OUT.gguf [--outtype bf16]``.

The synthetic tokenizer (``moe_local.tiny.make_tokenizer()``: 256 byte tokens, no merges) is
unknown to the converter's pre-tokenizer table, which keys on a hash of a test string's tokens and
refuses unknown ones. Its pre-tokenizer is GPT-2's byte-level regex, so an unrecognised hash is
answered with ``"gpt-2"`` here; everything else, weights included, is the converter's own code.
The benchmarks feed random token ids, so the tokenizer never affects a measured number.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    """Patch the pre-tokenizer lookup, then run the converter as ``__main__``."""
    if len(argv) < 3:
        raise SystemExit("usage: gguf_convert.py LLAMA_SRC HF_DIR OUT.gguf [converter options]")
    src, hf_dir, out, *rest = argv
    root = Path(src).resolve()
    # The converter's own gguf-py first, as the script itself does without NO_LOCAL_GGUF.
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion import base  # the converter's package, next to the script

    original = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(root / "convert_hf_to_gguf.py"), hf_dir, "--outfile", out, *rest]
    runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
