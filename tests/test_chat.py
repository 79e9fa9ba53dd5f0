"""The chat REPL: through a real pseudo-terminal, from a pipe, and in-process for the edge cases."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from moe_local.chat import Conversation, chat
from moe_local.chat_commands import describe_placement
from moe_local.config import LoadOptions, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
ESC = "\x1b"
# A chat whose replies never end at EOS, so each one runs to max_tokens (or to Ctrl-C).
SPAWN = (
    "import sys, torch; torch.set_num_threads(1); from moe_local.chat import chat; "
    "from moe_local.config import SamplingParams; "
    "sys.exit(chat(sys.argv[1], system='You are terse.', "
    "params=SamplingParams(max_tokens=8, temperature=0.7, seed=0, ignore_eos=True)))"
)
LENGTH = "[stopped at max_tokens=8"


@pytest.fixture(scope="module")
def long_context_model(tiny_checkpoint) -> Path:
    """The tiny Mixtral with a 64k context, so a reply can run until it is interrupted."""
    return tiny_checkpoint("mixtral", max_position_embeddings=65536)


def _spawn(model: Path) -> pexpect.spawn:
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(ROOT)}
    env.pop("NO_COLOR", None)
    return pexpect.spawn(
        sys.executable,
        ["-c", SPAWN, str(model)],
        cwd=str(ROOT),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
        dimensions=(24, 200),
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """Run as a terminal's foreground program: pytest started as a background job (``cmd &``)
    ignores SIGINT, and a child inherits an ignored signal, so Ctrl-C would not reach the chat."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ask(child: pexpect.spawn, line: str, *expected: str) -> None:
    """Type a line, wait for each expected text in order, then for the next prompt."""
    child.sendline(line)
    for text in expected:
        child.expect_exact(text)
    child.expect_exact(">>> ")


def test_terminal_session(long_context_model, tmp_path):
    child = _spawn(long_context_model)
    try:
        child.expect_exact("experts: all 8 in RAM")  # the placement line after the progress bar
        child.expect_exact(">>> ")
        _ask(child, "Hello there", LENGTH)  # a streamed reply of max_tokens tokens
        _ask(child, "/stats", "prefill:", "tok/s", "time to first token", "decode: 8 tokens", "hit rate")
        _ask(child, "/stats", "from RAM", "from disk", "process RSS", "expert cache")
        _ask(child, "/set temperature hot", "error: temperature must be a number")
        _ask(child, "/set top_p 0", "error: top_p must be in (0, 1]")
        _ask(child, "/set max_tokens 60000", "max_tokens = 60000")

        child.sendline("Tell me a long story")
        child.expect_exact("long story\r\n")
        child.expect(r"[^\r\n]{12}")  # the reply is streaming
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        _ask(child, "/set max_tokens 8", "max_tokens = 8")
        _ask(child, "/stats", "finish: interrupted")
        _ask(child, "And now?", LENGTH)  # the conversation goes on after Ctrl-C

        child.sendline('"""')
        child.expect_exact("... ")
        child.sendline("first line")
        child.expect_exact("... ")
        child.sendline("second line")
        child.expect_exact("... ")
        _ask(child, '"""', LENGTH)

        saved = tmp_path / "chat.json"
        _ask(child, f"/save {saved}", "saved 9 messages")
        _ask(child, "/clear", "conversation cleared")
        _ask(child, "/stats", "context: 0 of 65536 tokens")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 4
    assert messages[0]["content"] == "You are terse."
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["Hello there", "Tell me a long story", "And now?", "first line\nsecond line"]
    assert messages[4].get("interrupted") is True and messages[4]["content"]
    assert not any(m.get("interrupted") for i, m in enumerate(messages) if i != 4)


def test_ctrl_c_at_prompt_exits_130_cleanly(tiny_mixtral):
    child = _spawn(tiny_mixtral)
    try:
        child.expect_exact(">>> ")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 130  # an interrupted program; Ctrl-D and /bye exit 0
    assert "Traceback" not in (child.before or "")


def test_piped_stdin_is_plain(tiny_mixtral):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "MOE_LOCAL_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "moe_local.chat", str(tiny_mixtral), "-n", "6", "--seed", "1"],
        input="hi\n/stats\nbye now\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert ESC not in r.stdout and ESC not in r.stderr
    assert ">>>" not in r.stdout
    assert "decode: 6 tokens" in r.stdout and "hit rate" in r.stdout
    assert "experts: all 8 in RAM" in r.stderr  # notices go to stderr, replies to stdout
    assert "Traceback" not in r.stderr


def _run(lm, text: str, capsys, **kwargs) -> tuple[int, str, str]:
    out = io.StringIO()
    params = kwargs.pop("params", SamplingParams(max_tokens=4, temperature=0.7, seed=0, ignore_eos=True))
    code = chat(lm, input=io.StringIO(text), output=out, params=params, **kwargs)
    return code, out.getvalue(), capsys.readouterr().err


