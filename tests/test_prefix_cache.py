"""The prefix cache's storage: hits, boundaries, fingerprints, threshold, eviction,
damaged files and two processes at once (a fake engine with llama.cpp's state layout;
tests/test_prefix_cache_model.py runs the real model)."""

from __future__ import annotations

import json
import multiprocessing
import random
from dataclasses import replace
from pathlib import Path

from fake_kv_engine import FakeKvEngine

from kvchat.kv_store import KvStore
from kvchat.prefix_cache import Fingerprint, PrefixCache, Store
from kvchat.prefix_store import FORMAT_VERSION

FP = Fingerprint("ab" * 32, "model.gguf", "f16", "f16", "off", False, 0, 512, 512, "0.3.36")


def cache(folder: Path, fp: Fingerprint = FP, **kw: int) -> PrefixCache:
    kw.setdefault("min_tokens", 32)
    kw.setdefault("block_tokens", 64)
    return PrefixCache(fp, store=KvStore(folder).prefix, **kw)  # as the app makes it


def run_prompt(folder: Path, tokens: list[int], marks: tuple[int, ...] = (),
               **kw: int) -> tuple[int, FakeKvEngine]:
    engine = FakeKvEngine()
    pc = cache(folder, **kw)
    got = pc.prefill(engine, tokens, marks)
    assert engine.cells == tokens  # whatever came from disk, the cache holds the prompt
    pc.commit()
    return got.restored_tokens, engine


