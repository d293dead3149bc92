"""REPL commands carried out on a stand-in chat (no model, no terminal): /save never
overwrites a session silently, /bye leaves, /copy says what it did."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvchat import session_store
from kvchat.app.backends import ServerFacts
from kvchat.errors import KvchatError
from kvchat.ui.commands import parse_command
from kvchat.ui.environment import Environment
from kvchat.ui.repl import ChatRepl


@dataclass
class _Session:
    messages: list[dict[str, str]] = field(default_factory=lambda: [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "```\nok()\n```"}])
    revision: int = 1
    n_kv: int = 10

    def clear(self) -> None:
        self.messages, self.n_kv, self.revision = [], 0, self.revision + 1


class _Backend:
    n_ctx = 256

    def facts(self) -> ServerFacts:
        return ServerFacts(url="http://x", api="llama-server", model_name="m", model_path=None, n_ctx=256,
                           total_slots=1, id_slot=0, counts=None)


@dataclass
class _Chat:
    """What the REPL's save commands use of kvchat.app.Chat; save_as writes a file."""

    backend: _Backend = field(default_factory=_Backend)
    session: _Session = field(default_factory=_Session)
    named: Any = None
    saves: list[tuple[str, bool]] = field(default_factory=list)

    def save(self, *, background: bool = False) -> None:
        pass

    def wait_saved(self) -> None:
        pass  # no write in flight: saves here are synchronous

    def save_as(self, name: str, *, replace_existing: bool = False) -> int:
        path = session_store.session_path(name)
        assert replace_existing or not path.exists(), "would overwrite"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"saved")
        self.saves.append((name, replace_existing))
        return 5


Repl = tuple[ChatRepl, _Chat, io.StringIO]


@pytest.fixture
def repl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Repl:
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_COLOR", "1")
    chat = _Chat()
    err = io.StringIO()
    env = Environment(stdin=io.StringIO(), stdout=io.StringIO(), stderr=err)
    opener: Any = None
    return ChatRepl(env, chat, opener=opener, markdown=False, nvml=None), chat, err  # type: ignore[arg-type]


def test_save_asks_before_replacing_a_session_it_did_not_write(repl: Repl) -> None:
    shell, chat, err = repl
    other = session_store.session_path("work")
    other.parent.mkdir(parents=True)
    other.write_bytes(b"someone else's")
    shell.do(parse_command("/save work"))
    assert chat.saves == [] and other.read_bytes() == b"someone else's"
    assert "session 'work' already exists — /save work again replaces it" in err.getvalue()
    shell.do(parse_command("/save work"))  # asked twice: replaced
    assert chat.saves == [("work", True)]


def test_save_updates_its_own_session_until_the_chat_changes(repl: Repl) -> None:
    shell, chat, err = repl
    shell.do(parse_command("/save mine"))
    shell.do(parse_command("/save mine"))  # the same chat, saved again: an update
    assert chat.saves == [("mine", False), ("mine", True)] and err.getvalue() == ""
    shell.do(parse_command("/clear"))
    shell.do(parse_command("/save mine"))  # another conversation now: asked first
    assert len(chat.saves) == 2 and "already exists" in err.getvalue()


def test_bye_leaves(repl: Repl) -> None:
    shell, chat, _ = repl
    shell.do(parse_command("/save kept"))  # nothing unsaved: leaving asks nothing
    assert shell.do(parse_command("/bye")) is False


def test_copy_without_a_clipboard_says_so(repl: Repl,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    shell, _, _ = repl
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(KvchatError, match="no clipboard to copy to"):  # stdout is no terminal here
        shell.do(parse_command("/copy code"))
