"""The prefix cache is optional: whatever state its folder is in, a prompt is still
evaluated exactly, `cache clear` repairs it, and a segment file is checked against
the size its index records before it is read (issue 23, item 22)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_kv_engine import FakeKvEngine
from test_prefix_cache import cache, doc, run_prompt

from kvchat.prefix_store import Store

BROKEN = {
    "a list": "[]",
    "a string": '"index"',
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "wrong types": json.dumps({"format_version": 1, "entries": {"k": {
        "key": "k", "parent": "", "start": "0", "end": [], "fingerprint": 1, "model": None,
        "bytes": "big", "created": "x", "last_used": {}, "hits": -1, "resumable": "yes"}}}),
    "entries not a mapping": json.dumps({"format_version": 1, "entries": [1, 2]}),
}


@pytest.mark.parametrize("content", list(BROKEN.values()), ids=list(BROKEN))
def test_any_broken_index_is_rebuilt_from_the_entries(tmp_path: Path, content: str) -> None:
    tokens = doc(200)
    run_prompt(tmp_path, tokens + [1], marks=(200,))
    Store(tmp_path).index_path.write_text(content)
    restored, engine = run_prompt(tmp_path, tokens + [2], marks=(200,))
    assert restored == 200 and engine.cells == tokens + [2]
    assert Store(tmp_path).clear() > 0 and Store(tmp_path).read_index() == {}


def test_an_index_that_is_a_folder_costs_the_cache_and_clear_repairs_it(tmp_path: Path) -> None:
    Store(tmp_path).index_path.mkdir(parents=True)
    tokens = doc(200)
    run_prompt(tmp_path, tokens + [1], marks=(200,))  # answered; the index could not be written
    run_prompt(tmp_path, tokens + [2], marks=(200,))
    Store(tmp_path).clear()
    assert Store(tmp_path).index_path.is_file()
    run_prompt(tmp_path, tokens + [1], marks=(200,))
    assert run_prompt(tmp_path, tokens + [3], marks=(200,))[0] == 200  # works again


def test_a_read_only_cache_folder_answers_without_the_cache(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = doc(200)
    run_prompt(tmp_path, tokens + [1], marks=(200,))

    def refused(*args: object, **kwargs: object) -> None:  # as a read-only folder answers (even root's)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("kvchat.prefix_store.atomic_write", refused)
    monkeypatch.setattr("kvchat.kv_files.atomic_write", refused)  # its segments are store blocks
    pc = cache(tmp_path)
    engine = FakeKvEngine()
    got = pc.prefill(engine, tokens + [2], (200,))  # lookups, hits and their bookkeeping: no error
    assert got.restored_tokens == 200 and engine.cells == tokens + [2]
    other = FakeKvEngine()
    pc.prefill(other, doc(300, seed=5), (300,))
    assert other.cells == doc(300, seed=5)
    with pytest.raises(OSError):
        pc.commit()  # Session turns this into one warning (TurnStats.prefix_cache_skipped)


def test_a_segment_of_another_size_than_recorded_is_never_read(tmp_path: Path) -> None:
    tokens = doc(200)
    run_prompt(tmp_path, tokens + [1], marks=(200,))
    entries = Store(tmp_path).read_index()
    first = next(e for e in entries.values() if e.start == 0)
    segment = Store(tmp_path).block_path(first.block)
    with segment.open("ab") as fh:
        fh.truncate(segment.stat().st_size + 64 * 1024 * 1024)  # sparse: a huge file
    restored, engine = run_prompt(tmp_path, tokens + [2], marks=(200,))
    assert restored == 0 and engine.cells == tokens + [2]
    # Dropped from the cache, then written again whole by this prompt's own prefill.
    assert segment.stat().st_size == Store(tmp_path).read_index()[first.key].bytes < 1024 * 1024
