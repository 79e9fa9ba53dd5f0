"""``moe-local chat``: an interactive REPL over a loaded MoE model.

Each reply streams token by token; the model's chat template builds every prompt from the
conversation (system prompt, then user and assistant turns). Slash commands
(``moe_local.chat_commands``) change settings, show stats and save the conversation.

When input and output are both terminals the REPL uses rich (colour, a load progress bar, a
``>>>`` prompt with line editing). Otherwise it is plain: no prompt and no escape codes;
replies and command answers go to ``output``, notices and errors to standard error; it ends
at the end of input.

Ctrl-C during a reply stops it after the current token (a second Ctrl-C stops at once); the
partial reply stays in the conversation, marked ``"interrupted": true`` in ``/save`` files but
sent to the model unmarked. Ctrl-D at the prompt (or ``/bye``) exits with code 0; Ctrl-C at the
prompt exits with code 130, as an interrupted program does (the CLI adds ``error: interrupted``).
"""

from __future__ import annotations

import dataclasses
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from moe_local.cli import interrupt
from moe_local.config import LoadOptions, SamplingParams
from moe_local.errors import MoeLocalError, first_line

if TYPE_CHECKING:
    from rich.console import Console

    from moe_local.generation import GenerationResponse
    from moe_local.loading.loader import LoadedModel

DEFAULT_PARAMS = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=512)
PROMPT, CONTINUATION, FENCE = ">>> ", "... ", '"""'
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls except tab and newline
_RL_START, _RL_END = "\001", "\002"  # readline: the characters between these take no column


