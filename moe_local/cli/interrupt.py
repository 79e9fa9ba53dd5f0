"""The ``moe-local`` program's entry point, and how it answers Ctrl-C (SIGINT) at any moment.

Left to itself, Python turns SIGINT into a KeyboardInterrupt wherever the main thread is: inside
an import (a traceback), a finalizer (printed and swallowed, so the run goes on), interpreter
shutdown (signals are off by then, so the process dies of SIGINT), and typer turns the rest into a
silent exit 130. ``entry`` installs its own handler before it imports anything else:

* the first SIGINT raises KeyboardInterrupt once, so ``finally`` blocks and context managers clean
  up (a partial quantize folder is removed, progress bars give the cursor back);
* a second SIGINT, or one that arrives after the command has ended, exits at once;
* one that lands in a finalizer (where Python would print it and carry on) exits at once too;
* one that comes while torch's native code starts (``import torch``) waits for that to finish,
  since a KeyboardInterrupt raised inside it aborts the process;
* an interrupted run prints one line, ``error: interrupted``, and exits 130 through ``os._exit``,
  so no thread join (expert prefetch workers), atexit hook or module teardown can hang or print
  after it. A run that was not interrupted flushes, runs the atexit hooks and exits the same way.

This module imports nothing the interpreter has not already loaded, so the handler is in place
about a millisecond after the entry script starts. A SIGINT before that (while the interpreter
itself starts) is outside any Python code's reach.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

EXIT_CODE = 130  # 128 + SIGINT, what shells report for a program stopped by Ctrl-C
MESSAGE = "error: interrupted"


class _State:
    """What the guard of this process has seen (one per process; ``_install`` resets it)."""

    installed = False
    raised = False  # our handler raised KeyboardInterrupt and no one has said it was handled
    finished = False  # the command is over: any SIGINT now exits at once
    announced = False  # MESSAGE was written
    announcing = False  # MESSAGE is being written
    main_thread = 0  # the thread the guard runs in, the one Python delivers SIGINT to
    deferring = 0  # imports of native start-up code under way (see _DeferringFinder)
    pending = False  # a SIGINT came while deferring: raise it when the import is done


_state = _State()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError, RuntimeError):  # a closed or broken pipe; a reentrant call
            pass


def _write(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, text.encode())  # one system call: a handler cannot split it, no buffer to lock


def announce() -> None:
    """Write the one line that says the run was interrupted, to standard error."""
    if not _state.installed:  # the CLI run in-process (tests): through sys.stderr, as other errors
        print(MESSAGE, file=sys.stderr, flush=True)
        return
    _flush()
    _write_message()


def _write_message() -> None:
    # A SIGINT while the line is being written leaves it to this code, which exits right after:
    # the handler neither writes it twice nor exits before it is out.
    _state.announcing = True
    # On a terminal the cursor is after the echoed ^C, often behind a partial line of output.
    _write(2, ("\n" if _isatty(2) else "") + MESSAGE + "\n")
    _state.announced = True
    _state.announcing = False


def handled() -> None:
    """Say that the KeyboardInterrupt just caught was dealt with and the program goes on.

    The chat REPL calls this when Ctrl-C only discards a message, so that the next Ctrl-C is
    again a first one (it raises KeyboardInterrupt instead of exiting at once).
    """
    _state.raised = False


def _exit_now(code: int, *, flush: bool = True, cut_short: bool = False) -> NoReturn:
    """End the process now, with the line if it was interrupted.

    Args:
        code: the exit status.
        flush: flush standard output first (not after a second Ctrl-C: a stuck pipe would block it).
        cut_short: cleanup did not run, so give back the cursor a progress bar may have hidden.
    """
    if cut_short and _isatty(2) and os.environ.get("TERM") != "dumb":
        _write(2, "\033[?25h")
    if flush:
        _flush()
    if code == EXIT_CODE and not _state.announced:
        _write_message()
    os._exit(code)


def _handle(signum: int, frame: object) -> None:
    if _state.announcing:  # the line is being written; the process ends right after it
        return
    if _state.finished:  # the command is over: nothing is left to clean up
        _exit_now(EXIT_CODE, flush=False)
    if _state.raised or _state.pending:  # a second Ctrl-C: the user does not want to wait
        _exit_now(EXIT_CODE, flush=False, cut_short=True)
    if _state.deferring:
        _state.pending = True
        return
    _state.raised = True
    raise KeyboardInterrupt


# torch's native start-up calls back into Python; a KeyboardInterrupt raised in such a callback
# becomes a C++ exception nothing catches, and the process aborts (seen: torch._C._autograd_init).
DEFERRED_IMPORTS = ("torch",)


class _DeferringLoader:
    """Runs a module's start-up with Ctrl-C deferred, then hands the module its own loader back."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        with _deferred():  # an extension module's native init runs here
            return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module sees its real loader
        with _deferred():
            self.loader.exec_module(module)


