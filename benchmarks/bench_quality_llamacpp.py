"""Quality side by side with llama.cpp: the demo's bf16 source quantized by both engines.

Both engines start from the same weights: the demo's bf16 upcycled SmolLM2 (``build_demo``),
converted to GGUF by llama.cpp's own ``convert_hf_to_gguf.py`` and quantized by ``llama-quantize``
(Q8_0 ... Q2_K, and IQ2 types, which need an importance matrix: ``llama-imatrix`` on the same
calibration text that moe-local's ``--imatrix`` rows use), against moe-local recipes at matching
bits per weight. Scoring is the same on both sides: the first ``--windows`` full 512-token windows
of each corpus' valid split, only the second half of each window scored (``llama-perplexity -c 512``;
moe-local's ``--score second-half``), BOS insertion turned off in llama.cpp so both read the
same token stream, which is checked token by token (``llama-tokenize``) before anything is scored.
Each engine's rows are compared with its own bf16 run.

bits/weight: file size (llama.cpp) or folder size (moe-local, embeddings kept in bf16) x 8 over
all parameters. Rows go to ``benchmarks/quality_llamacpp.json`` (merged across runs) and to a
section at the end of ``benchmarks/QUALITY.md`` (the rest of that file is kept); the plot to
``benchmarks/quality_llamacpp.png``.

    python benchmarks/bench_quality_llamacpp.py                    # everything, 16 windows
    python benchmarks/bench_quality_llamacpp.py --windows 4 --only bf16,Q4_K_M,int4-g64-hqq
    python benchmarks/bench_quality_llamacpp.py --engines moe-local       # one engine's rows
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPORA = ROOT.parent / "shared" / "data" / "corpora"
sys.path[:0] = [str(ROOT), str(HERE)]

from llamacpp.build import default_root, ensure_llamacpp  # noqa: E402

CORPUS_NAMES = ("shakespeare", "brown")
CONTEXT = 512
EXTRA_TOOLS = ("llama-perplexity", "llama-tokenize", "llama-imatrix")
NO_BOS = ("--override-kv", "tokenizer.ggml.add_bos_token=bool:false")
LLAMA_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ2_M", "IQ2_XS")
NEEDS_IMATRIX = ("IQ2_M", "IQ2_XS")
# name -> (scheme for experts and attention, or "recipe:NAME"; imatrix)
MOE_ROWS = {
    # the recipe ladder (moe_local/quant_recipes/q*.toml), with and without importance weighting
    "q8": ("recipe:q8", False),
    "q6+imatrix": ("recipe:q6", True),
    "q5+imatrix": ("recipe:q5", True),
    "q4+imatrix": ("recipe:q4", True),
    "q4": ("recipe:q4", False),
    "q3+imatrix": ("recipe:q3", True),
    "q2+imatrix": ("recipe:q2", True),
    "under-3bit+imatrix": (f"recipe:{HERE / 'recipes' / 'under-3bit.toml'}", True),
    "experts-ternary+imatrix": (f"recipe:{HERE / 'recipes' / 'experts-ternary.toml'}", True),
    # mixed precision by measured error (choose rules) at the uniform recipes' expert bits
    "under-3bit-mixed+imatrix": (f"recipe:{HERE / 'recipes' / 'under-3bit-mixed.toml'}", True),
    "q2-mixed+imatrix": ("recipe:q2-mixed", True),  # shipped: moe_local/quant_recipes/q2-mixed.toml
    "q3-mixed+imatrix": (f"recipe:{HERE / 'recipes' / 'q3-mixed.toml'}", True),
    # GPTQ at 3 bits in natural column order and with activation order (static groups), and rtn
    "int3-g64-gptq": ("int3-g64-gptq", False),
    "int3-g64-gptq+act-order": ("int3-g64-gptq", False),
    "int3-g64-rtn": ("int3-g64", False),
    "int8-g64": ("int8-g64", False),
    "v100-int8": ("recipe:v100-int8", False),
    "int4-g32-hqq": ("int4-g32-hqq", False),
    "int4-g32-hqq+imatrix": ("int4-g32-hqq", True),
    "experts-4bit": ("recipe:experts-4bit", False),
    "int4-g64-hqq": ("int4-g64-hqq", False),
    "int4-g64-hqq+imatrix": ("int4-g64-hqq", True),
    "int4-g64-rtn": ("int4-g64", False),
    "int4-g64-rtn+imatrix": ("int4-g64", True),
    "int3-g32-hqq": ("int3-g32-hqq", False),
    "int3-g32-hqq+imatrix": ("int3-g32-hqq", True),
    "int3-g64-hqq": ("int3-g64-hqq", False),
    "int3-g64-hqq+imatrix": ("int3-g64-hqq", True),
    "int2-g32-hqq+imatrix": ("int2-g32-hqq", True),
    "int2-g16-hqq": ("int2-g16-hqq", False),
}
SECTION = "## Side by side with llama.cpp (`bench_quality_llamacpp.py`)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    """Run a tool; its output is returned, and shown in full when it fails."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def ensure_tools(root: Path, jobs: int):
    """The speed benchmark's llama.cpp build, plus the three tools this benchmark needs."""
    llama = ensure_llamacpp(root, jobs=jobs, log=log)
    missing = [t for t in EXTRA_TOOLS if not llama.tool(t).is_file()]
    if missing:
        log(f"building {', '.join(missing)}")
        run(["cmake", "--build", root / "build", f"-j{jobs}", "--target", *missing])
    return llama