class Conversation:
    """The turns of a chat, and the window of them that still fits the model's context.

    ``messages`` keeps every user and assistant turn since the last ``clear``; ``start`` is the
    first one the model still sees (older ones were trimmed to fit the context).
    """

    def __init__(self, system: str | None = None) -> None:
        self.system = system
        self.messages: list[dict] = []
        self.start = 0

    def add(self, role: str, content: str, *, interrupted: bool = False) -> None:
        """Append a turn (``interrupted`` marks a reply stopped by Ctrl-C)."""
        msg: dict = {"role": role, "content": content}
        if interrupted:
            msg["interrupted"] = True
        self.messages.append(msg)

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.messages.clear()
        self.start = 0

    def window(self) -> list[dict]:
        """The chat messages sent to the model: the system prompt and the turns in the window."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages[self.start :]]

    def transcript(self) -> list[dict]:
        """Every message since the last clear (trimmed ones too), the system prompt first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]

    def fit(self, lm: LoadedModel, max_tokens: int) -> tuple[int, int]:
        """Drop the oldest turns until the prompt leaves room for the reply.

        The room kept is ``max_tokens`` but at most half the context; the system prompt and the
        newest user message are never dropped.

        Args:
            lm: the model (its tokenizer, chat template and context).
            max_tokens: tokens the next reply may take.

        Returns:
            (turns dropped, prompt tokens after dropping).
        """
        from moe_local.generation import encode_prompt

        room = min(max_tokens, lm.context // 2)
        dropped = 0
        while True:
            n = len(encode_prompt(lm, self.window()))
            users = [i for i in range(self.start, len(self.messages)) if self.messages[i]["role"] == "user"]
            if n + room <= lm.context or len(users) < 2:
                return dropped, n
            self.start = users[1]  # the oldest user message and the replies after it go
            dropped += 1


class ChatSession:
    """One REPL over a loaded model: reads messages and commands, streams replies.

    Args:
        lm: the loaded model.
        params: sampling options (``/set`` replaces them).
        system: the system prompt, or None.
        input: where lines are read.
        output: where replies and command answers are written.
        console: a rich console on ``output`` (terminal mode), or None for plain mode.
    """

    def __init__(
        self,
        lm: LoadedModel,
        params: SamplingParams,
        system: str | None,
        input: TextIO,
        output: TextIO,
        console: Console | None,
    ) -> None:
        self.lm = lm
        self.params = params
        self.conv = Conversation(None if system is None else _valid_text(system))
        self.input = input
        if getattr(input, "errors", None) == "strict" and callable(getattr(input, "reconfigure", None)):
            input.reconfigure(errors="surrogateescape")  # a stray byte must not end the chat: see _valid_text
        self.output = output
        self.console = console
        self.last: GenerationResponse | None = None
        self.started = lm.store.stats()
        self._builtin_input = console is not None and input is sys.stdin and output is sys.stdout
        if self._builtin_input:
            try:
                import readline  # line editing and history for input()

                readline.parse_and_bind("tab: tab-insert")  # pasted tabs stay tabs, not completions
            except ImportError:
                self._builtin_input = False

    def run(self) -> int:
        """Read and answer until /bye, Ctrl-D, Ctrl-C at the prompt or the end of input.

        Returns:
            The exit code: 0, or 130 after Ctrl-C at the prompt.
        """
        from moe_local.chat_commands import run_command

        while True:
            try:
                read = self.read_message()
            except KeyboardInterrupt:  # the line the program ends with is the caller's to write
                return interrupt.EXIT_CODE
            if read is None:
                if self.console is not None:
                    self.console.print()
                return 0
            text, fenced = read
            if not text.strip():
                continue
            try:
                if not fenced and text.lstrip().startswith("/"):
                    if not run_command(self, text.strip()):
                        return 0
                    continue
                self.reply(text)
            except KeyboardInterrupt:  # outside the reply's own handling: keep turns alternating
                interrupt.handled()
                if self.conv.messages and self.conv.messages[-1]["role"] == "user":
                    self.conv.messages.pop()
                self.notice("\n[interrupted]")

    def read_message(self) -> tuple[str, bool] | None:
        """Read one message: a line, or the lines between two ``\"\"\"`` fences.

        Returns:
            (text, whether it was fenced), or None at the end of input.
        """
        line = self._read_line(PROMPT)
        if line is None:
            return None
        body = line.strip()
        if not body.startswith(FENCE):
            return line, False
        body = body[len(FENCE) :]
        if body.endswith(FENCE):  # """one line"""
            return body[: -len(FENCE)], True
        lines = [body] if body else []
        try:
            while (nxt := self._read_line(CONTINUATION)) is not None:
                if nxt.rstrip().endswith(FENCE):
                    lines.append(nxt.rstrip()[: -len(FENCE)])
                    break
                lines.append(nxt)
        except KeyboardInterrupt:
            interrupt.handled()
            self.notice("\n(multi-line message discarded)")
            return "", True
        return "\n".join(lines).strip("\n"), True

    def _read_line(self, prompt: str) -> str | None:
        line = self._read_raw(prompt)
        return None if line is None else _valid_text(line)

    def _read_raw(self, prompt: str) -> str | None:
        if self.console is None:
            line = self.input.readline()
            return None if line == "" else line.rstrip("\r\n")
        style = "\033[1;32m" if prompt == PROMPT else "\033[2m"
        if self._builtin_input:
            try:
                return input(f"{_RL_START}{style}{_RL_END}{prompt}{_RL_START}\033[0m{_RL_END}")
            except EOFError:
                return None
        self.output.write(f"{style}{prompt}\033[0m")
        self.output.flush()
        line = self.input.readline()
        return None if line == "" else line.rstrip("\r\n")

    def reply(self, text: str) -> None:
        """Send a user message and stream the model's reply; Ctrl-C stops the reply."""
        from jinja2 import TemplateError

        from moe_local.generation import GenerationResponse, stream_generate

        start = self.conv.start
        self.conv.add("user", text)
        try:
            dropped, prompt_tokens = self.conv.fit(self.lm, self.params.max_tokens)
        except (MoeLocalError, TemplateError) as exc:
            self.conv.messages.pop()
            self.conv.start = start
            self.error(first_line(exc))
            return
        if prompt_tokens >= self.lm.context:
            self.conv.messages.pop()
            self.conv.start = start
            self.error(f"message is too long: {prompt_tokens} tokens, the context holds {self.lm.context}")
            return
        if dropped:
            self.notice(
                f"(the conversation outgrew the {self.lm.context}-token context: the oldest "
                f"{dropped} turn{'s' if dropped > 1 else ''} left the model's view; /save keeps them)"
            )
        before = self.lm.store.stats()
        parts: list[str] = []
        last = GenerationResponse(text="", token=None, prompt_tokens=prompt_tokens)
        stream = stream_generate(self.lm, self.conv.window(), self.params)
        stopped = False
        try:
            with _StopOnInterrupt() as stop:
                for last in stream:
                    if last.text:
                        parts.append(last.text)
                        self._show(last.text)
                    if stop.requested:
                        stopped = True
                        break
        except KeyboardInterrupt:  # a second Ctrl-C, or one just outside _StopOnInterrupt
            interrupt.handled()
            stopped = True
        except (MoeLocalError, TemplateError) as exc:
            self.conv.messages.pop()
            self.conv.start = start
            self._end_line(parts)
            self.error(first_line(exc))
            return
        finally:
            stream.close()
        reply = "".join(parts)
        self.conv.add("assistant", reply, interrupted=stopped)
        finish = "interrupted" if stopped else last.finish_reason
        self.last = dataclasses.replace(
            last, finish_reason=finish, experts=self.lm.store.stats().minus(before)
        )
        self._end_line(parts)
        if stopped:
            self.notice("[interrupted]")
        elif finish == "length":
            self.notice(f"[stopped at max_tokens={self.params.max_tokens}; /set max_tokens N for more]")

    def _print(self, text: str, style: str | None = None, end: str = "\n") -> None:
        if self.console is not None:
            self.console.print(text, style=style, end=end, markup=False, highlight=False, emoji=False)

    def _show(self, text: str) -> None:
        text = _CONTROL.sub("", text)  # a model's escape codes or carriage returns never reach the screen
        if self.console is not None:
            self._print(text, end="")
        else:
            self.output.write(text)
            self.output.flush()

    def _end_line(self, parts: list[str]) -> None:
        if self.console is not None:
            self._print("")
        elif not "".join(parts).endswith("\n"):
            self.output.write("\n")
            self.output.flush()

    def info(self, text: str) -> None:
        """Write a command's answer (to ``output``)."""
        if self.console is not None:
            self._print(text)
        else:
            self.output.write(text + "\n")
            self.output.flush()

    def notice(self, text: str) -> None:
        """Write a notice: dim on the terminal, to standard error in plain mode."""
        if self.console is not None:
            self._print(text, style="dim")
        else:
            print(text.strip("\n"), file=sys.stderr, flush=True)

    def error(self, text: str) -> None:
        """Write a one-line error; the REPL goes on."""
        if self.console is not None:
            self._print(f"error: {text}", style="red")
        else:
            print(f"error: {text}", file=sys.stderr, flush=True)


class _StopOnInterrupt:
    """While active, the first Ctrl-C sets ``requested``; a second one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            previous = self._previous  # SIG_DFL is 0, so no ``or``: None means not set from Python
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def _valid_text(text: str) -> str:
    """``text`` with what is not Unicode replaced by U+FFFD.

    Bytes the input could not decode arrive as lone surrogates (``surrogateescape``); replacing
    them makes a pasted stray byte cost one character, not the chat.
    """
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _load_with_progress(model: str | Path, options: LoadOptions, console: Console | None) -> LoadedModel:
    from moe_local.loading.loader import load

    if console is None:
        return load(model, options)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        return load(model, options, progress=progress)


def _require_chat_template(tokenizer, name: str) -> None:
    """Refuse a model whose tokenizer has no chat template (Switch Transformers, base models)."""
    if not getattr(tokenizer, "chat_template", None):
        raise MoeLocalError(
            f"{name} has no chat template, so it cannot chat; give it plain text with moe-local generate"
        )


def chat(
    model: str | Path | LoadedModel,
    *,
    system: str | None = None,
    params: SamplingParams = DEFAULT_PARAMS,
    load_options: LoadOptions | None = None,
    input: TextIO | None = None,
    output: TextIO | None = None,
) -> int:
    """Chat with a model in a REPL until /bye, Ctrl-D, Ctrl-C at the prompt or the end of input.

    Args:
        model: a checkpoint folder, a cached hub id, or an already loaded model.
        system: the system prompt (kept when the history is trimmed or cleared).
        params: sampling options to start with (``/set`` changes them).
        load_options: how to load ``model`` (ignored for a loaded model; default LoadOptions()).
        input: where messages are read (None: ``sys.stdin``); a terminal gets a prompt and line editing.
        output: where replies go (None: ``sys.stdout``); a terminal gets colour and a progress bar.

    Returns:
        The exit code: 0, or 130 when Ctrl-C stopped the loading or came at the prompt.

    Raises:
        MoeLocalError: the model cannot be loaded, or has no chat template (one clear line).
    """
    from moe_local.chat_commands import describe_placement
    from moe_local.loading.loader import LoadedModel

    input = sys.stdin if input is None else input
    output = sys.stdout if output is None else output
    console = None
    if _isatty(input) and _isatty(output):
        from rich.console import Console

        console = Console(file=output, highlight=False, soft_wrap=True)
    if isinstance(model, LoadedModel):
        lm = model
    else:
        if Path(model).is_dir():  # refused before the weights are read, not after
            from moe_local.loading.checkpoint import load_tokenizer

            _require_chat_template(load_tokenizer(Path(model)), Path(model).name)
        try:
            lm = _load_with_progress(model, load_options or LoadOptions(), console)
        except KeyboardInterrupt:
            return interrupt.EXIT_CODE
    _require_chat_template(lm.tokenizer, lm.name)
    session = ChatSession(lm, params, system, input, output, console)
    session.notice(describe_placement(lm))
    if console is not None:
        session.notice('/help for commands, """ for a multi-line message, Ctrl-D or /bye to leave')
    try:
        return session.run()
    finally:
        close = getattr(lm.store, "close", None)
        if callable(close) and lm is not model:
            close()


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_local.chat [MODEL] [OPTIONS]``: the same program as ``moe-local chat``.

    Args:
        argv: the arguments after the program's name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, 130 when Ctrl-C stopped it, another non-zero one after an error line.
    """
    from moe_local.cli.app import main as run_app

    args = sys.argv[1:] if argv is None else argv
    try:
        run_app(["chat", *args], prog_name="python -m moe_local.chat")
    except SystemExit as exc:  # the app always ends this way; its error line is already out
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    interrupt.guard(main)  # Ctrl-C at any moment: one line and exit code 130
