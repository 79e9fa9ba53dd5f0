"""Ctrl-C: every interrupt of the real program exits 130 with one line, at any moment.

The CLI tests start the program the way its console script does (the ``[project.scripts]``
entry of pyproject.toml) and send SIGINT at many moments: the imports, the model load, the
decode with expert prefetch threads running, and the end of the run. The guard tests run
small programs under ``moe_local.cli.interrupt.guard`` to reach the rare moments on purpose (a
finalizer that swallows the interrupt, a second Ctrl-C during cleanup, one during atexit).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pexpect
import pytest

from moe_local.cli.interrupt import EXIT_CODE, MESSAGE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "import re\nimport sys\nfrom {module} import {func}\nsys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\nsys.exit({func}())\n"  # noqa: E501  (what pip writes)


def _entry() -> tuple[str, str]:
    """The module and function of pyproject.toml's ``moe-local`` script."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["moe-local"].split(":")
    return module, func


def _entry_script() -> str:
    """The console script pip writes for ``moe-local``."""
    module, func = _entry()
    return SCRIPT.format(module=module, func=func)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MOE_LOCAL_THREADS": "1"}


def _default_sigint() -> None:  # pytest may run with SIGINT ignored (a background job); the child must not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Run:
    """The program running in a child process, its stderr read as it comes, with timestamps."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-c", _entry_script(), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            cwd=ROOT,
            env=_env(),
            preexec_fn=_default_sigint,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()  # the program's own SIGINT handler is installed
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        entry_module, seen_entry = f"| {_entry()[0]}", False
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if seen_entry and line.startswith("import time:"):
                self.ready.set()  # an import after the entry module's: the entry function is running
            seen_entry = seen_entry or line.rstrip().endswith(entry_module)
        self.ready.set()

    def finish(self, timeout: float = 60) -> tuple[int, list[str]]:
        """Wait for the exit; return the exit status and stderr without the import-time lines."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code, [ln for ln in self.lines if not ln.startswith("import time:") and ln.strip()]


@pytest.fixture(scope="module")
def endless_model(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny Mixtral with a long context whose greedy replies never reach end-of-sequence."""
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("mixtral", max_position_embeddings=4096)
    out = tmp_path_factory.mktemp("endless") / "model"
    shutil.copytree(src, out)
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"][257] = 0  # EOS scores 0, below the top logit: greedy never picks it
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _assert_interrupted(code: int, lines: list[str], what: str) -> None:
    text = "\n".join(lines)
    assert code == EXIT_CODE, (what, code, text[-2000:])
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, (what, text[-2000:])
    assert lines and lines[-1] == MESSAGE, (what, text[-2000:])
    assert lines.count(MESSAGE) == 1, (what, text[-2000:])


def _interrupt_at(args: list[str], delay: float, twice: bool) -> tuple[float, int, list[str], bool, float]:
    """Interrupt a run ``delay`` s after its entry point; also return how long that run lived."""
    run = _Run(args)
    assert run.ready.wait(60), "the program never got to its entry point"
    ready = time.perf_counter()
    time.sleep(delay)
    sent = run.proc.poll() is None
    if sent:
        run.proc.send_signal(signal.SIGINT)
        if twice:  # a second Ctrl-C while the first one's cleanup runs
            time.sleep(0.005)
            run.proc.send_signal(signal.SIGINT)
    code, lines = run.finish()
    return delay, code, lines, sent, time.perf_counter() - ready


def test_generate_exits_130_with_one_line_whenever_it_is_interrupted(endless_model):
    args = ["generate", str(endless_model), "Once upon a time", "--no-chat", "-n", "80"]
    args += ["--expert-memory", "40KiB"]  # a small budget: experts stream in on prefetch threads
    whole = _Run(args)
    assert whole.ready.wait(60)
    ready = time.perf_counter()
    code, lines = whole.finish()
    length = time.perf_counter() - ready
    assert code == 0, "\n".join(lines)
    assert length < 60, f"the uninterrupted run took {length:.0f} s"  # 20 more would take too long

    rng = random.Random(0)
    n = 20  # one moment in each 20th of the run, jittered; every 4th sends Ctrl-C twice
    moments = [(length * (i + rng.random()) / n, i % 4 == 3) for i in range(n)]
    with ThreadPoolExecutor(2) as pool:  # two at a time on two cores: each still sees every stage
        results = list(pool.map(lambda m: _interrupt_at(args, *m), moments))
    interrupted = 0
    for delay, code, lines, sent, lived in results:
        if not sent:  # the run had already ended: then it must have ended well
            assert code == 0, (delay, "\n".join(lines))
            continue
        # the signal met a run already on its way out (past its last bytecode): it ended well. Judged
        # by that run's own life, not the solo run's: two at a time, a run can take longer than it
        if code == 0 and delay > 0.85 * lived and MESSAGE not in lines:
            continue
        interrupted += 1
        _assert_interrupted(code, lines, f"SIGINT {delay:.2f} s after the entry point started")
    assert interrupted >= n * 0.7  # the last moments may come after a run that went faster ended


def _guard(body: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``body`` (the statements of a function) as a program under the interrupt guard."""
    code = "import atexit, os, signal, sys, threading, time\nfrom moe_local.cli.interrupt import guard\n"
    code += "def run():\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())
    code += "guard(run)\n"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=30,
        preexec_fn=kwargs.pop("preexec_fn", _default_sigint),
        **kwargs,
    )


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


