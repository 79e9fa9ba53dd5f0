"""``pull`` against a fake hub on loopback (no network), ``list``, and ``--version``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from moe_local._version import __version__
from moe_local.errors import MoeLocalError
from moe_local.hub import list_models, pull
from tests.helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
COMMIT_MAIN, COMMIT_V2 = "a" * 40, "b" * 40
# what a hub repo may hold that a pull must never fetch: pickles and code
NEVER = [
    "pytorch_model.bin",
    "model.pt",
    "optimizer.pth",
    "rng.pkl",
    "modeling_tiny.py",
    "vocab.py",
    "sub/x.bin",
]
EXTRA = {
    "merges.txt": b"#version: 0.2\n",
    "vocab.json": b"{}",
    "tokenizer.model": b"spm",
    "README.md": b"# hi",
}


class FakeHub:
    """The endpoints huggingface_hub's snapshot_download calls, served from memory on 127.0.0.1.

    ``GET /api/models/{id}/revision/{rev}`` (the commit), ``GET /api/models/{id}/tree/{commit}``
    (the files, sizes and LFS hashes), ``HEAD``/``GET /{id}/resolve/{commit}/{file}`` (metadata,
    then the bytes; a ``Range: bytes=N-`` answers 206 with the rest).
    """

    def __init__(self, repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []
        self.fail: set[str] = set()  # files whose GET answers 503
        self.drop_at: dict[str, int] = {}  # file -> bytes sent before the connection drops (once)
        self.down_after_drop: set[str] = set()  # files that answer 503 once their connection dropped
        self.ignore_range = False  # answer a ranged GET with the whole file (200)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> list[str]:
        """Files whose bytes were served (GET on resolve)."""
        return [
            p.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, p, _ in self.requests
            if m == "GET" and "/resolve/" in p
        ]

    def _send(self, h, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _find(self, repo: str, rev: str):
        if repo not in self.repos:
            return None, "RepoNotFound"
        for name, (commit, files) in self.repos[repo].items():
            if rev in (name, commit):
                return (commit, files), None
        return None, "RevisionNotFound"

    def handle(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path).strip("/").split("/")
        self.requests.append((h.command, h.path, h.headers.get("Range")))
        json_type = {"Content-Type": "application/json"}
        if path[:2] == ["api", "models"] and len(path) >= 6:
            found, err = self._find("/".join(path[2:4]), path[5])
            if err:
                return self._send(h, 404, b'{"error": "not found"}', {"X-Error-Code": err, **json_type}, head)
            commit, files = found
            if path[4] == "revision":
                body = {
                    "id": "/".join(path[2:4]),
                    "sha": commit,
                    "siblings": [{"rfilename": f} for f in files],
                }
            else:  # tree
                body = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest(),
                     "lfs": {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134}}
                    for f, b in files.items()
                ]  # fmt: skip
            return self._send(h, 200, json.dumps(body).encode(), json_type, head)
        if len(path) >= 5 and path[2] == "resolve":
            found, err = self._find("/".join(path[:2]), path[3])
            name = "/".join(path[4:])
            if err or name not in found[1]:
                return self._send(h, 404, b"", {"X-Error-Code": err or "EntryNotFound"}, head)
            commit, files = found
            body = files[name]
            etag = hashlib.sha256(body).hexdigest()
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"',
                       "X-Linked-Size": str(len(body)), "Accept-Ranges": "bytes"}  # fmt: skip
            ranged = h.headers.get("Range", "")
            if not head and name in self.fail:
                return self._send(h, 503, b"busy", {"X-Error-Message": "Service Unavailable"}, head)
            if not head and name in self.drop_at:
                cut = self.drop_at.pop(name)
                h.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    h.send_header(k, v)
                h.end_headers()
                h.wfile.write(body[:cut])
                h.close_connection = True
                if name in self.down_after_drop:
                    self.fail.add(name)
                return None
            if ranged.startswith("bytes=") and not self.ignore_range:
                start = int(ranged[6:].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                return self._send(h, 206, body[start:], headers, head)
            return self._send(h, 200, body, headers, head)
        return self._send(h, 404, b"", {}, head)


@pytest.fixture(scope="module")
def model_files(tiny_checkpoint) -> dict[str, bytes]:
    """A real tiny checkpoint's files, a GPTQ-like config for v2, and files a pull must skip."""
    folder = tiny_checkpoint("mixtral")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return {**files, **EXTRA, **{n: b"import os  # must never be fetched" for n in NEVER}}