def doc(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def block_files(root: Path) -> set[str]:
    """The keys of the block files in the KV store at `root` (the cache's segments)."""
    return {p.stem for p in (root / "blocks").glob("*/*.kvb")}


def test_second_run_restores_the_shared_start_and_evaluates_the_rest(tmp_path: Path) -> None:
    document = doc(200)
    first, _ = run_prompt(tmp_path, document + [7, 8, 9], marks=(200,))
    second, engine = run_prompt(tmp_path, document + [10, 11, 12, 13], marks=(200,))
    assert first == 0
    assert second == 200
    assert engine.evaluated == 4


def test_every_segment_a_restore_uses_counts_a_hit(tmp_path: Path) -> None:
    # Two questions over one document: the document's segments served both.
    document = doc(200)
    run_prompt(tmp_path, document + [7, 8, 9], marks=(128, 200))
    run_prompt(tmp_path, document + [10, 11], marks=(128, 200))
    run_prompt(tmp_path, document[:150] + [12, 13], marks=(128,))
    hits = {e.end: e.hits for e in Store(tmp_path).read_index().values()}
    assert hits[64] == 2 and hits[128] == 2 and hits[200] == 1


def test_block_boundaries_find_a_shared_start_without_marks(tmp_path: Path) -> None:
    document = doc(300)
    run_prompt(tmp_path, document[:250] + doc(40, seed=1))
    restored, _ = run_prompt(tmp_path, document[:250] + doc(40, seed=2))
    assert restored == 192  # the last block boundary (64 x 3) before the prompts diverge


def test_a_prompt_never_restores_all_its_tokens(tmp_path: Path) -> None:
    tokens = doc(128)
    run_prompt(tmp_path, tokens + [1])
    restored, engine = run_prompt(tmp_path, tokens)  # 128 is a stored boundary
    assert restored == 64 and engine.evaluated == 64  # the last token's logits are needed


def test_other_model_or_settings_never_hit(tmp_path: Path) -> None:
    tokens = doc(200)
    run_prompt(tmp_path, tokens, marks=(150,))
    for changed in (replace(FP, model_sha256="cd" * 32), replace(FP, type_k="q8_0"),
                    replace(FP, flash_attn="on"), replace(FP, swa_full=True),
                    replace(FP, backend="0.3.37")):
        engine = FakeKvEngine()
        got = cache(tmp_path, changed).prefill(engine, tokens)
        assert got.restored_tokens == 0 and engine.evaluated == 200


def test_prompts_under_the_threshold_are_not_stored(tmp_path: Path) -> None:
    pc = cache(tmp_path, min_tokens=100)
    got = pc.prefill(FakeKvEngine(), doc(99), marks=(50,))
    # Why it was not stored is said (--json prefix_cache_skipped), as routine: no warning.
    assert got.skipped == "the prompt has 99 tokens; the prefix cache stores prompts of 100 or more"
    assert got.routine
    assert pc.commit() == 0
    assert Store(tmp_path).read_index() == {}
    pc.prefill(FakeKvEngine(), doc(150), marks=(120,))
    assert pc.commit() > 0
    assert sorted(e.end for e in Store(tmp_path).read_index().values()) == [120, 128]  # not 64


def test_each_block_is_stored_once(tmp_path: Path) -> None:
    document = doc(256)
    run_prompt(tmp_path, document + [1, 2], marks=(256,))
    run_prompt(tmp_path, document + [3, 4], marks=(256,))
    entries = Store(tmp_path).read_index().values()
    assert sorted((e.start, e.end) for e in entries) == [(0, 64), (64, 128), (128, 192), (192, 256)]


def test_lru_eviction_keeps_the_cache_under_its_limit(tmp_path: Path) -> None:
    run_prompt(tmp_path, doc(100, seed=1), marks=(90,))
    one = Store(tmp_path).used_bytes()
    run_prompt(tmp_path, doc(100, seed=2), marks=(90,))
    run_prompt(tmp_path, doc(100, seed=1), marks=(90,))  # a hit: seed 1 is now the most recent
    # Room for two prompts' entries: the third evicts the least recently used (seed 2).
    run_prompt(tmp_path, doc(100, seed=3), marks=(90,), limit_bytes=int(one * 2.5))
    store = Store(tmp_path)
    assert store.used_bytes() <= one * 2.5
    assert run_prompt(tmp_path, doc(100, seed=1), marks=(90,))[0] == 90
    assert run_prompt(tmp_path, doc(100, seed=3), marks=(90,))[0] == 90
    assert run_prompt(tmp_path, doc(100, seed=2), marks=(90,), limit_bytes=1)[0] == 0
    assert block_files(tmp_path) == {e.block for e in store.read_index().values()}


def test_evicting_a_block_drops_the_blocks_after_it(tmp_path: Path) -> None:
    run_prompt(tmp_path, doc(200), marks=(150,))
    store = KvStore(tmp_path).prefix
    entries = store.read_index()
    root = next(k for k, e in entries.items() if e.start == 0)
    store.remove_entries({root})
    assert store.read_index() == {}
    assert not block_files(tmp_path)


def test_a_corrupt_entry_is_removed_and_the_prompt_evaluated(tmp_path: Path) -> None:
    tokens = doc(150)
    run_prompt(tmp_path, tokens + [1], marks=(150,))
    store = Store(tmp_path)
    last = max(store.read_index().values(), key=lambda e: e.end)
    path = store.block_path(last.block)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    restored, _ = run_prompt(tmp_path, tokens + [2], marks=(150,))
    assert restored == 128  # the damaged segment is gone; the blocks before it still serve
    assert last.key in store.read_index()  # ... and the prompt stored it again, whole
    assert run_prompt(tmp_path, tokens + [3], marks=(150,))[0] == 150


def test_truncated_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    tokens = doc(150)
    run_prompt(tmp_path, tokens + [1], marks=(150,))
    store = Store(tmp_path)
    for entry in store.read_index().values():
        path = store.block_path(entry.block)
        path.write_bytes(path.read_bytes()[:100])
    store.block_path("0" * 64).parent.mkdir(parents=True, exist_ok=True)
    store.block_path("0" * 64).write_bytes(b"not ours")
    restored, _ = run_prompt(tmp_path, tokens + [2], marks=(150,))
    assert restored == 0
    assert run_prompt(tmp_path, tokens + [3], marks=(150,))[0] == 150


def test_a_damaged_index_is_rebuilt_from_the_entries(tmp_path: Path) -> None:
    tokens = doc(150)
    run_prompt(tmp_path, tokens + [1], marks=(150,))
    index = Store(tmp_path).index_path
    index.write_text("{ broken")
    assert run_prompt(tmp_path, tokens + [2], marks=(150,))[0] == 150
    assert json.loads(index.read_text())["format_version"] == FORMAT_VERSION


def _worker(folder: str, seed: int, rounds: int) -> int:
    """Store and restore overlapping prompts; returns tokens restored."""
    rng = random.Random(seed)
    shared = doc(300)
    restored = 0
    for _ in range(rounds):
        tail = [rng.randrange(1, 1000) for _ in range(rng.randrange(1, 40))]
        cut = rng.choice((100, 200, 300))
        got, _ = run_prompt(Path(folder), shared[:cut] + tail, marks=(cut,), limit_bytes=60_000)
        restored += got
    return restored


def test_two_processes_storing_and_reading_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_worker, [(str(tmp_path), 1, 25), (str(tmp_path), 2, 25)])
    assert sum(results) > 0
    store = Store(tmp_path)
    index = store.read_index()
    files = block_files(tmp_path)
    assert {e.block for e in index.values()} <= files  # every indexed entry exists (strays are cleaned later)
    assert store.used_bytes() <= 60_000


class _OpaqueStateEngine(FakeKvEngine):
    """A state kv_state cannot read (as a recurrent model's would be: such an engine
    reads no ranges either, so the cache cuts its whole state)."""

    def __init__(self) -> None:
        super().__init__(ranges=False)

    def state_bytes(self) -> bytes:
        return b"\x01\x02\x03\x04\x00\x00\x00\x00\x07"


def test_a_state_that_cannot_be_cut_is_skipped_with_a_reason(tmp_path: Path) -> None:
    tokens = doc(200)
    engine = _OpaqueStateEngine()
    pc = cache(tmp_path)
    got = pc.prefill(engine, tokens, [150])
    assert engine.cells == tokens and engine.evaluated == 200  # each token evaluated once
    assert got.skipped is not None and "cannot cut" in got.skipped
    assert pc.commit() == 0


