"""What opening a named session says, in `chat` and in `run`: whether it was resumed
(with its turns, and what a rebuild cost) or started new, which saved settings came
back, and — for a new name — the saved session it was probably meant to be."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from kvchat import saved_sessions, session_store
from kvchat.ui.render import plural

if TYPE_CHECKING:
    from kvchat.app import Chat
    from kvchat.settings import Settings


def restored_settings(s: Settings) -> list[str]:
    """The settings the saved session gave back (not given as flags): sampling, the
    reply limit, and how the transcript is rendered."""
    from kvchat.settings import keys_in

    shown = []
    for key in (*keys_in("saved"), *keys_in("rendering")):
        value = getattr(s, key)
        if s.sources.get(key) != "session" or value is None or value is False:
            continue
        if value is True:
            shown.append(key)
        else:
            shown.append(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}")
    return shown


def near_names(name: str) -> list[str]:
    """Saved sessions whose names are close to `name` (a typo), closest first."""
    names = [n for n in saved_sessions.session_names() if n != name]
    return difflib.get_close_matches(name, names, n=3, cutoff=0.6)


def opened_text(chat: Chat) -> str:
    """'resumed session 'work': 3 turns, 120 tokens', or 'new session …' with what to check."""
    assert chat.named is not None
    name = chat.named.name
    kind = "recent chat" if session_store.is_recent(name) else "session"
    if chat.named.exists:
        turns = plural(sum(1 for m in chat.session.messages if m["role"] == "user"), "turn")
        if chat.rebuilt_tokens:
            return (f"rebuilt {kind} '{name}': {turns}, {plural(chat.rebuilt_tokens, 'token')} "
                    f"re-evaluated in {chat.rebuild_s:.2f}s")
        # A server that renders messages keeps no token history here: turns only.
        tokens = f", {plural(chat.resumed_tokens, 'token')}" if chat.resumed_tokens else ""
        return f"resumed {kind} '{name}': {turns}{tokens}"
    near = near_names(name)
    if near:
        return (f"new {kind} '{name}' (no saved session by that name; did you mean "
                + " or ".join(f"'{n}'" for n in near) + "?)")
    if not saved_sessions.session_names():
        return f"new {kind} '{name}'"
    return f"new {kind} '{name}' (no saved session by that name; `kvchat sessions list` shows them)"