SIGINT_SELF = "os.kill(os.getpid(), signal.SIGINT)"


def test_first_interrupt_runs_cleanup_then_exits_130():
    r = _guard(f"try:\n    {SIGINT_SELF}\n    time.sleep(5)\nfinally:\n    print('cleaned up', flush=True)")
    assert r.returncode == EXIT_CODE
    assert r.stdout == "cleaned up\n"
    _assert_interrupted(r.returncode, _lines(r.stderr), r.stderr)


def test_second_interrupt_during_cleanup_exits_at_once():
    t0 = time.perf_counter()
    r = _guard(f"try:\n    {SIGINT_SELF}\n    time.sleep(5)\nfinally:\n    {SIGINT_SELF}\n    time.sleep(20)")
    assert time.perf_counter() - t0 < 10
    _assert_interrupted(r.returncode, _lines(r.stderr), r.stderr)


def test_interrupt_swallowed_by_a_finalizer_still_stops_the_run():
    body = f"""
class Slow:
    def __del__(self):
        {SIGINT_SELF}  # the KeyboardInterrupt is raised in here, where Python only prints it
        time.sleep(0.05)
Slow()
time.sleep(5)
print('ran to the end', flush=True)
"""
    r = _guard(body)
    assert "ran to the end" not in r.stdout
    _assert_interrupted(r.returncode, _lines(r.stderr), r.stderr)


def _native_module(tmp_path: Path, body: str) -> str:
    """Statements that make ``fakenative`` (module code running ``body``) one of the deferred imports."""
    (tmp_path / "fakenative.py").write_text(body)
    return f"sys.path.insert(0, {str(tmp_path)!r})\nimport moe_local.cli.interrupt as guarded\n" + (
        "guarded.DEFERRED_IMPORTS = ('fakenative',)  # as torch, whose native start-up aborts on it\n"
    )


def test_interrupt_during_native_start_up_waits_for_it(tmp_path):
    body = f"import os, signal, time\n{SIGINT_SELF}\ntime.sleep(0.2)\nprint('start-up done', flush=True)\n"
    r = _guard(_native_module(tmp_path, body) + "import fakenative\ntime.sleep(5)\nprint('ran on')")
    assert r.stdout == "start-up done\n"  # not cut in the middle, and nothing after it
    _assert_interrupted(r.returncode, _lines(r.stderr), r.stderr)


def test_second_interrupt_during_native_start_up_exits_at_once(tmp_path):
    t0 = time.perf_counter()
    body = f"import os, signal, time\n{SIGINT_SELF}\ntime.sleep(0.1)\n{SIGINT_SELF}\ntime.sleep(20)\n"
    r = _guard(_native_module(tmp_path, body) + "import fakenative")
    assert time.perf_counter() - t0 < 10
    _assert_interrupted(r.returncode, _lines(r.stderr), r.stderr)


def test_interrupt_during_exit_and_stuck_threads_do_not_hang():
    t0 = time.perf_counter()
    stuck = "threading.Thread(target=time.sleep, args=(60,)).start()"  # like a prefetch read that never ends
    r = _guard(f"{stuck}\natexit.register(lambda: ({SIGINT_SELF}, time.sleep(20)))\nreturn 0")
    assert time.perf_counter() - t0 < 10
    _assert_interrupted(r.returncode, _lines(r.stderr), r.stderr)
    r = _guard(f"{stuck}\nprint('done', flush=True)\nreturn 3")  # no interrupt: its own code, at once
    assert (r.returncode, r.stdout, r.stderr) == (3, "done\n", "")
    assert time.perf_counter() - t0 < 20


def test_an_ignored_sigint_stays_ignored():
    def ignore() -> None:  # a background job of a shell: Ctrl-C is not meant for it
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    r = _guard(f"{SIGINT_SELF}\ntime.sleep(0.1)\nprint('still here', flush=True)", preexec_fn=ignore)
    assert (r.returncode, r.stdout, r.stderr) == (0, "still here\n", "")


def _spawn_cli(args: list[str]) -> pexpect.spawn:
    env = {**_env(), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    return pexpect.spawn(
        sys.executable,
        ["-c", _entry_script(), *args],
        cwd=str(ROOT),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
        dimensions=(24, 200),
        preexec_fn=_default_sigint,
    )


def test_chat_ctrl_c_stops_a_reply_then_at_the_prompt_exits_130(endless_model):
    child = _spawn_cli(["chat", str(endless_model), "--temperature", "0", "-n", "3000"])
    try:
        child.expect_exact(">>> ")
        child.sendline("Tell me a long story")
        child.expect_exact("long story\r\n")
        child.expect(r"[^\r\n]{12}")  # the reply is streaming
        child.sendintr()
        child.expect_exact("[interrupted]")  # the reply stopped; the chat goes on
        child.expect_exact(">>> ")
        child.sendintr()
        child.expect(pexpect.EOF)
        tail = child.before
    finally:
        child.close()
    assert child.exitstatus == EXIT_CODE, tail
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    assert lines[-1] == MESSAGE and "Traceback" not in tail, tail


def test_serve_stops_gracefully_then_exits_130(tiny_mixtral):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", _entry_script(), "serve", str(tiny_mixtral), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:  # the model is loaded
                        break
            except OSError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = _lines(err)
    assert "Shutting down" in err and "Finished server process" in err, err  # uvicorn's graceful stop
    _assert_interrupted(proc.returncode, lines, err)