def test_recurrent_and_hybrid_models_skip_the_cache(tmp_path: Path) -> None:
    for kind in ("recurrent", "hybrid"):
        engine = FakeKvEngine()
        pc = PrefixCache(FP, store=Store(tmp_path), memory_kind=kind, min_tokens=32)
        got = pc.prefill(engine, doc(100))
        assert got.skipped is not None and kind in got.skipped
        assert engine.cells == doc(100)
    assert Store(tmp_path).read_index() == {}


def test_progress_counts_over_the_whole_prompt(tmp_path: Path) -> None:
    tokens = doc(200)
    run_prompt(tmp_path, tokens + [1], marks=(150,))
    seen: list[tuple[int, int]] = []
    cache(tmp_path).prefill(FakeKvEngine(), tokens + [2], [150], lambda *report: seen.append(report))
    assert seen[0] == (192, 201) and seen[-1] == (201, 201)  # restored to the 192 block, then the rest


def test_piped_cache_list_is_tab_separated(kvchat, kv_env: dict[str, str]) -> None:  # noqa: ANN001
    from kvchat import config

    folder = config.paths().data_dir / "kv-store"
    document = doc(200)
    run_prompt(folder, document + [7], marks=(128,))
    run_prompt(folder, document + [8], marks=(128,))
    result = kvchat("cache", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["key", "model", "tokens", "size", "last use", "hits"]
    rows = sorted((r[1], r[2], r[5]) for r in (line.split("\t") for line in lines[1:]))
    # The second prompt restored all three segments: each counts the hit.
    # The model under the name `kvchat list` gives a file (its stem), as everywhere.
    assert rows == [("model", "0-64", "1"), ("model", "128-192", "1"), ("model", "64-128", "1")]


def test_cache_stats_paths_and_sessions_list_show_one_store_with_the_cache_in_it(kvchat, kv_env) -> None:  # noqa: ANN001
    from kvchat import config
    from kvchat.kv_store import RECENT, SESSION, KvStore
    from kvchat.units import format_bytes

    # The cache before its segments were store blocks: `.kvp` files, in its folder
    # from before it joined the store and in the store's; removed on first use.
    old = Path(kv_env["KVCHAT_HOME"]) / "prefix-cache"
    old.mkdir(parents=True)
    (old / f"{'a' * 64}.kvp").write_bytes(b"KVCHATPREFIX\n old")
    folder = config.paths().prefix_cache_dir
    folder.mkdir(parents=True)
    (folder / f"{'b' * 64}.kvp").write_bytes(b"KVCHATPREFIX\n old")
    (folder / "index.json").write_text(json.dumps({"format_version": 1, "entries": {}}))
    run_prompt(folder.parent, doc(200) + [7], marks=(128,))
    stats = json.loads(kvchat("cache", "stats", "--json").stdout)
    assert not old.exists() and not list(folder.glob("*.kvp")) and stats["path"] == str(folder)
    assert stats["entries"] == 3 and stats["bytes"] > 0
    assert stats["kv_store"]["prefix_cache_bytes"] == stats["bytes"] == stats["kv_store"]["bytes"]
    assert stats["effective_limit_bytes"] == stats["kv_store"]["budget_bytes"]
    assert json.loads(kvchat("paths", "--json").stdout)["kv_store"].startswith(stats["kv_store"]["path"])
    line = kvchat("cache", "stats").stdout.splitlines()[-1]  # the line `sessions list` ends with too
    assert line.startswith(f"KV store: {format_bytes(stats['kv_store']['bytes'])} of ")
    assert line.endswith(f"cache {format_bytes(stats['bytes'])})")
    kv_env["KVCHAT_PREFIX_CACHE_SIZE"] = "1M"  # the budget's deprecated name still works
    stats = json.loads(kvchat("cache", "stats", "--json").stdout)
    assert stats["limit_bytes"] == stats["kv_store"]["configured_bytes"] == 1024**2
    assert stats["effective_limit_bytes"] <= 1024**2

    # `cache clear` empties the whole cache of the store: segments and blocks no session names.
    store = KvStore()
    dropped, kept = FakeKvEngine(), FakeKvEngine()
    dropped.eval(doc(512, seed=9))
    kept.eval(doc(300, seed=10))
    store.save(RECENT, "gone", {}, dropped.cells, dropped, b"\x01" * 32)
    store.remove(RECENT, "gone")  # its aligned blocks stay, named by nobody
    store.save(SESSION, "keep", {}, kept.cells, kept, b"\x01" * 32)
    before = store.usage()
    assert before.unreferenced > 0 and before.prefix > 0
    assert kvchat("cache", "clear", "--yes").returncode == 0
    after = store.usage()
    assert (after.unreferenced, after.prefix) == (0, 0)
    assert after.by_kind[SESSION] == before.by_kind[SESSION] > 0
