"""A manifest is a log: a turn's save appends what changed (its size does not grow
with the history), a torn append leaves the previous manifest whole, a damaged frame
is refused, another writer's change is never appended to, and format 1 still reads
(a fake engine with llama.cpp's state layout)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from fake_kv_engine import FakeKvEngine

from kvchat import kv_files, manifest_log
from kvchat.errors import SessionError
from kvchat.kv_store import SESSION, KvStore

FP = b"\x01" * 32


def words(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def chat_record(turns: int) -> dict[str, Any]:
    """A transcript of `turns` exchanges, as a session's record holds it (messages and
    the KV text both grow with the history)."""
    messages = []
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i} " * 20},
                     {"role": "assistant", "content": f"answer {i} " * 60}]
    return {"messages": messages, "kv_text": "".join(m["content"] for m in messages),
            "turns": [{"message": 2 * i, "token": 90 * i, "char": 0} for i in range(turns)],
            "n_kv": 90 * turns, "updated": float(turns)}


def test_deltas_rebuild_the_record_through_json() -> None:
    rng = random.Random(5)
    old = chat_record(6)
    for _ in range(200):
        new = json.loads(json.dumps(old))
        edit = rng.randrange(5)
        if edit == 0:
            new["messages"].append({"role": "user", "content": str(rng.random())})
        elif edit == 1:
            del new["messages"][rng.randrange(len(new["messages"]) + 1):]
        elif edit == 2:
            new["kv_text"] = new["kv_text"][: rng.randrange(len(new["kv_text"]) + 1)] + "é" * rng.randrange(3)
        elif edit == 3:
            new.pop("turns", None) if rng.random() < 0.5 else new.update(turns=[])
        else:
            new["n_kv"], new["extra_field"] = rng.randrange(100), {"a": [1, 2]}
        delta = manifest_log.record_delta(old, new)
        assert manifest_log.apply_delta(old, json.loads(json.dumps(delta))) == new
        old = new


def test_a_turn_appends_a_frame_whose_size_does_not_grow_with_the_history(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    per_turn = {}
    for history in (10, 200):  # exchanges: ~1k and ~18k tokens' worth of transcript
        engine.cells = words(90 * history)
        store.save(SESSION, "chat", chat_record(history), engine.cells, engine, FP)
        path = store.manifest_path(SESSION, "chat")
        costs = []
        for turn in range(history + 1, history + 4):
            size = path.stat().st_size
            engine.cells = engine.cells + words(90, seed=turn)
            store.save(SESSION, "chat", chat_record(turn), engine.cells, engine, FP)
            costs.append(path.stat().st_size - size)
        per_turn[history] = max(costs)
        again = store.read_manifest(SESSION, "chat")
        assert again.record == chat_record(history + 3) and again.tokens == engine.cells
    rewritten = len(json.dumps(chat_record(200)))  # what a save cost when it rewrote the manifest
    assert per_turn[200] <= 1.1 * per_turn[10] and per_turn[200] < rewritten / 20, (per_turn, rewritten)


def test_the_log_is_written_whole_again_once_it_has_doubled(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    path = store.manifest_path(SESSION, "chat")
    sizes = []
    for turn in range(1, 300):
        engine.cells = engine.cells + words(30, seed=turn)
        store.save(SESSION, "chat", chat_record(turn), engine.cells, engine, FP)
        sizes.append(path.stat().st_size)
        log = store.read_manifest(SESSION, "chat").log
        assert log is not None and log.size == sizes[-1]
        assert log.size - log.snapshot <= max(log.snapshot, manifest_log._SLACK)
    rewrites = sum(b < a for a, b in zip(sizes, sizes[1:], strict=False))
    assert 1 <= rewrites <= 12  # each doubles what the last one wrote: logarithmic
    assert store.read_manifest(SESSION, "chat").record == chat_record(299)


def test_a_torn_append_reads_as_the_manifest_before_it(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(300))
    store.save(SESSION, "chat", chat_record(1), engine.cells, engine, FP)
    path = store.manifest_path(SESSION, "chat")
    whole = path.read_bytes()
    engine.eval(words(40, seed=1))
    store.save(SESSION, "chat", chat_record(2), engine.cells, engine, FP)
    appended = path.read_bytes()
    assert appended.startswith(whole)
    for cut in (len(whole) + 3, len(whole) + 40, len(appended) - 1):
        path.write_bytes(appended[:cut])
        assert store.read_manifest(SESSION, "chat").record == chat_record(1)
    # a whole last frame that fails its checksum: an append's write that did not finish
    path.write_bytes(appended[:-1] + bytes([appended[-1] ^ 1]))
    manifest = store.read_manifest(SESSION, "chat")
    assert manifest.record == chat_record(1) and len(manifest.tokens) == 300
    # the next save cuts the tail off and appends where the whole frames end
    engine.eval(words(40, seed=2))
    store.save(SESSION, "chat", chat_record(3), engine.cells, engine, FP, previous=manifest)
    again = store.read_manifest(SESSION, "chat")
    assert again.record == chat_record(3) and again.tokens == engine.cells
    assert path.read_bytes().startswith(whole)


def test_a_damaged_frame_before_the_last_is_refused(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    for turn in range(1, 4):
        engine.eval(words(100, seed=turn))
        store.save(SESSION, "chat", chat_record(turn), engine.cells, engine, FP)
    path = store.manifest_path(SESSION, "chat")
    data = bytearray(path.read_bytes())
    data[len(manifest_log._HEAD) + 40] ^= 1  # inside the first frame
    path.write_bytes(bytes(data))
    with pytest.raises(SessionError, match="damaged"):
        store.read_manifest(SESSION, "chat")


def test_a_save_from_a_stale_manifest_writes_whole_and_loses_nothing(tmp_path: Path) -> None:
    """Two writers of one name (a server's head continued twice): the second, whose
    manifest is no longer the file's, never appends to a log it did not read."""
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(300))
    first = store.save(SESSION, "chat", chat_record(1), engine.cells, engine, FP).manifest
    engine.eval(words(40, seed=1))
    store.save(SESSION, "chat", chat_record(2), engine.cells, engine, FP, previous=first)
    other = FakeKvEngine()
    other.cells = first.tokens + words(60, seed=9)
    store.save(SESSION, "chat", chat_record(7), other.cells, other, FP, previous=first)
    again = store.read_manifest(SESSION, "chat")
    assert again.record == chat_record(7) and again.tokens == other.cells
    assert again.log is not None and again.log.frames == 1


