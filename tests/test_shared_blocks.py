"""The prefix cache's segments are KV store blocks: a session that starts with a cached
prompt names them instead of writing its own, the cache never takes a session's
cells, and what the cache kept before it used blocks is removed without a fuss (a
fake engine with llama.cpp's state layout; tests/test_shared_blocks_model.py runs
the real model)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from fake_kv_engine import FakeKvEngine

from kvchat.kv_files import block_keys
from kvchat.kv_store import SESSION, KvStore, cut_spans
from kvchat.prefix_cache import Fingerprint, PrefixCache
from kvchat.prefix_store import LEGACY_SUFFIX, Store

FP = Fingerprint("ab" * 32, "model.gguf", "f16", "f16", "off", False, 0, 512, 512, "0.3.36")
PAD = 200  # bytes of K per cell, so that headers do not dominate


def doc(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def record(n: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"{n} tokens"}], "n_kv": n}


def cached_prompt(root: Path, tokens: list[int], marks: tuple[int, ...]) -> FakeKvEngine:
    """Run a prompt through the prefix cache (as `kvchat run` does); the engine holds it."""
    engine = FakeKvEngine(pad=PAD)
    pc = PrefixCache(FP, store=Store(root), min_tokens=32, block_tokens=64)
    pc.prefill(engine, tokens, marks)
    pc.commit()
    return engine


def test_a_cached_segment_is_the_block_a_session_writes_for_those_cells(tmp_path: Path) -> None:
    document = doc(300)
    cached_prompt(tmp_path / "cache", document + [1, 2, 3], marks=(300,))
    engine = FakeKvEngine(pad=PAD)
    engine.eval(document + [1, 2, 3])
    alone = KvStore(tmp_path / "alone", block_tokens=64)
    alone.save(SESSION, "s", record(303), engine.cells, engine, FP.digest())
    entries = Store(tmp_path / "cache").read_index().values()
    spans = [(0, 64), (64, 128), (128, 192), (192, 256), (256, 300)]
    assert sorted((e.start, e.end) for e in entries) == spans
    cache_store = KvStore(tmp_path / "cache")
    for e in entries:
        # A session cut its cells at the same points where they agree (multiples of 64):
        # same key, same file, byte for byte.
        if e.end % 64 == 0:
            (key,) = block_keys(FP.digest(), document, [(e.start, e.end)])
            assert e.block == key
            assert cache_store.block_path(key).read_bytes() == alone.block_path(key).read_bytes()


def test_a_session_started_from_a_cached_prompt_writes_only_its_own_cells(tmp_path: Path) -> None:
    document = doc(1000, seed=1)
    store = KvStore(tmp_path)
    engine = cached_prompt(tmp_path, document + [5, 6], marks=(1000,))
    cached = store.usage()
    assert cached.prefix == cached.blocks > 1000 * PAD
    engine.eval(doc(40, seed=2))  # the reply and the next prompt
    reads_before = engine.range_reads
    result = store.save(SESSION, "forked", record(len(engine.cells)), engine.cells, engine, FP.digest())
    own = len(engine.cells) - 1000
    # Only the cells past the cached document were read from the engine and written.
    assert engine.range_reads - reads_before == own
    assert result.blocks_shared == len(store.prefix.read_index())
    assert result.blocks_written == len(cut_spans(1000, len(engine.cells)))
    assert result.manifest.chain[0].key in {e.block for e in store.prefix.read_index().values()}
    usage = store.usage()
    cell = cached.blocks / 1000  # a cell's bytes, as stored
    assert usage.blocks - cached.blocks < own * cell + 4096
    assert usage.shared[(SESSION, "forked")] == cached.prefix
    assert usage.own[(SESSION, "forked")] < own * cell + 4096 + len(engine.cells) * 4 + 4096
    assert usage.total == usage.blocks + usage.manifests  # every block once

    # The cache's eviction and `cache clear` drop its entries, never the session's cells.
    store.evict(1, cache_only=True)
    assert store.prefix.read_index() == {}
    Store(tmp_path).clear()
    manifest = store.read_manifest(SESSION, "forked")
    back = FakeKvEngine(pad=PAD)
    got = store.restore(manifest, back)
    assert got.damage is None and got.n_tokens == len(engine.cells) and back.cells == engine.cells
    assert store.usage().unreferenced == 0

    # Removing the session lets the cache's former blocks go as unreferenced cache.
    store.remove(SESSION, "forked")
    store.evict(0)
    assert store.usage().blocks == 0


def test_an_entry_the_cache_evicts_keeps_the_block_a_session_names(tmp_path: Path) -> None:
    document = doc(300, seed=3)
    store = KvStore(tmp_path)
    engine = cached_prompt(tmp_path, document + [9], marks=(300,))
    store.save(SESSION, "s", record(301), engine.cells, engine, FP.digest())
    blocks = {e.block for e in store.prefix.read_index().values()}
    report = store.evict(0)  # over any budget: the cache goes, the named session stays
    assert store.prefix.read_index() == {} and report.over_budget
    assert all(store.block_path(key).exists() for key in blocks)
    assert report.named_bytes == store.usage().total


def test_a_session_under_another_fingerprint_shares_nothing(tmp_path: Path) -> None:
    document = doc(300, seed=4)
    store = KvStore(tmp_path)
    engine = cached_prompt(tmp_path, document + [9], marks=(300,))
    result = store.save(SESSION, "s", record(301), engine.cells, engine, replace(FP, type_k="q8_0").digest())
    assert result.blocks_written == len(cut_spans(0, 301)) and store.usage().shared[(SESSION, "s")] == 0


def test_the_fingerprint_is_of_the_bytes_not_the_file_name() -> None:
    assert replace(FP, model_name="moved.gguf").digest() == FP.digest()
    assert replace(FP, n_ubatch=256).digest() != FP.digest()


def test_a_manifest_saved_under_another_digest_restores_and_its_next_save_rekeys(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(doc(600, seed=5))
    old = store.save(SESSION, "s", record(600), engine.cells, engine, b"\x09" * 32).manifest
    back = FakeKvEngine()
    assert store.restore(old, back).n_tokens == 600 and back.cells == engine.cells  # its own digest
    assert store.restore(old, FakeKvEngine(), FP.digest()).n_tokens == 0  # asked for another: nothing
    back.eval([1, 2])
    new = store.save(SESSION, "s", record(602), back.cells, back, FP.digest(), previous=old)
    assert new.manifest.fingerprint == FP.digest().hex() and new.blocks_written == len(cut_spans(0, 602))
    again = FakeKvEngine()
    assert store.restore(new.manifest, again).n_tokens == 602 and again.cells == back.cells
    store.evict(0)
    assert store.usage().unreferenced == 0  # the old digest's blocks went with nobody naming them


def test_segments_from_before_the_store_are_removed_on_first_use(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.folder.mkdir(parents=True)
    legacy = [store.folder / f"{c * 64}{LEGACY_SUFFIX}" for c in "ab"]
    for path in legacy:
        path.write_bytes(b"KVCHATPREFIX\n\x01\x00\x00\x00 old")
    store.index_path.write_text(json.dumps({"format_version": 1, "entries": {"k": {"key": "k"}}}))
    assert store.read_index() == {}
    assert not any(p.exists() for p in legacy)
    document = doc(200, seed=6)
    cached_prompt(tmp_path, document + [1], marks=(200,))
    engine = FakeKvEngine(pad=PAD)
    pc = PrefixCache(FP, store=Store(tmp_path), min_tokens=32, block_tokens=64)
    got = pc.prefill(engine, document + [2])
    assert got.restored_tokens == 200 and engine.cells == document + [2]
    assert json.loads(store.index_path.read_text())["format_version"] == 2
