"""Find or build llama.cpp (``llama-bench``, ``llama-quantize``) in the benchmark cache.

The sources are the ``vendor/llama.cpp`` tree of the ``llama-cpp-python`` sdist, fetched with
``pip download --no-binary :all: --no-deps llama-cpp-python``; the build is CPU only, Release,
``-DGGML_NATIVE=ON``, without curl or OpenSSL, two jobs (about 15 minutes on 2 idle cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("llama-bench", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)


@dataclass(frozen=True)
class LlamaCpp:
    """A usable llama.cpp: its source tree (for the converter) and built tools."""

    root: Path  # the cache folder: src/, build/, SOURCE_VERSION
    version: str  # the llama-cpp-python release the sources came from

    @property
    def src(self) -> Path:
        """The llama.cpp source tree (``convert_hf_to_gguf.py`` lives here)."""
        return self.root / "src"

    def tool(self, name: str) -> Path:
        """The path of a built tool, e.g. ``llama-bench``."""
        return self.root / "build" / "bin" / name

    def commit(self) -> str:
        """llama.cpp's build number and commit as llama-bench reports them (best effort)."""
        res = subprocess.run([str(self.tool("llama-bench")), "--version"], capture_output=True, text=True)
        text = (res.stdout + res.stderr).strip().splitlines()
        return text[0] if text else "unknown"


def default_root(cache: Path) -> Path:
    """``$MOE_LOCAL_BENCH_LLAMACPP`` or ``CACHE/llama.cpp``."""
    env = os.environ.get("MOE_LOCAL_BENCH_LLAMACPP")
    return Path(env).expanduser() if env else cache / "llama.cpp"


def is_built(root: Path) -> bool:
    """Whether every tool this benchmark needs is built under ``root``."""
    return all((root / "build" / "bin" / t).is_file() for t in TARGETS) and (root / "src").is_dir()


def _fetch_sources(root: Path, log) -> str:
    """Unpack ``vendor/llama.cpp`` of the llama-cpp-python sdist into ``root/src``; its version."""
    sdist_dir = root / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        cmd += ["llama-cpp-python", "-d", str(sdist_dir)]
        log(" ".join(cmd))
        subprocess.run(cmd, check=True)
        tarballs = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    tarball = tarballs[-1]
    version = tarball.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = root / "src.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix) :]
        tf.extractall(tmp, members=[m for m in members if m.name], filter="data")
    tmp.rename(root / "src")
    (root / "SOURCE_VERSION").write_text(version + "\n")
    return version


def ensure_llamacpp(root: Path, *, jobs: int = 2, log=print) -> LlamaCpp:
    """The llama.cpp under ``root``, fetched and built first when missing (log in ``build.log``)."""
    root.mkdir(parents=True, exist_ok=True)
    version_file = root / "SOURCE_VERSION"
    if not (root / "src").is_dir():
        _fetch_sources(root, log)
    version = version_file.read_text().strip() if version_file.exists() else "unknown"
    if is_built(root):
        return LlamaCpp(root, version)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(root / "src"), "-B", str(root / "build"), *generator, *CMAKE_FLAGS]
    build = ["cmake", "--build", str(root / "build"), f"-j{jobs}", "--target", *TARGETS]
    with open(root / "build.log", "a") as out:
        for cmd in (configure, build):
            log(" ".join(cmd) + f"  (log: {root / 'build.log'})")
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)
    return LlamaCpp(root, version)
