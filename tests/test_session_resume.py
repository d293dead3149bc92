"""Resuming a named session without a model: what it gives back to the settings,
where it ran, what a mismatch says, and what opening it tells the user."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kvchat import config, saved_sessions, session_store
from kvchat.conversation import TurnStats
from kvchat.named_session import ContextSettings, NamedSession, mismatches
from kvchat.settings import resolve
from kvchat.ui.render import stats_line
from kvchat.ui.resume import near_names, opened_text, restored_settings
from tests.chat_api_server import chat_api_server

LOCAL = {"path": "/models/m.gguf", "size": 1, "sha256": "0"}
ON_SERVER = {"path": "http://gpu:8080 m", "size": 0, "sha256": "llama-server:1", "server": "http://gpu:8080"}


@pytest.fixture(autouse=True)
def _home(kv_env: dict[str, str]) -> None:
    """Every test gets its own KVCHAT_HOME (kv_env sets it)."""
    config._read_table.cache_clear()


def _save(name: str, model: dict[str, Any] = LOCAL, *, flash_attn: str = "off", mtime: float | None = None,
          **sections: Any) -> Path:
    path = session_store.session_path(name)
    server = "server" in model
    record = {"model": model,
              "settings": {"n_ctx": 160, "type_k": "server" if server else "f16",
                           "type_v": "server" if server else "f16", "flash_attn": flash_attn},
              "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
              "n_kv": 3, **sections}
    session_store.save(path, record, [1, 2, 3], b"kv")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _values(name: str, **kwargs: Any) -> dict[str, Any]:
    with NamedSession(name) as named:
        return named.saved_values(**kwargs)


def test_raw_template_and_think_come_back_like_sampling() -> None:
    _save("r", sampling={"temperature": 0.0, "seed": 3},
          rendering={"raw": True, "chat_template": "/t/my.jinja", "think": "off"})
    s = resolve({}, _values("r"))
    assert (s.raw, s.chat_template, s.think, s.temperature) == (True, "/t/my.jinja", "off", 0.0)
    assert s.sources["raw"] == "session"
    assert restored_settings(s) == ["temperature 0", "seed 3", "chat_template /t/my.jinja", "raw",
                                    "think off"]
    # A flag still wins over the saved value.
    assert resolve({"raw": False}, _values("r")).raw is False


def test_a_session_is_not_tied_to_the_server_it_was_made_on() -> None:
    _save("remote", ON_SERVER, flash_attn="auto", sampling={"top_k": 7})
    values = _values("remote")
    assert "server" not in values and values == {"top_k": 7}
    with NamedSession("remote") as named:
        assert named.moved_from(LOCAL) == "http://gpu:8080"  # resumed here: re-evaluated
        assert named.moved_from(ON_SERVER) is None
        assert named.moved_from({**ON_SERVER, "server": "http://other:8080"}) == "http://gpu:8080"
    _save("here")
    with NamedSession("here") as named:
        assert named.moved_from(ON_SERVER) == "this machine" and named.moved_from(LOCAL) is None


def test_a_rebuild_does_not_keep_a_flash_attention_mode_nobody_chose() -> None:
    # Saved on a CPU: auto ran as off. Resuming as saved keeps it (the KV state needs it);
    # a rebuild with a quantized V cache decides it again instead of refusing "off".
    _save("fa", flash_attn="off")
    assert _values("fa")["flash_attn"] == "off"
    rebuilt = _values("fa", rebuild=True)
    assert "flash_attn" not in rebuilt
    s = resolve({"cache_type_k": "q8_0", "cache_type_v": "q8_0"}, rebuilt)
    assert s.flash_attn == "auto" and s.cache_type_v.name == "q8_0"


def test_mismatch_messages_name_what_differs() -> None:
    _save("m")
    saved = session_store.load(session_store.session_path("m"))
    elsewhere = {"path": "/other/m.gguf", "size": 2, "sha256": "1"}
    (problem,) = mismatches(saved, elsewhere, ContextSettings(160, "f16", "f16", "off"))
    assert problem == "it was saved with /models/m.gguf, not /other/m.gguf"  # never "m.gguf, not m.gguf"
    other = {"path": "/models/n.gguf", "size": 2, "sha256": "1"}
    assert mismatches(saved, other, ContextSettings(160, "f16", "f16", "off")) == \
        ["it was saved with m.gguf, not n.gguf"]
    # A server's cache types are not settings of the session: never "was server".
    assert mismatches(saved, LOCAL, ContextSettings(160, "server", "server", "auto")) == []


class _Chat:
    """What opened_text reads of a kvchat.app.Chat."""

    def __init__(self, named: NamedSession, resumed: int = 0, rebuilt: int = 0) -> None:
        self.named = named
        self.session = type("S", (), {"messages": (named.saved.record["messages"] if named.saved else [])})()
        self.resumed_tokens, self.rebuilt_tokens, self.rebuild_s = resumed, rebuilt, 0.5


def test_opening_says_new_or_resumed_and_catches_a_typo() -> None:
    with NamedSession("work") as named:
        assert opened_text(_Chat(named)) == "new session 'work'"  # nothing saved yet: nothing to mistype
    _save("work")
    with NamedSession("work") as named:
        assert opened_text(_Chat(named, resumed=3)) == "resumed session 'work': 1 turn, 3 tokens"
        assert opened_text(_Chat(named, rebuilt=3)) == \
            "rebuilt session 'work': 1 turn, 3 tokens re-evaluated in 0.50s"
    with NamedSession("wrok") as named:
        assert opened_text(_Chat(named)) == \
            "new session 'wrok' (no saved session by that name; did you mean 'work'?)"
    with NamedSession("holiday") as named:
        assert opened_text(_Chat(named)) == \
            "new session 'holiday' (no saved session by that name; `kvchat sessions list` shows them)"
    assert near_names("work") == []


def test_continue_takes_the_last_conversation_named_or_not() -> None:
    assert saved_sessions.latest_session() is None
    _save("auto-20260101-000000", mtime=1_000)
    _save("named", mtime=2_000)
    assert saved_sessions.latest_session() == "named"
    assert saved_sessions.latest_recent() == "auto-20260101-000000"
    _save("auto-20260102-000000", mtime=3_000)
    assert saved_sessions.latest_session() == "auto-20260102-000000"


def test_stats_never_call_rebuilt_or_restored_tokens_cached() -> None:
    from_disk = TurnStats(reused_tokens=0, evaluated_tokens=11, prompt_tokens=1020, prefix_cache_tokens=1009,
                          prefix_cache_restore_s=0.12)
    line = stats_line(from_disk, 1.0)
    assert "prompt 1020 tok (1009 tokens from the prefix cache (0.120s), 11 evaluated)" in line
    assert "0 cached" not in line
    # After --rebuild the turn found the history in the KV cache, but this run computed it.
    rebuilt = TurnStats(reused_tokens=48, evaluated_tokens=12, prompt_tokens=60)
    line = stats_line(rebuilt, 1.0, rebuilt_tokens=48, rebuild_s=0.52)
    assert "prompt 60 tok (48 rebuilt in 0.52s, 12 evaluated)" in line and "cached" not in line
    assert "prompt 60 tok (48 cached, 12 evaluated)" in stats_line(rebuilt, 1.0)



def test_run_on_a_server_says_new_resumed_or_a_near_name_and_continues(kvchat) -> None:  # noqa: ANN001
    with chat_api_server() as server:
        first = kvchat("run", "--server", server.url, "-S", "work", "Hello there.")
        assert first.returncode == 0, first.stderr
        assert first.stdout == "reply 1 to Hello there.\n"
        assert "kvchat: new session 'work'\n" in first.stderr
        typo = kvchat("run", "--server", server.url, "-S", "wrok", "--temperature", "0.3", "Hi.")
        assert "new session 'wrok' (no saved session by that name; did you mean 'work'?)" in typo.stderr
        # --continue: the conversation saved last, with the settings it saved.
        again = kvchat("run", "--server", server.url, "--continue", "And now?")
        assert again.returncode == 0, again.stderr
        assert "kvchat: resumed session 'wrok': 1 turn; settings restored: temperature 0.3" \
            in again.stderr
        assert [m["content"] for m in server.bodies[-1]["messages"]] == ["Hi.", "reply 2 to Hi.", "And now?"]
        assert server.bodies[-1]["temperature"] == 0.3


def test_a_session_moves_to_another_server_with_its_transcript(kvchat) -> None:  # noqa: ANN001
    with chat_api_server() as made_on, chat_api_server() as now_on:
        assert kvchat("run", "--server", made_on.url, "-S", "trip", "Hello.").returncode == 0
        moved = kvchat("run", "--server", now_on.url, "-S", "trip", "Still there?")
        assert moved.returncode == 0, moved.stderr
        assert (f"session 'trip' was made on {made_on.url}; its transcript is re-evaluated with tiny-chat "
                f"on {now_on.url} (--server {made_on.url} resumes it there)") in moved.stderr
        assert "was server" not in moved.stderr and "saved with" not in moved.stderr
        assert [m["content"] for m in now_on.bodies[0]["messages"]] == ["Hello.", "reply 1 to Hello.",
                                                                        "Still there?"]
        record = saved_sessions.load_existing("trip").record
        assert record["model"]["server"] == now_on.url


def test_schema_reaches_an_openai_compatible_server_as_response_format(kvchat) -> None:  # noqa: ANN001
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    with chat_api_server() as server:
        result = kvchat("run", "--server", server.url, "--schema", json.dumps(schema), "Where is the Louvre?")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"city": "Paris"}
        assert server.bodies[0]["response_format"] == {"type": "json_schema",
                                                       "json_schema": {"name": "reply", "schema": schema}}



@pytest.mark.slow
def test_run_session_says_what_it_resumed_and_keeps_how_it_renders(kvchat) -> None:  # noqa: ANN001
    args = ("--temperature", "0", "--threads", "1", "-n", "4")
    first = kvchat("run", "-S", "work", "--raw", *args, "--json", "The capital of France is")
    assert first.returncode == 0, first.stderr
    assert "kvchat: new session 'work'\n" in first.stderr
    n_first = sum(json.loads(first.stdout)["usage"][k] for k in ("prompt_tokens", "completion_tokens"))
    # --continue picks it up; --raw comes back with the sampling, so the history is not re-rendered.
    again = kvchat("run", "--continue", "-n", "4", "--threads", "1", "--json", "And the capital of Italy is")
    assert again.returncode == 0, again.stderr
    assert "kvchat: resumed session 'work': 1 turn," in again.stderr
    assert "settings restored: temperature 0, " in again.stderr and ", raw" in again.stderr
    record = json.loads(again.stdout)
    assert record["cache"]["reused_tokens"] >= n_first - 1 and record["cache"]["reevaluated_tokens"] == 0
    # A rebuild with a quantized V cache is not refused for the "off" auto became on a CPU,
    # and says what it rebuilt instead of calling it cached.
    rebuilt = kvchat("run", "-S", "work", "--rebuild", "-ctk", "q8_0", "-ctv", "q8_0", "--stats", *args,
                     "Rome")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "kvchat: rebuilt session 'work': 2 turns," in rebuilt.stderr
    assert " rebuilt in " in rebuilt.stderr and " cached, " not in rebuilt.stderr
    # Made on a server, resumed here without --server: re-evaluated here, with a notice.
    # (the session rewritten as a server's, as a .kvs file of the same name: those still load)
    saved = saved_sessions.load_existing("work")
    state = saved_sessions.whole_state(saved)
    saved_sessions.remove("work")
    on_server = {**saved.record["settings"], "type_k": "server", "type_v": "server"}
    record = {k: v for k, v in saved.record.items() if k != "format_version"}
    record.update(model=ON_SERVER, settings=on_server)
    session_store.save(session_store.session_path("work"), record, saved.tokens, state, saved.checkpoints)
    moved = kvchat("run", "-S", "work", *args, "Paris")
    assert moved.returncode == 0, moved.stderr
    assert "session 'work' was made on http://gpu:8080; its transcript is re-evaluated with " in moved.stderr
    assert "was server" not in moved.stderr and "http://gpu:8080" not in json.dumps(
        saved_sessions.load_existing("work").record["model"])