@pytest.fixture
def hub(model_files):
    config = json.loads(model_files["config.json"])
    v2 = dict(model_files)
    v2["config.json"] = json.dumps(
        {**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    ).encode()
    server = FakeHub({
        "org/tiny": {"main": (COMMIT_MAIN, model_files), "v2": (COMMIT_V2, v2)},
        "org/pickles": {"main": ("c" * 40, {"config.json": b"{}", "pytorch_model.bin": b"x"})},
    })  # fmt: skip
    yield server
    server.close()


def test_pull_fetches_weights_configs_and_tokenizer_only(hub, model_files, tmp_path):
    cache = tmp_path / "hub"
    seen: list[tuple[int, int]] = []
    result = pull(
        "org/tiny", cache_dir=cache, endpoint=hub.url, progress=lambda s, d, t, n: seen.append((d, t))
    )
    wanted = {n for n in model_files if n not in NEVER and n != "README.md"}
    assert sorted(hub.fetched()) == sorted(wanted)
    assert result.path == cache / "models--org--tiny" / "snapshots" / COMMIT_MAIN
    assert {p.name for p in result.path.iterdir()} == wanted
    for name in wanted:
        assert (result.path / name).read_bytes() == model_files[name]
    total = sum(len(model_files[n]) for n in wanted)
    assert (result.commit, result.files, result.downloaded, result.nbytes) == (
        COMMIT_MAIN,
        len(wanted),
        len(wanted),
        total,
    )
    assert seen and seen[-1] == (total, total) and all(d <= t for d, t in seen)
    # again: everything is cached, no file is fetched twice
    again = pull("org/tiny", cache_dir=cache, endpoint=hub.url)
    assert (again.downloaded, again.nbytes, again.path) == (0, 0, result.path)
    assert sorted(hub.fetched()) == sorted(wanted)


def test_pull_revision(hub, tmp_path):
    cache = tmp_path / "hub"
    result = pull("org/tiny", revision="v2", cache_dir=cache, endpoint=hub.url)
    assert result.commit == COMMIT_V2 and result.path.name == COMMIT_V2
    assert json.loads((result.path / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert any(p.endswith("/revision/v2") for _, p, _ in hub.requests)


def test_a_failed_pull_keeps_finished_files_and_the_next_fetches_the_rest(hub, model_files, tmp_path):
    cache = tmp_path / "hub"
    hub.fail.add("model.safetensors")
    with pytest.raises(MoeLocalError, match=r"cannot fetch org/tiny: .*503") as info:
        pull("org/tiny", cache_dir=cache, endpoint=hub.url)
    assert "\n" not in str(info.value)
    first = set(hub.fetched())
    snapshot = cache / "models--org--tiny" / "snapshots" / COMMIT_MAIN
    kept = {p.name for p in snapshot.iterdir()} if snapshot.exists() else set()
    assert "model.safetensors" not in kept
    hub.fail.clear()
    hub.requests.clear()
    result = pull("org/tiny", cache_dir=cache, endpoint=hub.url)
    assert "model.safetensors" in hub.fetched() and not kept & set(hub.fetched())  # nothing fetched twice
    assert result.downloaded == result.files - len(kept) and first  # the first run did fetch
    assert (result.path / "model.safetensors").read_bytes() == model_files["model.safetensors"]


def test_a_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    from huggingface_hub import constants

    big = bytes(range(256)) * (3 * constants.DOWNLOAD_CHUNK_SIZE // 256)  # three of hf's read chunks
    hub.repos["org/big"] = {"main": ("d" * 40, {"config.json": b"{}", "model.safetensors": big})}
    hub.drop_at["model.safetensors"] = 2 * constants.DOWNLOAD_CHUNK_SIZE + 1000
    result = pull("org/big", cache_dir=tmp_path / "hub", endpoint=hub.url)
    assert (result.path / "model.safetensors").read_bytes() == big
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert ranges[0] is None and len(ranges) == 2
    start = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert start >= constants.DOWNLOAD_CHUNK_SIZE  # went on from what it had, not from 0


def _big_repo(hub) -> bytes:
    from huggingface_hub import constants

    big = bytes(range(256)) * (3 * constants.DOWNLOAD_CHUNK_SIZE // 256)  # three of hf's read chunks
    hub.repos["org/big"] = {"main": ("d" * 40, {"config.json": b"{}", "model.safetensors": big})}
    return big


def _shard_gets(hub) -> list[str | None]:
    return [r for m, p, r in hub.requests if m == "GET" and p.endswith("/model.safetensors")]


def test_a_pull_stopped_mid_file_resumes_it_in_the_next_run(hub, tmp_path):
    """The network goes away mid-shard: the next pull asks only for the bytes it lacks."""
    from huggingface_hub import constants

    big = _big_repo(hub)
    cache = tmp_path / "hub"
    hub.drop_at["model.safetensors"] = 2 * constants.DOWNLOAD_CHUNK_SIZE + 1000
    hub.down_after_drop.add("model.safetensors")
    with pytest.raises(MoeLocalError, match=r"cannot fetch org/big: .*503") as info:
        pull("org/big", cache_dir=cache, endpoint=hub.url)
    assert "\n" not in str(info.value)
    partial = cache / "models--org--big" / "blobs" / (hashlib.sha256(big).hexdigest() + ".incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < len(big) and partial.read_bytes() == big[:kept]
    hub.fail.clear()
    hub.requests.clear()
    seen: list[tuple[int, int]] = []
    result = pull(
        "org/big", cache_dir=cache, endpoint=hub.url, progress=lambda s, d, t, n: seen.append((d, t))
    )
    assert _shard_gets(hub) == [f"bytes={kept}-"]  # one request, from where the first run stopped
    assert (result.path / "model.safetensors").read_bytes() == big
    assert not partial.exists() and result.downloaded == 1
    assert seen[0][0] >= kept and seen[-1] == (len(big), len(big))  # progress starts at what was there


def test_a_resumed_file_that_does_not_match_the_checksum_is_fetched_afresh(hub, tmp_path):
    big = _big_repo(hub)
    cache = tmp_path / "hub"
    partial = cache / "models--org--big" / "blobs" / (hashlib.sha256(big).hexdigest() + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xff" * 5000)  # not this file's beginning
    with pytest.raises(MoeLocalError, match="checksum") as info:
        pull("org/big", cache_dir=cache, endpoint=hub.url)
    assert "\n" not in str(info.value) and not partial.exists()
    assert _shard_gets(hub) == ["bytes=5000-"]
    hub.requests.clear()
    result = pull("org/big", cache_dir=cache, endpoint=hub.url)
    assert _shard_gets(hub) == [None] and (result.path / "model.safetensors").read_bytes() == big


def test_a_server_that_ignores_the_range_sends_the_whole_file_again(hub, tmp_path):
    big = _big_repo(hub)
    cache = tmp_path / "hub"
    partial = cache / "models--org--big" / "blobs" / (hashlib.sha256(big).hexdigest() + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(big[:7000])
    hub.ignore_range = True
    result = pull("org/big", cache_dir=cache, endpoint=hub.url)
    assert _shard_gets(hub) == ["bytes=7000-"]
    assert (result.path / "model.safetensors").read_bytes() == big


def test_pull_errors_are_one_line(hub, tmp_path):
    cache = tmp_path / "hub"
    cases = [
        ("org/missing", {}, "no model org/missing on the hub"),
        ("org/tiny", {"revision": "nope"}, "no such revision"),
        ("org/pickles", {}, "no .safetensors weights"),
        ("not-an-id", {}, "not a hub id"),
        ("../etc", {}, "not a hub id"),
    ]
    for repo, kwargs, message in cases:
        with pytest.raises(MoeLocalError, match=message) as info:
            pull(repo, cache_dir=cache, endpoint=hub.url, **kwargs)
        assert "\n" not in str(info.value)
    assert "pytorch_model.bin" not in hub.fetched()
    closed = FakeHub({})
    url = closed.url
    closed.close()  # nothing listens there any more
    with pytest.raises(MoeLocalError, match=r"cannot (reach the hub|fetch)") as info:
        pull("org/tiny", cache_dir=cache, endpoint=url)
    assert "\n" not in str(info.value)


def _moe_local_folder(home: Path) -> Path:
    folder = home / "demo" / "tiny-experts-4bit"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "dtype": "bfloat16"}))
    (folder / "moe_local.json").write_text(
        json.dumps({"format": "moe-local", "version": 2, "recipe": "experts-4bit"})
    )
    (folder / "dense.safetensors").write_bytes(b"\0" * 5000)
    (home / "demo" / "half.partial").mkdir()
    (home / "demo" / "half.partial" / "config.json").write_text("{}")
    return folder


def test_list_models(hub, model_files, tmp_path):
    cache, home = tmp_path / "hub", tmp_path / "home"
    assert list_models(cache_dir=cache, home=home) == []  # nothing downloaded, no home yet
    pull("org/tiny", cache_dir=cache, endpoint=hub.url)
    pull("org/tiny", revision="v2", cache_dir=cache, endpoint=hub.url)
    folder = _moe_local_folder(home)
    models = list_models(cache_dir=cache, home=home)
    rows = [(m.name, m.where, m.family, m.quantization) for m in models]
    assert rows == [
        ("org/tiny", "hub cache", "mixtral", json.loads(model_files["config.json"])["dtype"]),
        ("org/tiny@v2", "hub cache", "mixtral", "gptq 4-bit"),
        ("tiny-experts-4bit", "moe-local", "qwen2_moe", "moe-local experts-4bit"),
    ]
    assert models[2].path == folder and models[2].nbytes == sum(p.stat().st_size for p in folder.iterdir())
    assert models[0].nbytes >= len(model_files["model.safetensors"])


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_local", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_pull_list_and_load_by_hub_id(hub, model_files, tmp_path):
    """The programs as users run them: HF_ENDPOINT names the hub, HF_HOME the cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), MOE_LOCAL_HOME=str(tmp_path / "home"),
               PYTHONPATH=path, MOE_LOCAL_PROGRESS_SECONDS="0.1")  # fmt: skip
    _moe_local_folder(tmp_path / "home")
    done = _cli(["pull", "org/tiny"], env)
    assert done.returncode == 0, done.stderr
    assert "org/tiny (commit aaaaaaaaaaaa): fetched" in done.stdout
    assert "download: 100%" in done.stderr  # stderr is a pipe here: progress lines, not bars
    listed = _cli(["list", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["where"], r["quantization"]) for r in rows] == [
        ("org/tiny", "hub cache", json.loads(model_files["config.json"])["dtype"]),
        ("tiny-experts-4bit", "moe-local", "moe-local experts-4bit"),
    ]
    table = _cli(["list"], env).stdout.splitlines()
    assert table[0].split() == ["NAME", "WHERE", "FAMILY", "SIZE", "QUANTIZATION"]
    assert table[1].startswith("org/tiny ") and "mixtral" in table[1]
    # offline, by hub id, as every command finds a pulled model
    inspected = _cli(["inspect", "org/tiny"], {**env, "HF_HUB_OFFLINE": "1"})
    assert inspected.returncode == 0, inspected.stderr
    assert "mixtral" in inspected.stdout
    failed = _cli(["pull", "org/missing"], env)
    assert_one_line_error(failed.returncode, failed.stderr, "no model org/missing")


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"moe-local {__version__}\n"


def test_an_etag_that_is_not_a_hub_id_is_refused_before_it_names_a_file(monkeypatch, tmp_path):
    """The ETag names the blob in the cache: '../' or anything but a SHA-256 / git id is refused."""
    import types

    import huggingface_hub.file_download as fd

    from moe_local import hub_blobs

    meta = types.SimpleNamespace(etag="../../outside", size=3, location=None, xet_file_data=None)
    monkeypatch.setattr(fd, "get_hf_file_metadata", lambda url, **kw: meta)
    with pytest.raises(MoeLocalError, match=r"ETag for config\.json is not a SHA-256 or git id"):
        hub_blobs._fetch("org/m", "0" * 40, "config.json", tmp_path / "models--org--m", "http://127.0.0.1:9")
    assert not any(tmp_path.rglob("*"))  # nothing written
