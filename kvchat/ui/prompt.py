"""The REPL's prompt and terminal: completion of /commands and session names, key
bindings, the input history file, and the terminal modes around a streaming reply."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from kvchat import saved_sessions
from kvchat.ui.commands import completions


def _session_names() -> Iterator[str]:
    """Saved session names (named and recent, in the store or .kvs files), read only
    when a completion asks for them."""
    yield from saved_sessions.session_names()


class SlashCompleter(Completer):
    """Completes /commands, then /set keys and /load or /save session names."""

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        word = text.split(" ")[-1]
        for candidate in completions(text, _session_names()):
            yield Completion(candidate, start_position=-len(word))


def key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    @kb.add("c-j")  # a bare line feed sends too, as in readline
    def _send(event: KeyPressEvent) -> None:
        event.current_buffer.validate_and_handle()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()  # like a shell: drop the line, stay at the prompt
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return kb


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Let cleanup after an interrupted reply (closing the stream, saving) finish."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def echo_off(stream: Any) -> Iterator[None]:
    """Keys typed while a reply streams are not echoed (they would break the live area's
    line count); they stay queued for the next prompt. Ctrl-C still interrupts."""
    try:
        import termios
    except ImportError:  # Windows
        yield
        return
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError, AttributeError):  # not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def private_file(path: Path) -> None:
    """Create `path` readable by its owner only (0600, like session files), or make it so:
    the input history holds everything typed into every chat."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)