@contextlib.contextmanager
def _deferred():
    if _thread.get_ident() != _state.main_thread:  # only the main thread gets SIGINT
        yield
        return
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if not _state.deferring and _state.pending:  # the Ctrl-C that came meanwhile, now safe
            _state.pending = False
            _state.raised = True
            raise KeyboardInterrupt  # also in place of an error of the import: the user wants out


class _DeferringFinder:
    """Finds the modules of ``DEFERRED_IMPORTS`` (and their submodules) with a deferring loader."""

    def find_spec(self, name: str, path=None, target=None):
        if not any(name == top or name.startswith(top + ".") for top in DEFERRED_IMPORTS):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _DeferringLoader(spec.loader)
                return spec
        return None


_finder = _DeferringFinder()


_previous_unraisable = sys.unraisablehook


def _unraisable(args) -> None:
    """A finalizer got our KeyboardInterrupt, where Python prints it and runs on: exit instead.

    The ``finally`` blocks of the interrupted code do not run then; nothing of moe-local's needs
    them to (an interrupted quantize leaves OUT.partial, which ``--resume`` continues).
    """
    if isinstance(args.exc_value, KeyboardInterrupt) and _state.raised:
        _exit_now(EXIT_CODE, cut_short=True)
    _previous_unraisable(args)


def _install() -> None:
    """Guard SIGINT for the rest of this process (unless it started with SIGINT ignored)."""
    global _previous_unraisable
    _state.raised = _state.finished = _state.announced = _state.pending = False
    _state.main_thread = _thread.get_ident()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. a background job: keep ignoring
        return
    signal.signal(signal.SIGINT, _handle)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    if sys.unraisablehook is not _unraisable:
        _previous_unraisable = sys.unraisablehook
        sys.unraisablehook = _unraisable
    _state.installed = True


def _code(value: object) -> int:
    """The exit status ``sys.exit(value)`` would give."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    _write(2, f"{value}\n")
    return 1


def guard(run: Callable[[], object]) -> NoReturn:
    """Run ``run()`` as a whole program with Ctrl-C guarded, then end the process.

    Args:
        run: the program; it may return an exit code or raise SystemExit. Import heavy modules
            inside it, so that an interrupt during the imports is handled too.
    """
    _install()
    code = 1
    try:
        try:
            code = _code(run())
        except SystemExit as exc:
            code = _code(exc.code)
        finally:
            _state.finished = True  # from here on a SIGINT exits at once
    except KeyboardInterrupt:  # one the program did not catch, or one before its last line ran
        code = EXIT_CODE
    if code == EXIT_CODE or _state.raised or _state.pending:  # raised, pending: swallowed by the run
        _exit_now(EXIT_CODE)
    _flush()
    import atexit

    atexit._run_exitfuncs()  # what a normal exit would run; module teardown is skipped
    _exit_now(code)


def _cli() -> None:
    from moe_local.cli.app import main

    main()


def entry() -> NoReturn:
    """The ``moe-local`` program (``[project.scripts]``, ``python -m moe_local``)."""
    guard(_cli)
