"""Recent chats: unnamed chats kept as `auto-*` sessions, bounded, the newest resumable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvchat import saved_sessions, session_store
from kvchat.errors import SessionError


def _save(name: str, mtime: float) -> Path:
    path = session_store.session_path(name)
    record = {"model": {"path": "/models/m.gguf", "size": 1, "sha256": "0"},
              "settings": {"n_ctx": 160, "type_k": "f16", "type_v": "f16", "flash_attn": "off"},
              "n_ctx_cells": 256, "messages": [{"role": "user", "content": "hi"}], "n_kv": 3}
    session_store.save(path, record, [1, 2, 3], b"kv")
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture(autouse=True)
def _home(kv_env: dict[str, str]) -> None:
    """Every test gets its own KVCHAT_HOME (kv_env sets it)."""


def test_names_sort_by_time_and_never_collide() -> None:
    now = time.mktime((2026, 11, 23, 17, 5, 9, 0, 0, -1))
    first = saved_sessions.recent_name(now)
    assert first == "auto-20261123-170509"
    _save(first, now)
    assert saved_sessions.recent_name(now) == "auto-20261123-170509-2"
    assert saved_sessions.recent_name(now, taken=["auto-20261123-170509-2"]) == "auto-20261123-170509-3"
    assert session_store.is_recent(first) and not session_store.is_recent("work")


def test_only_the_newest_are_kept_and_the_newest_is_continued() -> None:
    assert saved_sessions.latest_recent() is None
    for i in range(5):
        _save(f"auto-2026010{i}-000000", 1_000_000 + i)
    _save("work", 900_000)  # a named session is never pruned
    assert saved_sessions.latest_recent() == "auto-20260104-000000"
    removed = saved_sessions.prune_recent(3)
    assert removed == ["auto-20260100-000000", "auto-20260101-000000"]
    names = [info.name for info in saved_sessions.list_sessions()]
    assert names == ["auto-20260102-000000", "auto-20260103-000000", "auto-20260104-000000", "work"]


def test_a_recent_chat_in_use_is_not_pruned() -> None:
    for i in range(3):
        _save(f"auto-2026010{i}-000000", 1_000_000 + i)
    with session_store.locked("auto-20260100-000000"):
        assert saved_sessions.prune_recent(1) == ["auto-20260101-000000"]
    assert session_store.session_path("auto-20260100-000000").exists()


def test_cells_are_listed_against_the_context_llama_cpp_made() -> None:
    _save("small", 1_000_000)  # asked --ctx 160, llama.cpp made 256 cells
    (info,) = saved_sessions.list_sessions()
    assert (info.n_kv, info.n_ctx, info.model) == (3, 256, "m")
    with pytest.raises(SessionError):
        saved_sessions.remove("nothere")


def test_a_name_opened_but_never_saved_leaves_no_lock_file() -> None:
    from kvchat.named_session import NamedSession

    named = NamedSession("tried")
    assert session_store.session_path("tried").with_suffix(".lock").exists()
    named.close()
    assert not list(session_store.sessions_dir().iterdir())
    _save("kept", 1_000_000)
    with NamedSession("kept"):
        pass
    assert session_store.session_path("kept").exists()