def test_long_history_is_trimmed_with_a_notice(tiny_lm, tmp_path, capsys):
    saved = tmp_path / "c.json"
    turns = [f"message {i}: " + "x" * 90 for i in range(4)]
    script = "\n".join([*turns, "y" * 400, "still here", f"/save {saved}"]) + "\n"
    code, _, err = _run(tiny_lm, script, capsys, system="SYS")
    assert code == 0
    assert "left the model's view" in err
    assert "error: message is too long" in err and err.count("error:") == 1
    data = json.loads(saved.read_text())
    users = [m["content"] for m in data["messages"] if m["role"] == "user"]
    assert users == [*turns, "still here"]  # /save keeps trimmed turns; the too-long one was dropped
    assert data["messages"][0] == {"role": "system", "content": "SYS"}


def test_fit_keeps_system_and_newest_message(tiny_lm):
    conv = Conversation("be brief")
    for i in range(6):
        conv.add("user", f"question {i} " + "q" * 40)
        conv.add("assistant", "a" * 40)
    conv.add("user", "last")
    dropped, tokens = conv.fit(tiny_lm, max_tokens=64)
    window = conv.window()
    assert dropped > 0 and tokens + 64 <= tiny_lm.context
    assert window[0] == {"role": "system", "content": "be brief"}
    assert window[1]["role"] == "user" and window[-1] == {"role": "user", "content": "last"}


def test_set_commands_and_bad_values(tiny_lm, tmp_path, capsys):
    saved = tmp_path / "s.json"
    script = (
        "/set\n/set temperature -1\n/set top_k many\n/set colour blue\n/set max_tokens\n"
        "/set top_k 5\n/set seed none\n/set system Be kind.\n/nope\n"
        f'"""\n/not a command\nsecond\n"""\n/save {saved}\n/save\n/bye\nnot read\n'
    )
    code, out, err = _run(tiny_lm, script, capsys)
    assert code == 0
    assert "temperature = 0.7" in out and "top_k = 5" in out and "seed = None" in out
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: temperature must be >= 0",
        "error: top_k must be an integer, not 'many'",
        "error: cannot set 'colour'; choose system, temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_tokens, seed",
        "error: /set max_tokens needs a value (an integer)",
        "error: unknown command /nope; /help lists the commands",
        "error: /save needs a file name, e.g. /save chat.json",
    ]
    data = json.loads(saved.read_text())
    assert data["params"]["top_k"] == 5 and data["params"]["seed"] is None
    assert data["messages"][0] == {"role": "system", "content": "Be kind."}
    assert data["messages"][1] == {"role": "user", "content": "/not a command\nsecond"}
    assert ESC not in out


def test_ctrl_c_at_prompt_in_process(tiny_lm, capsys):
    class Interrupting(io.StringIO):
        def readline(self, *args) -> str:
            raise KeyboardInterrupt

    assert chat(tiny_lm, input=Interrupting(), output=io.StringIO()) == 130


def test_placement_line_with_an_expert_budget(tiny_mixtral):
    from moe_local.loading.loader import load

    lm = load(tiny_mixtral, LoadOptions(expert_memory=32 * 1024))
    try:
        line = describe_placement(lm)
    finally:
        lm.store.close()
    assert "on cpu" in line and "1 of 8 slots in RAM" in line and "7 read from disk" in line


def test_template_error_is_one_line_and_the_repl_goes_on(tiny_lm, monkeypatch, capsys):
    monkeypatch.setattr(tiny_lm.tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    code, out, err = _run(tiny_lm, "hi\nthere\n/stats\n", capsys)
    assert code == 0
    assert err.count(f"error: the chat template of {tiny_lm.name} failed: roles must alternate") == 2
    assert "Traceback" not in err
    assert "last reply: none yet" in out


def test_undecodable_input_bytes_cost_a_character_not_the_chat(tiny_lm, capsys):
    # A UTF-8 locale decodes standard input strictly: a stray byte used to end the chat.
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\nhi\n"), encoding="utf-8", errors="strict")
    out = io.StringIO()
    params = SamplingParams(max_tokens=2, temperature=0.7, seed=0, ignore_eos=True)
    assert chat(tiny_lm, input=stdin, output=out, params=params, system="be \udcff brief") == 0
    err = capsys.readouterr().err
    assert err.count(LENGTH.replace("8", "2")) == 2 and "error" not in err  # two replies


def test_save_to_an_impossible_name_is_one_line_and_the_repl_goes_on(tiny_lm, tmp_path, capsys):
    saved = tmp_path / "ok.json"
    script = f"/save bad\x00name.json\n/save ~no-such-user-here/c.json\n/save {saved}\n"
    code, out, err = _run(tiny_lm, script, capsys)
    assert code == 0
    lines = err.strip().splitlines()
    assert lines[-2:] == [
        "error: cannot save to 'bad\\x00name.json': a file name cannot hold a NUL character",
        "error: cannot save to ~no-such-user-here/c.json: no home folder for ~no-such-user-here",
    ]
    assert "saved 0 messages" in out and saved.exists()
