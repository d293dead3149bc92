"""Slash commands of the chat REPL: the table, the parser and completion.

Pure functions only (no terminal, no model), so every rule here is unit-tested;
`kvchat.ui.repl` carries the commands out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvchat.errors import UsageError
from kvchat.setting_table import SETTINGS, keys_in, parse_value


@dataclass(frozen=True)
class CommandSpec:
    usage: str
    help: str


COMMANDS: dict[str, CommandSpec] = {
    "/help": CommandSpec("/help", "list commands and keys"),
    "/system": CommandSpec("/system [TEXT]", "show or set the system prompt"),
    "/clear": CommandSpec("/clear", "forget the conversation and empty the KV cache (system prompt stays)"),
    "/undo": CommandSpec("/undo", "drop the last message and its reply (the KV cache rolls back)"),
    "/retry": CommandSpec("/retry", "answer the last message again (a new sample of the reply)"),
    "/save": CommandSpec("/save NAME", "save the conversation and its KV cache as session NAME"),
    "/load": CommandSpec("/load NAME", "switch to saved session NAME (KV cache restored, no re-evaluation)"),
    "/sessions": CommandSpec("/sessions", "list saved sessions"),
    "/stats": CommandSpec("/stats", "timings of the last reply, KV fill, RAM and VRAM"),
    "/set": CommandSpec("/set [KEY VALUE]", "show or change a sampling setting"),
    "/info": CommandSpec("/info", "model, context, K/V cache types, flash attention, GPU layers"),
    "/copy": CommandSpec("/copy [code]", "put the last reply (or, with 'code', its last code block) on the "
                                         "clipboard"),
    "/exit": CommandSpec("/exit", "leave (also /quit, /bye, Ctrl-D, or Ctrl-C twice at an empty prompt)"),
}
ALIASES = {"/quit": "/exit", "/q": "/exit", "/bye": "/exit", "/?": "/help"}

# /set KEY: the settings a chat may change (the table's "repl" group), parsed and
# range-checked by kvchat.settings like any flag ("none" clears max_tokens and seed).
# A key may also be spelled as its flags are, without the dashes (temp, top-p, n).
SET_KEYS = keys_in("repl")
_SET_KEY_ALIASES = {flag.lstrip("-"): name for name in SET_KEYS for flag in SETTINGS[name].flags
                    if flag.lstrip("-") != name}


@dataclass(frozen=True)
class Command:
    """A parsed slash command. `argument` is the raw rest of the line."""

    name: str
    argument: str = ""
    key: str | None = None
    value: Any = None


def is_command(line: str) -> bool:
    """A line is a command when it starts with '/' and a letter or '?' ('//x' sends '/x')."""
    return len(line) >= 2 and line[0] == "/" and (line[1].isalpha() or line[1] == "?")


def unescape_message(line: str) -> str:
    """'//etc/hosts' is the message '/etc/hosts'."""
    return line[1:] if line.startswith("//") else line


def command_names() -> list[str]:
    return [*COMMANDS, *ALIASES]


def parse_setting(key: str, raw: str) -> tuple[str, Any]:
    """Validate `/set KEY VALUE`; returns the canonical key and a typed value."""
    name = _SET_KEY_ALIASES.get(key.lower(), key.lower())
    if name not in SET_KEYS:
        raise UsageError(f"unknown setting '{key}'", hint=f"settings: {', '.join(SET_KEYS)}")
    try:
        return name, parse_value(name, raw, "flag")
    except UsageError as exc:
        reason = exc.message.split(" ", 2)[-1]  # drop the flag spelling: "/set" was typed
        raise UsageError(f"{name} '{raw}' {reason}", hint=SETTINGS[name].help) from None


def parse_command(line: str) -> Command:
    """Parse one input line that `is_command`. Raises UsageError with what exists."""
    head, _, rest = line.strip().partition(" ")
    name = ALIASES.get(head.lower(), head.lower())
    argument = rest.strip()
    if name not in COMMANDS:
        text = line.strip()
        escaped = "/" + (text if len(text) <= 40 and "\n" not in text else head + " …")
        if "/" in head[1:]:  # a path such as /etc/hosts: surely meant as a message
            raise UsageError(f"{head} is not a command", hint=f"to send it as a message, type {escaped}")
        raise UsageError(
            f"unknown command {head}",
            hint="commands: " + " ".join(COMMANDS) + f" (to send the line as a message: {escaped})",
        )
    if name in ("/save", "/load"):
        if not argument or len(argument.split()) != 1:
            raise UsageError(f"usage: {COMMANDS[name].usage}", hint="a session name is one word")
    elif name == "/set":
        words = argument.split()
        if not words:
            return Command(name)
        if len(words) != 2:
            raise UsageError(f"usage: {COMMANDS[name].usage}", hint=f"keys: {', '.join(SET_KEYS)}")
        key, value = parse_setting(words[0], words[1])
        return Command(name, argument, key, value)
    elif name == "/copy":
        if argument.lower() not in ("", "code"):
            raise UsageError(f"usage: {COMMANDS[name].usage}",
                             hint="/copy: the last reply; /copy code: its last code block")
        return Command(name, argument.lower())
    elif name not in ("/system",) and argument:
        raise UsageError(f"{name} takes no argument", hint=f"usage: {COMMANDS[name].usage}")
    return Command(name, argument)


def completions(text: str, session_names: Iterable[str] = ()) -> list[str]:
    """Candidates for the word being typed at the end of `text` (the line so far).

    The first word completes to command names; after /load or /save, to saved
    session names; after /set, to setting names.
    """
    if not text.startswith("/") or "\n" in text:
        return []
    words = text.split(" ")
    if len(words) == 1:
        return [name for name in command_names() if name.startswith(text.lower())]
    head = ALIASES.get(words[0].lower(), words[0].lower())
    current = words[-1]
    if len(words) == 2 and head in ("/load", "/save"):
        return sorted(n for n in session_names if n.startswith(current))
    if len(words) == 2 and head == "/set":
        return [key for key in SET_KEYS if key.startswith(current.lower())]
    if len(words) == 2 and head == "/copy":
        return ["code"] if "code".startswith(current.lower()) else []
    return []