def make_texts(work: Path, tokenizer, windows: int) -> dict[str, tuple[Path, list[int]]]:
    """Per corpus, a text file holding at least ``windows`` windows, and moe-local's ids of it."""
    out = {}
    need = windows * CONTEXT
    for corpus in CORPUS_NAMES:
        text = (CORPORA / corpus / "valid.txt").read_text(encoding="utf-8")
        chars = min(len(text), need * 6 + 4096)
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        while len(ids) < need + 64 and chars < len(text):
            chars = min(len(text), chars * 2)
            ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) < need:
            raise SystemExit(f"{corpus}/valid.txt has {len(ids)} tokens, fewer than {windows} windows")
        path = work / f"{corpus}-valid-{windows}w.txt"
        path.write_text(text[:chars], encoding="utf-8")
        out[corpus] = (path, ids[:need])
    return out


def check_token_streams(llama, gguf: Path, texts) -> None:
    """llama.cpp's tokens of each text equal moe-local's, for every token that is scored."""
    for corpus, (path, ids) in texts.items():
        res = run(
            [llama.tool("llama-tokenize"), "-m", gguf, "-f", path, "--ids", "--no-bos", "--log-disable"]
        )
        theirs = json.loads(res.stdout.strip().splitlines()[-1])[: len(ids)]
        if theirs != ids:
            first = next(
                (i for i, (a, b) in enumerate(zip(theirs, ids, strict=False)) if a != b), len(theirs)
            )
            raise SystemExit(f"{corpus}: token streams differ at token {first} (llama.cpp vs moe-local)")
        log(f"{corpus}: token streams identical ({len(ids)} tokens)")


def calibration_file(work: Path) -> Path:
    """Training-split text (never the scored valid split) for every importance-weighted row."""
    path = work / "calibration.txt"
    parts = [(CORPORA / c / "train.txt").read_text()[:60_000] for c in CORPUS_NAMES]
    path.write_text("\n\n".join(parts))
    return path


