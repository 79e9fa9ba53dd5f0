"""The chat REPL's slash commands, and the text of its stats and load summary.

``run_command(session, line)`` runs one ``/command``; each writes through the session's
``info`` (answers) and ``error`` (one-line problems) so a bad command never ends the REPL.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from moe_local.config import SamplingParams
from moe_local.errors import MoeLocalError
from moe_local.units import human_bytes

if TYPE_CHECKING:
    from moe_local.chat import ChatSession
    from moe_local.experts.store import StoreStats
    from moe_local.generation import GenerationResponse
    from moe_local.loading.loader import LoadedModel

HELP = """\
/help              this list
/clear             forget the conversation (the system prompt stays)
/stats             speed of the last reply, expert cache traffic, memory in use
/set               show the sampling settings
/set NAME VALUE    change one: temperature, top_p, top_k, min_p, repetition_penalty, max_tokens,
                   seed (a number or none), system (the system prompt; none removes it)
/save FILE         write the conversation as JSON
/bye               leave (also /exit, /quit, Ctrl-D, or Ctrl-C at the prompt)
\"\"\"               on a line of its own starts a multi-line message; another one ends it
Ctrl-C during a reply stops it (twice: at once); the partial reply stays in the conversation."""


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "off", "-") else int(text)


SETTINGS: dict[str, tuple[Callable[[str], object], str]] = {
    "temperature": (float, "a number"),
    "top_p": (float, "a number"),
    "top_k": (int, "an integer"),
    "min_p": (float, "a number"),
    "repetition_penalty": (float, "a number"),
    "max_tokens": (int, "an integer"),
    "seed": (_optional_int, "an integer or none"),
}


def run_command(session: ChatSession, line: str) -> bool:
    """Run one slash command.

    Args:
        session: the REPL.
        line: the command line, e.g. ``/set temperature 0.7``.

    Returns:
        False when the REPL should end (``/bye``), else True.
    """
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/bye", "/exit", "/quit"):
        return False
    handler = _COMMANDS.get(name)
    if handler is None:
        session.error(f"unknown command {name}; /help lists the commands")
    else:
        handler(session, arg)
    return True


def _help(session: ChatSession, arg: str) -> None:
    session.info(HELP)


def _clear(session: ChatSession, arg: str) -> None:
    session.conv.clear()
    session.info("(conversation cleared)")


def _set(session: ChatSession, arg: str) -> None:
    if not arg:
        session.info(describe_settings(session.params, session.conv.system))
        return
    key, _, value = arg.partition(" ")
    key, value = key.lower().replace("-", "_"), value.strip()
    if key == "system":
        session.conv.system = None if value.lower() in ("", "none") else value
        session.info(f"system = {session.conv.system!r}")
        return
    if key not in SETTINGS:
        session.error(f"cannot set {key!r}; choose system, {', '.join(SETTINGS)}")
        return
    parse, kind = SETTINGS[key]
    if not value:
        session.error(f"/set {key} needs a value ({kind})")
        return
    try:
        parsed = parse(value)
        session.params = dataclasses.replace(session.params, **{key: parsed})
    except ValueError:
        session.error(f"{key} must be {kind}, not {value!r}")
        return
    except MoeLocalError as exc:
        session.error(str(exc))
        return
    session.info(f"{key} = {parsed}")


def _save(session: ChatSession, arg: str) -> None:
    if not arg:
        session.error("/save needs a file name, e.g. /save chat.json")
        return
    data = {
        "model": session.lm.name,
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(session.params).items()},
        "messages": session.conv.transcript(),
    }
    try:
        path = Path(arg).expanduser()
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        session.error(f"cannot save to {arg}: {exc.strerror or exc}")
        return
    except RuntimeError:  # expanduser: ~name of a user this system does not know
        session.error(f"cannot save to {arg}: no home folder for {arg.split('/')[0]}")
        return
    except ValueError:  # a NUL character: no file system takes it in a name
        session.error(f"cannot save to {arg!r}: a file name cannot hold a NUL character")
        return
    session.info(f"(saved {len(data['messages'])} messages to {path})")


def _stats(session: ChatSession, arg: str) -> None:
    import psutil

    from moe_local.generation import encode_prompt

    lm = session.lm
    window = session.conv.window()
    used = len(encode_prompt(lm, window)) if session.conv.messages else 0
    session.info(
        format_chat_stats(
            session.last,
            lm.store.stats().minus(session.started),
            rss=psutil.Process().memory_info().rss,
            expert_bytes=lm.store.resident_bytes,
            context=(used, lm.context, len(session.conv.messages) - session.conv.start),
        )
    )


_COMMANDS: dict[str, Callable[[ChatSession, str], None]] = {
    "/help": _help,
    "/?": _help,
    "/clear": _clear,
    "/set": _set,
    "/save": _save,
    "/stats": _stats,
}


def describe_settings(params: SamplingParams, system: str | None) -> str:
    """The settings ``/set`` can change, on one line."""
    shown = ", ".join(f"{k} = {getattr(params, k)}" for k in SETTINGS)
    return f"{shown}, system = {system!r}"


def _traffic(experts: StoreStats) -> str:
    t = experts.total
    return (
        f"{t.hits} hits, {t.misses} misses, hit rate {experts.hit_rate:.1%}, {t.evictions} evictions, "
        f"read {human_bytes(t.bytes_from_ram)} from RAM and {human_bytes(t.bytes_from_disk)} from disk, "
        f"I/O wait {t.io_wait_s * 1000:.0f} ms"
    )


def format_chat_stats(
    last: GenerationResponse | None,
    session: StoreStats,
    *,
    rss: int,
    expert_bytes: int,
    context: tuple[int, int, int],
) -> str:
    """The ``/stats`` text.

    Args:
        last: the last reply's final response (its expert counters cover that reply), or None.
        session: expert counters since the chat started.
        rss: the process's resident memory, bytes.
        expert_bytes: bytes of experts the store holds now.
        context: (tokens the conversation takes, the context, messages in the model's view).

    Returns:
        A few lines of text.
    """
    lines = []
    if last is None:
        lines.append("last reply: none yet")
    else:
        lines += [
            f"prefill: {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tok/s, "
            f"time to first token {last.ttft_s * 1000:.0f} ms",
            f"decode: {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s "
            f"(finish: {last.finish_reason})",
            f"experts, last reply: {_traffic(last.experts)}",
        ]
    used, size, messages = context
    lines += [
        f"experts, this chat: {_traffic(session)}",
        f"memory: process RSS {human_bytes(rss)}, expert cache {human_bytes(expert_bytes)}",
        f"context: {used} of {size} tokens in use ({messages} messages in view)",
    ]
    return "\n".join(lines)


def describe_placement(lm: LoadedModel) -> str:
    """One line saying where the model went: device, expert slots and bytes, RAM, disk."""
    from moe_local.inspection import inspect_model

    store, device = lm.store, lm.options.device
    n = sum(s.num_experts for s in lm.sites)
    where = "RAM" if device.startswith("cpu") else device
    head = f"{lm.name}: dense part {human_bytes(lm.dense_bytes)} on {device}, context {lm.context} tokens"
    fast, host = getattr(store, "fast", None), getattr(store, "host", None)
    budget = getattr(fast if fast is not None else store, "budget_bytes", None)
    if budget is None:
        return f"{head}; experts: all {n} in {where} ({human_bytes(store.resident_bytes)}), none on disk"
    try:
        info = inspect_model(lm.path)
        one, total = max(info.one_expert_bytes, 1), info.expert_bytes
    except MoeLocalError:
        return f"{head}; experts: {human_bytes(budget)} of slots in {where}, the rest read from disk"
    slots = min(n, budget // one)
    tiers = [f"{slots} of {n} slots in {where} ({human_bytes(budget)})"]
    if host is not None and getattr(host, "budget_bytes", None) is not None:
        in_ram = min(n - slots, host.budget_bytes // one)
        tiers.append(f"{in_ram} in RAM behind them ({human_bytes(host.budget_bytes)})")
        slots += in_ram
    tiers.append(f"{n - slots} read from disk on demand; {human_bytes(total)} of experts in all")
    return f"{head}; experts: " + ", ".join(tiers)
