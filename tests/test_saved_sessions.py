"""Named sessions in the KV store, model-free: a turn's save reads and writes only its
new cells, a copy under another name shares them, a damaged block re-evaluates only
what follows it (and says which session), .kvs files load and move to the store,
export/import round-trip, and background writes (tests/fake_kv_engine.py's cells have
llama.cpp's state layout; tests/test_session.py runs the real model)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fake_kv_engine import FakeKvEngine

from kvchat import named_session, saved_sessions, session_store
from kvchat.app.saving import SaveWriter
from kvchat.conversation import SavedState, StateLoader
from kvchat.engine_api import SamplingSettings
from kvchat.errors import SessionError
from kvchat.kv_store import KvStore
from kvchat.named_session import ContextSettings, NamedSession

IDENTITY = {"path": "/models/m.gguf", "size": 1, "sha256": "ab" * 32}
SETTINGS = ContextSettings(4096, "f16", "f16", "off")
PAD = 2 * 11520 - 8  # a cell of SmolLM2's size


@pytest.fixture(autouse=True)
def _home(kv_env: dict[str, str]) -> None:
    """Every test gets its own KVCHAT_HOME."""


class KvConversation:
    """The parts of a token conversation a save and a resume use, over FakeKvEngine."""

    def __init__(self, engine: FakeKvEngine) -> None:
        self.engine = engine
        self.messages: list[dict[str, str]] = []
        self.sampling = SamplingSettings()
        self.max_tokens: int | None = None
        self.evaluated_on_restore = 0

    def turn(self, n: int, seed: int) -> None:
        self.messages.append({"role": "user", "content": f"turn {seed}"})
        self.engine.eval([(seed * 7919 + i) % 50000 + 1 for i in range(n)])

    def to_record(self) -> dict[str, Any]:
        return {"messages": self.messages, "dropped": [], "kv_text": "", "turns": [],
                "n_kv": self.engine.n_past}

    def saved_state(self) -> SavedState:
        return SavedState(list(self.engine.cells), self.engine.n_past, self.engine, b"")

    def restore(self, record: dict[str, Any], tokens: list[int], state: bytes | StateLoader | None,
                checkpoints: bytes = b"") -> int:
        assert callable(state)
        self.messages = list(record["messages"])
        done = state(self.engine)
        n_kv = int(record["n_kv"])
        self.engine.eval(tokens[done:n_kv])
        return n_kv - done


def _open(name: str) -> NamedSession:
    named = NamedSession(name)
    named.check(IDENTITY, SETTINGS, rebuild=False)
    named.settings = SETTINGS
    return named


def _save(name: str, conv: KvConversation, **kw: Any) -> int:
    with _open(name) as named:
        return named.finish_save(named.prepare_save(conv, 4096, **kw)).bytes_written


def _resume(name: str) -> tuple[KvConversation, int, str | None]:
    conv = KvConversation(FakeKvEngine(pad=PAD))
    with _open(name) as named:
        evaluated = named.attach(conv, rebuild=False)
        return conv, evaluated, named.damage_notice


def test_each_save_reads_and_writes_only_the_new_cells() -> None:
    engine = FakeKvEngine(pad=PAD)
    conv = KvConversation(engine)
    conv.turn(1000, 1)
    _save("work", conv)
    cell = 2 * (8 + PAD) + 2 * 3 * 2  # K rows of both layers, V elements
    for i in range(2, 5):
        reads = engine.range_reads
        conv.turn(40, i)
        written = _save("work", conv)
        assert engine.range_reads - reads == 40  # the engine read the turn's cells only
        # Its cells, one block header or two, and the manifest's frame (the turn's
        # tokens and message): nothing in proportion to the history.
        assert written <= 1.1 * 40 * cell + 8192
    resumed, evaluated, notice = _resume("work")
    assert resumed.engine.cells == engine.cells and evaluated == 0 and notice is None
    assert resumed.engine.evaluated == 0


def test_a_save_checks_what_the_turn_added_and_keeps_the_saved_copy_when_it_is_bad() -> None:
    """The record is checked incrementally (what the last save carried over was checked
    then), so a bad message or token the turn added is still refused."""
    conv = KvConversation(FakeKvEngine(pad=PAD))
    for i in range(1, 4):
        conv.turn(100, i)
        _save("s", conv)
    path = KvStore().manifest_path("session", "s")
    good = path.read_bytes()
    conv.turn(20, 4)
    conv.messages.append({"role": "user"})
    with _open("s") as named, pytest.raises(SessionError, match=r"messages\[4\] is not a message"):
        named.prepare_save(conv, 4096)
    conv.messages.pop()
    conv.engine.cells.append(-5)
    with _open("s") as named, pytest.raises(SessionError, match="a token id is negative"):
        named.prepare_save(conv, 4096)
    conv.engine.cells[-1] = 2**31
    with _open("s") as named, pytest.raises(SessionError, match="not a 32-bit integer"):
        named.prepare_save(conv, 4096)
    assert path.read_bytes() == good
    conv.engine.cells.pop()
    _save("s", conv)
    resumed, evaluated, _ = _resume("s")
    assert resumed.engine.cells == conv.engine.cells and evaluated == 0


def test_a_copy_under_another_name_shares_the_blocks() -> None:
    conv = KvConversation(FakeKvEngine(pad=PAD))
    conv.turn(700, 1)
    with _open("orig") as named:
        result = named.finish_save(named.prepare_save(conv, 4096))
    with _open("copy") as copy:
        shared = copy.finish_save(copy.prepare_save(conv, 4096, base=result.manifest))
    assert shared.blocks_written == 0 and shared.bytes_written < 16 * 1024
    infos = {i.name: i for i in saved_sessions.list_sessions()}
    assert infos["copy"].shared > 700 * PAD and infos["copy"].size < 16 * 1024


def test_a_damaged_block_reevaluates_what_follows_it_and_names_the_session() -> None:
    conv = KvConversation(FakeKvEngine(pad=PAD))
    conv.turn(600, 1)
    _save("hurt", conv)
    saved = saved_sessions.load_existing("hurt")
    assert saved.manifest is not None
    second = saved.manifest.chain[1]  # positions 256..512
    path = KvStore().block_path(second.key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    resumed, evaluated, notice = _resume("hurt")
    assert resumed.engine.cells == conv.engine.cells  # exact: restored, then evaluated
    assert evaluated == 600 - 256 and resumed.engine.evaluated == 600 - 256
    assert notice is not None and "session 'hurt'" in notice and "token 256" in notice
    # The transcript never depended on the block: show and export still read it.
    assert saved_sessions.load_existing("hurt", with_state=False).record["messages"] == conv.messages


def test_a_kvs_file_loads_and_moves_to_the_store_on_its_next_save(tmp_path: Path) -> None:
    conv = KvConversation(FakeKvEngine(pad=PAD))
    conv.turn(300, 1)
    record = {**conv.to_record(), "model": IDENTITY, "settings": SETTINGS.as_record()}
    path = session_store.session_path("old")
    session_store.save(path, record, list(conv.engine.cells), conv.engine.state_bytes())
    with _open("old") as named:
        assert named.saved is not None and named.saved.legacy is not None
        resumed = KvConversation(FakeKvEngine(pad=PAD))
        state = named.saved.legacy.state
        resumed.engine.load_state_bytes(state, 300)
        resumed.messages = list(named.saved.record["messages"])
        resumed.turn(20, 2)
        named.save(resumed, 4096)
    assert not path.exists()
    again, evaluated, _ = _resume("old")
    assert again.engine.cells == resumed.engine.cells and evaluated == 0


def test_export_and_import_round_trip(tmp_path: Path) -> None:
    conv = KvConversation(FakeKvEngine(pad=PAD))
    conv.turn(520, 1)
    _save("trip", conv)
    saved = saved_sessions.load_existing("trip")
    exported = tmp_path / "trip.kvs"
    record = {k: v for k, v in saved.record.items() if k != "format_version"}
    session_store.save(exported, record, saved.tokens, saved_sessions.whole_state(saved))
    assert saved_sessions.whole_state(saved) == conv.engine.state_bytes()
    named_session.import_file(exported, "back")
    back, evaluated, _ = _resume("back")
    assert back.engine.cells == conv.engine.cells and evaluated == 0
    with pytest.raises(SessionError, match="already exists"):
        named_session.import_file(exported, "back")


def test_rm_removes_the_manifest_and_leaves_aligned_blocks_as_cache() -> None:
    conv = KvConversation(FakeKvEngine(pad=PAD))
    conv.turn(600, 1)
    _save("gone", conv)
    saved_sessions.remove("gone")
    assert not saved_sessions.exists("gone")
    usage = KvStore().usage()
    assert usage.manifests == 0 and usage.unreferenced == usage.blocks > 2 * 256 * PAD
    with pytest.raises(SessionError, match="no session"):
        saved_sessions.remove("gone")


def test_the_writer_runs_in_order_says_when_slow_and_reports_errors_once() -> None:
    writer = SaveWriter()
    done: list[int] = []
    gate = threading.Event()

    def slow() -> None:
        gate.wait(5)
        done.append(1)

    writer.submit(slow)
    assert writer.busy and done == []  # the caller went on while the write waits
    notices: list[str] = []
    threading.Timer(0.5, gate.set).start()
    started = time.monotonic()
    writer.wait(lambda: notices.append("saving…"))
    assert done == [1] and notices == ["saving…"] and time.monotonic() - started >= 0.4

    def fail() -> None:
        raise SessionError("could not save session 'x': the disk is full")

    writer.submit(fail)
    with pytest.raises(SessionError, match="disk is full"):
        writer.wait()
    writer.wait()  # told once
    writer.submit(lambda: done.append(2))
    writer.wait(lambda: notices.append("again"))
    assert done == [1, 2] and notices == ["saving…"]  # a quick write says nothing


def test_cli_import_export_list_and_rm(kvchat, tmp_path: Path) -> None:  # noqa: ANN001
    conv = KvConversation(FakeKvEngine(pad=PAD))
    conv.turn(300, 1)
    record = {**conv.to_record(), "model": IDENTITY, "settings": SETTINGS.as_record()}
    exported = tmp_path / "talk.kvs"
    session_store.save(exported, record, list(conv.engine.cells), conv.engine.state_bytes())
    assert kvchat("sessions", "import", str(exported)).returncode == 0
    again = kvchat("sessions", "import", str(exported))
    assert again.returncode != 0 and "already exists" in again.stderr
    assert kvchat("sessions", "import", str(exported), "copy").returncode == 0
    rows = {r["name"]: r for r in json.loads(kvchat("sessions", "list", "--json").stdout)}
    assert set(rows) == {"talk", "copy"} and rows["talk"]["n_kv"] == 300
    assert rows["talk"]["bytes"] + rows["talk"]["shared_bytes"] > 300 * PAD
    out = tmp_path / "out.kvs"
    assert kvchat("sessions", "export", "copy", "--format", "kvs", "-o", str(out)).returncode == 0
    assert session_store.load(out).state == conv.engine.state_bytes()
    assert "KV store:" in kvchat("sessions", "list").stderr
    assert kvchat("sessions", "rm", "talk", "--yes").returncode == 0
    assert [r["name"] for r in json.loads(kvchat("sessions", "list", "--json").stdout)] == ["copy"]


def test_kvchat_serves_conversations_are_not_listed_as_sessions() -> None:
    """`kvchat serve` keeps its conversations in the store as recent manifests named
    serve-*: they are not chats to resume, so `sessions list`, `--continue` and name
    completion leave them out (they were listed as damaged, and `--continue` picked
    one when it was the newest), and the store's usage counts them apart."""
    from kvchat.cli.sessions import store_line
    from kvchat.kv_files import RECENT, SERVED_PREFIX

    conv = KvConversation(FakeKvEngine(pad=PAD))
    conv.turn(300, 1)
    _save("work", conv)
    served = FakeKvEngine(pad=PAD)
    served.eval(list(range(1, 400)))
    KvStore().save(RECENT, SERVED_PREFIX + "0123456789abcdef", {"messages": [], "kind": "chat"},
                   served.cells, served, b"\x03" * 32)
    assert saved_sessions.session_names() == ["work"]
    assert saved_sessions.latest_session() == "work"
    assert [i.name for i in saved_sessions.list_sessions()] == ["work"]
    figures = saved_sessions.store_figures(None)
    assert figures["served_bytes"] > 399 * PAD and figures["recent_bytes"] == 0
    assert figures["named_bytes"] > 300 * PAD
    assert "kvchat serve's conversations" in store_line()