def total_params(source: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in source.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                n += math.prod(st.get_slice(k).get_shape())
    return n


def llama_ppl(llama, gguf: Path, texts, windows: int, threads: int) -> dict[str, float]:
    out = {}
    for corpus, (path, _) in texts.items():
        cmd = [llama.tool("llama-perplexity"), "-m", gguf, "-f", path, "-c", CONTEXT, "-b", CONTEXT]
        cmd += ["--chunks", windows, "-t", threads, *NO_BOS]
        res = run(cmd)
        text = res.stdout + res.stderr
        chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
        if not chunks or int(chunks.group(1)) != windows:
            raise SystemExit(f"llama-perplexity did not score {windows} windows of {corpus}:\n{text[-2000:]}")
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
        if not found:
            raise SystemExit(f"no perplexity in llama-perplexity's output:\n{text[-2000:]}")
        out[corpus] = float(found.group(1))
    return out


def moe_ppl(model, texts) -> dict[str, float]:
    from moe_local.evaluate import window_nll

    out = {}
    for corpus, (_, ids) in texts.items():
        nll, scored = window_nll(model, torch.tensor(ids), CONTEXT, batch=8, score="second-half")
        out[corpus] = math.exp(nll / scored)
    return out


def llama_row(name: str, llama, bf16: Path, work: Path, texts, args, params: int) -> dict:
    if name == "bf16":
        gguf = bf16
    else:
        gguf = work / f"{name}.gguf"
        if not gguf.exists():
            cmd = [llama.tool("llama-quantize")]
            if name in NEEDS_IMATRIX:
                cmd += ["--imatrix", llama_imatrix(llama, bf16, work, args.threads)]
            run([*cmd, bf16, gguf.with_suffix(".partial"), name, args.threads])
            gguf.with_suffix(".partial").rename(gguf)
    ppl = llama_ppl(llama, gguf, texts, args.windows, args.threads)
    label = name + (" (imatrix)" if name in NEEDS_IMATRIX else "")
    return {
        "engine": "llama.cpp",
        "scheme": label,
        "bpw": round(8 * gguf.stat().st_size / params, 2),
        "ppl": ppl,
    }


def llama_imatrix(llama, bf16: Path, work: Path, threads: int) -> Path:
    """llama.cpp's importance matrix of the bf16 GGUF on the calibration text (made once)."""
    out = work / "imatrix.gguf"
    if not out.exists():
        cal = calibration_file(work)
        cmd = [llama.tool("llama-imatrix"), "-m", bf16, "-f", cal, "-o", out, "-c", CONTEXT, "-b", CONTEXT]
        run([*cmd, "--chunks", "8", "-t", threads, *NO_BOS])
    return out


def moe_row(name: str, source: Path, work: Path, texts, params: int) -> dict:
    import moe_local
    from moe_local.config import LoadOptions
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    scheme, imatrix = MOE_ROWS[name]
    out = work / f"moe-{name}"
    if not (out / "moe_local.json").exists():
        if scheme.startswith("recipe:"):
            recipe = load_recipe(scheme.removeprefix("recipe:"))
        else:
            path = work / f"recipe-{scheme}.toml"
            path.write_text(
                f'description = "experts and attention {scheme}"\n'
                f'[[rule]]\nmatch = "*.experts.*"\nscheme = "{scheme}"\n'
                f'[[rule]]\nmatch = "*.self_attn.*"\nscheme = "{scheme}"\n'
                '[[rule]]\nmatch = "*"\nscheme = "keep"\n'
            )
            recipe = load_recipe(str(path))
        gptq = "gptq" in scheme
        cal = calibration_file(work) if imatrix or gptq else None
        act_order = name.endswith("+act-order")
        t0 = time.perf_counter()
        quantize_checkpoint(
            source, out, recipe, overwrite=True, calibration=cal, imatrix=imatrix, act_order=act_order
        )
        log(f"quantized {name} in {time.perf_counter() - t0:.0f} s")
    folder = sum(
        p.stat().st_size for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")
    )
    lm = moe_local.load(out, LoadOptions(dtype="float32"))
    label = Path(scheme.removeprefix("recipe:")).stem if scheme.startswith("recipe:") else scheme
    label += " + imatrix" if imatrix else ""
    label += " + act-order" if name.endswith("+act-order") else ""
    return {
        "engine": "moe-local",
        "scheme": label,
        "bpw": round(8 * folder / params, 2),
        "ppl": moe_ppl(lm.model, texts),
    }


def key_of(engine: str, name: str, windows: int) -> str:
    """Rows of runs with different window counts are kept apart (their Δ would not compare)."""
    return f"{engine}:{name}@{windows}"


def delta(rows: dict, row: dict, corpus: str) -> float | None:
    """Perplexity increase in % over the same engine's bf16 run on the same windows."""
    base = rows.get(key_of(row["engine"], "bf16", row["windows"]))
    return None if base is None else 100 * (row["ppl"][corpus] / base["ppl"][corpus] - 1)


def write_section(md: Path, rows: dict, args, bf16_bpw: float) -> None:
    """Replace (or append) this benchmark's section at the end of QUALITY.md; the rest stays."""
    lines = [
        SECTION,
        "",
        "Regenerate with `python benchmarks/bench_quality_llamacpp.py` (rows merged into "
        f"`{args.json}`; plot: `{args.png}`). Same bf16 source for both engines (the demo, "
        "`moe-local demo --keep-source`), converted to GGUF by llama.cpp's `convert_hf_to_gguf.py`; same "
        "token streams (checked token by token), same windows: the first N full 512-token windows of "
        "each valid split, second half of each scored (`llama-perplexity -c 512`, BOS insertion off; "
        "`moe-local eval --score second-half`). Δ is against each engine's own bf16 run on the same "
        f"windows. bits/weight: file or folder size x 8 over all parameters (bf16: {bf16_bpw:.2f}; "
        "moe-local folders keep embeddings in bf16 unless the recipe quantizes them, as the q ladder "
        "does). IQ2 types and `+ imatrix` rows use importance "
        "statistics from the same calibration text (60,000 characters of each train split). "
        "Fewer than 16 windows: indicative only.",
        "",
        "| engine | scheme | bits/weight | windows | shakespeare ppl | Δ | brown ppl | Δ | measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows.values(), key=lambda r: (-r["windows"], r["engine"], -r["bpw"])):
        cells = [row["engine"], row["scheme"], f"{row['bpw']:.2f}", str(row["windows"])]
        for corpus in CORPUS_NAMES:
            d = delta(rows, row, corpus)
            cells += [f"{row['ppl'][corpus]:.3f}", "-" if d is None else f"{d:+.2f}%"]
        cells.append(row["date"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *target_lines(rows, args.windows)]
    text = md.read_text() if md.exists() else ""
    head, found, tail = text.partition(SECTION)
    rest = tail[tail.find("\n## ") :] if found and "\n## " in tail else ""
    md.write_text(head.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n" + rest)


def llama_reference(rows: dict, corpus: str, windows: int, bpw: float) -> float | None:
    """llama.cpp's Δ at ``bpw``: its Pareto front (best Δ at that many bits or fewer) interpolated
    linearly between its types, clamped to the end points outside them."""
    pts = sorted(
        (r["bpw"], delta(rows, r, corpus))
        for r in rows.values()
        if r["engine"] == "llama.cpp" and r["windows"] == windows and r["scheme"] != "bf16"
    )
    front: list[tuple[float, float]] = []
    for b, d in pts:
        if d is not None and (not front or d < front[-1][1]):
            front.append((b, d))
    if not front:
        return None
    if bpw <= front[0][0]:
        return front[0][1]
    for (b0, d0), (b1, d1) in itertools.pairwise(front):
        if b0 <= bpw <= b1:
            return d0 + (d1 - d0) * (bpw - b0) / (b1 - b0)
    return front[-1][1]


def target_lines(rows: dict, windows: int) -> list[str]:
    """The issue's targets, checked on the rows of ``windows`` windows (computed, not written by hand)."""
    ladder = ("q8", "q6", "q5", "q4", "q3", "q2", "under-3bit")  # recipes; scheme rows are probes
    ladder += ("q3-mixed", "q2-mixed", "under-3bit-mixed", "experts-ternary")  # recipe files of benchmarks/
    ours = [
        r
        for r in rows.values()
        if r["engine"] == "moe-local" and r["windows"] == windows and r["scheme"].split(" ")[0] in ladder
    ]
    out = [
        f"Targets ({windows} windows; computed from the recipe rows above; llama.cpp's Δ at a bits/weight "
        "is its best type at that many bits or fewer, interpolated between types, its lowest type below "
        "them):",
        "",
    ]

    def deltas(r) -> list[float | None]:
        return [delta(rows, r, c) for c in CORPUS_NAMES]

    for r in (r for r in ours if r["scheme"] != "bf16" and r["bpw"] >= 8):
        ds = deltas(r)
        ok = all(d is not None and d <= 0.5 for d in ds)
        out.append(f"- 8-bit within +0.5%: {r['scheme']} {fmt(ds)}: {'met' if ok else 'MISSED'}")
    for r in sorted((r for r in ours if 3.5 <= r["bpw"] <= 6), key=lambda r: -r["bpw"]):
        ds = deltas(r)
        refs = [llama_reference(rows, c, windows, r["bpw"]) for c in CORPUS_NAMES]
        ok = all(d is not None and ref is not None and d <= ref for d, ref in zip(ds, refs, strict=True))
        line = f"- at most llama.cpp's Δ at {r['bpw']:.2f} bits/weight: {r['scheme']} {fmt(ds)}"
        line += f" against {fmt(refs)}: {'met' if ok else 'MISSED'}"
        if 4.5 <= r["bpw"] <= 5.7:
            ok3 = all(d is not None and d <= 3.0 for d in ds)
            line += f"; within +3% (4.5-5.7 bits/weight): {'met' if ok3 else 'MISSED'}"
        out.append(line)
    low = [r for r in ours if r["bpw"] < 3]
    if not low:
        out.append("- a recipe under 3 bits/weight within +30%: no moe-local row under 3 bits/weight yet")
    for r in low:
        ds = deltas(r)
        ok = all(d is not None and d <= 30 for d in ds)
        out.append(f"- under 3 bits/weight within +30%: {r['scheme']} {fmt(ds)}: {'met' if ok else 'MISSED'}")
    for r in (r for r in ours if r["scheme"].startswith("experts-ternary")):
        ds = deltas(r)
        ok = all(d is not None and d <= 100 for d in ds)
        verdict = "usable" if ok else "NOT usable"
        out.append(
            f"- sub-2-bit experts (ternary, 1.975 bits/weight; usable: perplexity at most doubled): "
            f"{r['scheme']} at {r['bpw']:.2f} bits/weight {fmt(ds)}: {verdict}"
        )
    return out


def fmt(ds) -> str:
    return " / ".join("-" if d is None else f"{d:+.2f}%" for d in ds)


def plot(path: Path, rows: dict, windows: int) -> None:
    """Bits per weight against the perplexity increase, one panel per corpus (rows of ``windows``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, corpus in zip(axes, CORPUS_NAMES, strict=True):
        for engine, style in (("llama.cpp", "o-"), ("moe-local", "s")):
            pts = sorted(
                (r["bpw"], delta(rows, r, corpus), r["scheme"])
                for r in rows.values()
                if r["engine"] == engine and r["windows"] == windows and r["scheme"] != "bf16"
                and delta(rows, r, corpus) is not None
            )  # fmt: skip
            if not pts:
                continue
            floor = [max(p[1], 0.05) for p in pts]  # a log axis: gains (negative) drawn at 0.05%
            ax.plot([p[0] for p in pts], floor, style, label=engine)
            for (x, _, name), y in zip(pts, floor, strict=True):
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (whole file or folder)")
        ax.set_title(f"{corpus} ({windows} windows, second halves)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity increase over bf16, % (log)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cache = Path(os.environ.get("MOE_LOCAL_BENCH_CACHE", "~/.cache/moe-local-bench")).expanduser()
    parser.add_argument("--work", default=str(cache / "quality"), help="GGUFs and quantized folders")
    parser.add_argument("--windows", type=int, default=16, help="512-token windows per corpus")
    parser.add_argument(
        "--only", default="", help="comma-separated rows: bf16, llama.cpp types, moe-local rows"
    )
    parser.add_argument("--engines", default="llama.cpp,moe-local", help="which engines' rows to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/quality_llamacpp.json")
    parser.add_argument("--md", default="benchmarks/QUALITY.md")
    parser.add_argument("--png", default="benchmarks/quality_llamacpp.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_local.demo import build_demo

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    llama = ensure_tools(default_root(cache), args.threads)
    source = build_demo(downloads=Path("~/.cache/moe-local/downloads").expanduser())
    params = total_params(source)
    bf16 = work / "bf16.gguf"
    if not bf16.exists():
        log("convert_hf_to_gguf (bf16)")
        partial = bf16.with_suffix(".partial")
        run(
            [
                sys.executable,
                llama.src / "convert_hf_to_gguf.py",
                source,
                "--outfile",
                partial,
                "--outtype",
                "bf16",
            ]
        )
        bf16.with_suffix(".partial").rename(bf16)
    texts = make_texts(work, AutoTokenizer.from_pretrained(source), args.windows)
    check_token_streams(llama, bf16, texts)
    rows = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    only = set(filter(None, args.only.split(",")))
    engines = args.engines.split(",")
    for engine, names in (("llama.cpp", ("bf16", *LLAMA_TYPES)), ("moe-local", ("bf16", *MOE_ROWS))):
        if engine not in engines:
            continue
        for name in names:
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            if engine == "llama.cpp":
                row = llama_row(name, llama, bf16, work, texts, args, params)
            elif name == "bf16":
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
                row = {"engine": engine, "scheme": "bf16", "ppl": moe_ppl(model, texts)}
                row["bpw"] = round(
                    8 * sum(p.stat().st_size for p in source.glob("*.safetensors")) / params, 2
                )
                del model
            else:
                row = moe_row(name, source, work, texts, params)
            row.update(windows=args.windows, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            rows[key_of(engine, name, args.windows)] = row
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
            took = time.perf_counter() - t0
            log(f"{engine} {name}: {row['ppl']} at {row['bpw']} bits/weight ({took:.0f} s)")
    bf16_bpw = rows.get(key_of("llama.cpp", "bf16", args.windows), {}).get("bpw", 16.0)
    write_section(Path(args.md), rows, args, bf16_bpw)
    plot(Path(args.png), rows, args.windows)


if __name__ == "__main__":
    main()