def test_a_record_changed_after_its_save_was_prepared_is_saved_as_it_was(tmp_path: Path) -> None:
    """The files are written on a thread while the conversation goes on: what a save
    writes is the record as it was when prepared (its lists are the live ones)."""
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(300))
    live = chat_record(2)
    store.save(SESSION, "chat", live, engine.cells, engine, FP)
    live["messages"].append({"role": "user", "content": "third"})
    pending = store.prepare(SESSION, "chat", live, engine.cells, engine, FP)
    live["messages"].append({"role": "assistant", "content": "written later"})
    del live["messages"][0]
    store.commit(pending)
    messages = store.read_manifest(SESSION, "chat").record["messages"]
    assert messages == [*chat_record(2)["messages"], {"role": "user", "content": "third"}]


def test_a_manifest_of_format_1_is_read_and_its_next_save_writes_a_log(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(300))
    manifest = store.save(SESSION, "chat", chat_record(1), engine.cells, engine, FP).manifest
    header = json.dumps({"kind": SESSION, "name": "chat", "fingerprint": FP.hex(),
                         "chain": [[x.key, x.start, x.end, x.kind] for x in manifest.chain],
                         "n_tokens": 300, "created": 1.0, "updated": 2.0}).encode()
    path = store.manifest_path(SESSION, "chat")
    path.write_bytes(b"".join(kv_files._sealed(kv_files.MANIFEST_MAGIC, [
        header, json.dumps(chat_record(1)).encode(), kv_files.token_bytes(engine.cells), b""])))
    old = store.read_manifest(SESSION, "chat")
    assert old.record == chat_record(1) and old.chain == manifest.chain and old.log is None
    engine.eval(words(40, seed=1))
    store.save(SESSION, "chat", chat_record(2), engine.cells, engine, FP, previous=old)
    assert path.read_bytes().startswith(manifest_log._HEAD)
    assert store.read_manifest(SESSION, "chat").tokens == engine.cells
