"""The KV block store's storage: a turn writes only its new cells, blocks are shared,
a SIGKILL mid-save loses nothing saved, damage costs only what depends on it, and
eviction keeps named sessions (a fake engine with llama.cpp's state layout;
tests/test_kv_store_model.py runs the real model)."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fake_kv_engine import FakeKvEngine

from kvchat import kv_files, kv_state, manifest_log
from kvchat.kv_store import RECENT, SESSION, KvStore, Manifest, cut_spans, effective_budget

FP = b"\x01" * 32
OTHER_FP = b"\x02" * 32
# A fake cell of SmolLM2's size (22.5 KiB of K and V per token), so that what a
# manifest costs per token of history weighs as it does with a real model.
SMOL_PAD = 2 * 11520 - 8


def words(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def record(n: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"{n} tokens"}], "n_kv": n}


def save(store: KvStore, name: str, engine: FakeKvEngine, kind: str = SESSION,
         **kw: Any) -> int:
    return store.save(kind, name, record(len(engine.cells)), engine.cells, engine, FP, **kw).bytes_written


def restored(store: KvStore, name: str, kind: str = SESSION, fp: bytes = FP) -> tuple[FakeKvEngine, int]:
    manifest = store.read_manifest(kind, name)
    engine = FakeKvEngine()
    got = store.restore(manifest, engine, fp)
    assert engine.cells == manifest.tokens[: got.n_tokens]
    return engine, got.n_tokens


def test_spans_are_cut_at_block_multiples() -> None:
    assert cut_spans(0, 600, 256) == [(0, 256), (256, 512), (512, 600)]
    assert cut_spans(300, 520, 256) == [(300, 512), (512, 520)]
    assert cut_spans(300, 400, 256) == [(300, 400)]
    assert cut_spans(256, 512, 256) == [(256, 512)]


def test_turns_resume_exactly_after_appends_and_edits(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    for turn in range(12):
        engine.eval(words(90, seed=turn))
        save(store, "chat", engine)
    assert restored(store, "chat")[1] == 12 * 90
    # /undo: the history loses its last turn, and the next turn differs
    engine.cells = engine.cells[: 11 * 90 - 7]
    engine.eval(words(50, seed=99))
    save(store, "chat", engine)
    again, n = restored(store, "chat")
    assert n == len(engine.cells) and again.cells == engine.cells


def test_bytes_written_per_turn_are_the_new_cells_at_any_history_length(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine(pad=SMOL_PAD)
    engine.eval(words(300))
    save(store, "chat", engine)
    cell = (len(engine.state_range_bytes(0, 300)) - 8) / 300  # bytes per cell, one part's headers aside
    per_turn = {}
    for history in (300, 3000):
        if len(engine.cells) < history:
            engine.eval(words(history - len(engine.cells), seed=1))
            save(store, "chat", engine)
        costs = []
        for turn in range(3):
            engine.eval(words(50, seed=10 + turn))
            before = store.bytes_written
            save(store, "chat", engine)
            costs.append(store.bytes_written - before)
        per_turn[history] = max(costs)
        assert max(costs) <= 1.1 * 50 * cell + 64 * 1024, (history, costs, cell)
    assert per_turn[3000] / per_turn[300] <= 1.1
    # what the store counts is what reaches the disk: the new blocks and the manifest's
    # new frame (the whole manifest when its log was written again)
    before = {p: p.stat().st_size for p in (tmp_path / "blocks").rglob("*.kvb")}
    manifest = store.manifest_path(SESSION, "chat").stat()
    engine.eval(words(300, seed=20))
    counted = save(store, "chat", engine)
    new = sum(p.stat().st_size for p in (tmp_path / "blocks").rglob("*.kvb") if p not in before)
    after = store.manifest_path(SESSION, "chat").stat()
    assert after.st_ino == manifest.st_ino  # appended to
    assert counted == new + after.st_size - manifest.st_size


def test_a_turn_reads_only_its_new_cells_from_the_engine(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(2000))
    save(store, "chat", engine)
    engine.range_reads = 0
    engine.eval(words(40, seed=3))
    save(store, "chat", engine)
    assert engine.range_reads == 40


def test_conversations_with_a_shared_start_store_its_blocks_once(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    start = words(600)
    a, b = FakeKvEngine(), FakeKvEngine()
    a.eval(start + words(30, seed=1))
    b.eval(start + words(40, seed=2))
    save(store, "a", a)
    result = store.save(SESSION, "b", record(640), b.cells, b, FP)
    assert (result.blocks_shared, result.blocks_written) == (2, 1)  # [0, 256), [256, 512) shared
    usage = store.usage()
    assert usage.shared[(SESSION, "a")] == usage.shared[(SESSION, "b")] > 0
    assert restored(store, "b")[0].cells == b.cells


def test_a_copy_under_another_name_costs_one_manifest(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    for turn in range(5):  # several turn pieces, not aligned blocks
        engine.eval(words(70, seed=turn))
        save(store, "orig", engine)
    original = store.read_manifest(SESSION, "orig")
    copy = store.save(RECENT, "auto-1", record(350), engine.cells, engine, FP, base=original)
    assert copy.blocks_written == 0
    assert copy.bytes_written == store.manifest_path(RECENT, "auto-1").stat().st_size
    assert restored(store, "auto-1", RECENT)[0].cells == engine.cells
    store.remove(SESSION, "orig")  # the copy still names every block
    assert restored(store, "auto-1", RECENT)[1] == 350


def test_models_that_cannot_be_cut_save_whole_and_keep_only_the_last(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine(ranges=False)
    for turn in range(3):
        engine.eval(words(100, seed=turn))
        save(store, "swa", engine)
    assert len(list((tmp_path / "blocks").rglob("*.kvb"))) == 1
    again, n = restored(store, "swa")
    assert n == 300 and again.cells == engine.cells


def test_another_fingerprint_restores_nothing(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(300))
    save(store, "chat", engine)
    assert restored(store, "chat", fp=OTHER_FP)[1] == 0


def test_a_damaged_block_costs_only_what_follows_it(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(700))
    save(store, "chat", engine)
    save(store, "twin", engine)  # names the same blocks
    middle = store.read_manifest(SESSION, "chat").chain[1]
    path = store.block_path(middle.key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = store.read_manifest(SESSION, "chat")
    partial = FakeKvEngine()
    got = store.restore(manifest, partial, FP)
    assert got.n_tokens == 256 and partial.cells == engine.cells[:256]
    assert got.damage is not None and "checksum" in got.damage.reason
    assert got.damage.start == 256
    assert got.damage.affected == [(SESSION, "chat"), (SESSION, "twin")]
    assert not path.exists()
    # the caller evaluates the rest; the next save writes the lost block again
    partial.eval(engine.cells[256:])
    assert store.save(SESSION, "chat", record(700), partial.cells, partial, FP).blocks_written == 1
    assert restored(store, "twin")[1] == 700


def test_a_damaged_manifest_is_refused_with_a_hint(tmp_path: Path) -> None:
    from kvchat.errors import SessionError

    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(100))
    save(store, "chat", engine)
    path = store.manifest_path(SESSION, "chat")
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(SessionError, match="damaged"):
        store.read_manifest(SESSION, "chat")
    assert store.usage().damaged == [(SESSION, "chat")]


def _kill_at(root: Path, state: list[int], point: int, how: str, whole: bool) -> None:
    """In a child: the second turn's save, SIGKILLed at its `point`-th file write (a
    rename that publishes a file, or the write that appends the manifest's frame):
    before it, after it, or halfway through the append's write. `whole`: the manifest
    is written whole (its log is due for it) instead of appended to."""
    calls = 0
    rename, pwrite = kv_files._rename, manifest_log._pwrite

    def dying(src: str, dst: str | Path) -> None:
        nonlocal calls
        calls += 1
        if calls == point and how != "after":
            os.kill(os.getpid(), signal.SIGKILL)
        rename(src, dst)
        if calls == point and how == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    def dying_append(fd: int, data: bytes, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == point and how == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if calls == point and how == "half":
            pwrite(fd, data[: len(data) // 2], offset)
            os.fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        n = pwrite(fd, data, offset)
        if calls == point and how == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    kv_files._rename, manifest_log._pwrite = dying, dying_append
    if whole:
        manifest_log._MAX_FRAMES = 1
    engine = FakeKvEngine()
    engine.cells = state
    save(KvStore(root), "chat", engine)
    os._exit(0)


@pytest.mark.parametrize("whole", [False, True], ids=["appended", "written-whole"])
def test_a_save_killed_at_any_point_leaves_a_whole_conversation(tmp_path: Path, whole: bool) -> None:
    first = words(300)
    second = first + words(500, seed=1)  # writes [300, 512), [512, 768), [768, 800), manifest
    third = second + words(40, seed=2)
    ctx = multiprocessing.get_context("fork")
    seen = set()
    for point in range(1, 5):
        for how in ("before", "half", "after"):
            root = tmp_path / f"{point}-{how}"
            engine = FakeKvEngine()
            engine.eval(first)
            save(KvStore(root), "chat", engine)
            child = ctx.Process(target=_kill_at, args=(root, second, point, how, whole))
            child.start()
            child.join()
            assert child.exitcode == -signal.SIGKILL
            store = KvStore(root)
            manifest = store.read_manifest(SESSION, "chat")
            assert manifest.tokens in (first, second)
            again, n = restored(store, "chat")
            assert n == len(manifest.tokens) and again.cells == manifest.tokens
            seen.add(len(manifest.tokens))
            # the next save goes on from what was left (a torn append's tail is cut off)
            engine.cells = list(third)
            save(KvStore(root), "chat", engine)
            again, n = restored(KvStore(root), "chat")
            assert again.cells == third
    assert seen == {300, 800}  # killed before the manifest's write finished, and after


def test_stale_temp_files_are_removed_by_eviction(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = FakeKvEngine()
    engine.eval(words(300))
    save(store, "chat", engine)
    key = store.read_manifest(SESSION, "chat").chain[0].key
    stale = store.block_path(key).parent / f".{key}.kvb.x.tmp"
    stale.write_bytes(b"half")
    fresh = store.block_path(key).parent / f".{key}.kvb.y.tmp"
    fresh.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    store.evict(10**12)
    assert not stale.exists() and fresh.exists()


def _fill(store: KvStore, name: str, kind: str, n: int, seed: int) -> FakeKvEngine:
    engine = FakeKvEngine()
    engine.eval(words(n, seed=seed))
    save(store, name, engine, kind)
    return engine


def test_eviction_takes_unused_blocks_then_oldest_recent_chats_never_named_sessions(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    named = _fill(store, "keep", SESSION, 512, seed=1)
    _fill(store, "auto-old", RECENT, 512, seed=2)
    time.sleep(0.01)
    _fill(store, "auto-new", RECENT, 512, seed=3)
    cache = _fill(store, "cache", RECENT, 512, seed=4)
    store.remove(RECENT, "cache")  # its aligned blocks stay, named by nobody
    unused = [store.block_path(k) for k in kv_files.block_keys(FP, cache.cells, [(0, 256), (256, 512)])]
    assert all(p.exists() for p in unused)
    old = time.time() - 60
    os.utime(unused[1], (old, old))  # least recently used
    usage = store.usage()
    assert usage.unreferenced == sum(p.stat().st_size for p in unused)
    block = unused[0].stat().st_size

    report = store.evict(usage.total - 1)
    assert report.blocks_removed == 1 and not unused[1].exists() and unused[0].exists()
    assert not report.over_budget and report.recent_removed == []

    report = store.evict(store.usage().total - block - 1)
    assert report.recent_removed == ["auto-old"]
    assert store.manifest_names(RECENT) == ["auto-new"]
    assert not unused[0].exists()

    report = store.evict(1)  # named sessions alone exceed it
    assert report.recent_removed == ["auto-new"]
    assert report.over_budget and report.named_bytes == store.usage().total
    assert report.warning() is not None and "named sessions" in report.warning()
    assert restored(store, "keep")[0].cells == named.cells


def test_removing_a_conversation_keeps_only_its_shareable_blocks(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = _fill(store, "chat", SESSION, 600, seed=5)
    store.remove(SESSION, "chat")
    left = {p.stem for p in (tmp_path / "blocks").rglob("*.kvb")}
    assert left == set(kv_files.block_keys(FP, engine.cells, [(0, 256), (256, 512)]))
    assert store.manifest_names(SESSION) == []


def test_manifest_round_trips(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = _fill(store, "chat", SESSION, 300, seed=6)
    store.save(SESSION, "chat", {"x": "é"}, engine.cells, engine, FP, extra=b"checkpoints")
    m = store.read_manifest(SESSION, "chat")
    assert isinstance(m, Manifest) and m.record == {"x": "é"} and m.extra == b"checkpoints"
    assert m.covered == 300 and m.created <= m.updated


class _Shifted(FakeKvEngine):
    """Cells out of position order, as after a context shift: ranges cannot be read."""

    def state_range_bytes(self, start: int, end: int) -> bytes:
        raise kv_state.StateFormatError("the cells do not hold positions in order")


def test_cells_out_of_order_are_saved_whole_and_resume_exactly(tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    engine = _fill(store, "chat", SESSION, 300, seed=7)
    shifted = _Shifted()
    shifted.cells = engine.cells + words(20, seed=8)
    result = store.save(SESSION, "chat", record(320), shifted.cells, shifted, FP)
    assert [x.kind for x in result.manifest.chain] == ["whole"]
    again, n = restored(store, "chat")
    assert n == 320 and again.cells == shifted.cells
    # back in order: ranges again, from position 0
    engine.cells = shifted.cells
    result = store.save(SESSION, "chat", record(320), engine.cells, engine, FP)
    assert [(x.start, x.end) for x in result.manifest.chain] == [(0, 256), (256, 320)]
    # the whole block and the first piece [256, 300) are gone; [0, 256) was kept as shareable
    assert len(list((tmp_path / "blocks").rglob("*.kvb"))) == 2


def _save_turns(root: Path, name: str, seed: int) -> None:
    store = KvStore(root, block_tokens=64)
    engine = FakeKvEngine()
    engine.eval(words(200))  # the start both conversations share
    for turn in range(15):
        engine.eval(words(23, seed=seed * 100 + turn))
        save(store, name, engine)
    os._exit(0)


def _evict_often(root: Path) -> None:
    store = KvStore(root, block_tokens=64)
    for _ in range(40):
        store.evict(10**12)
        store._collect({"0" * 64})
    os._exit(0)


def test_processes_saving_and_collecting_at_once_leave_whole_conversations(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_save_turns, args=(tmp_path, "a", 1)),
             ctx.Process(target=_save_turns, args=(tmp_path, "b", 2)),
             ctx.Process(target=_evict_often, args=(tmp_path,))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = KvStore(tmp_path, block_tokens=64)
    for name in ("a", "b"):
        engine, n = restored(store, name)
        assert n == 200 + 15 * 23
    assert store.usage().unreferenced == 0  # every turn piece replaced was collected


def test_the_default_budget_is_a_share_of_the_disk(tmp_path: Path) -> None:
    store = KvStore(tmp_path / "store")
    budget = effective_budget(None, store)
    assert 0 < budget <= shutil.disk_usage(tmp_path).free
    assert effective_budget(1000, store) == 1000


def test_prefix_cache_segments_share_the_one_budget_least_recently_used_first(tmp_path: Path) -> None:
    from kvchat.prefix_cache import Fingerprint, PrefixCache

    store = KvStore(tmp_path)
    named = _fill(store, "keep", SESSION, 512, seed=1)
    _fill(store, "auto", RECENT, 512, seed=2)
    dropped = _fill(store, "dropped", RECENT, 512, seed=3)
    store.remove(RECENT, "dropped")  # its aligned blocks stay, named by nobody
    unused = [store.block_path(k) for k in kv_files.block_keys(FP, dropped.cells, [(0, 256), (256, 512)])]
    fp = Fingerprint("ab" * 32, "model.gguf", "f16", "f16", "off", False, 0, 512, 512, "0")
    budget = [10**12]
    pc = PrefixCache(fp, store=store.prefix, min_tokens=32, block_tokens=64,
                     evict=lambda: store.evict(budget[0], wait=False))
    pc.prefill(FakeKvEngine(), words(200, seed=5), ())
    pc.commit()
    segments = store.prefix.read_index()
    assert len(segments) >= 2
    usage = store.usage()
    assert usage.prefix == sum(e.bytes for e in segments.values()) > 0
    # Its segments are blocks of the store: counted once, with the blocks.
    assert usage.total == usage.blocks + usage.manifests and usage.prefix <= usage.blocks

    with store._lock(exclusive=False):  # a save in progress: the cache's eviction never waits on it
        started = time.monotonic()
        assert store.evict(1, wait=False).freed == 0 and time.monotonic() - started < 1.0
    assert store.usage().total == usage.total

    now = time.time()
    os.utime(unused[0], (now - 100, now - 100))  # least recently used of all
    os.utime(unused[1], (now - 10, now - 10))  # more recently used than any segment

    def age(entries: dict[str, Any]) -> None:
        for e in entries.values():
            e.last_used = now - (50 if e.start == 0 else 40)

    assert store.prefix.update(age)
    report = store.evict(store.usage().total - 1)
    assert report.blocks_removed == 1 and not unused[0].exists() and unused[1].exists()
    assert set(store.prefix.read_index()) == set(segments)
    report = store.evict(store.usage().total - 1)  # the oldest segment: the chain's root, and all after it
    assert store.prefix.read_index() == {} and unused[1].exists() and report.recent_removed == []
    assert not any(store.block_path(e.block).exists() for e in segments.values())
    report = store.evict(store.usage().total - 1)
    assert not unused[1].exists() and report.recent_removed == []

    # The prefix cache's own store evicts through the one budget: with no room left, what
    # it stored goes again (the cache before recent chats), never past the budget.
    before = store.usage().total
    budget[0] = before
    pc = PrefixCache(fp, store=store.prefix, min_tokens=32, block_tokens=64,
                     evict=lambda: store.evict(budget[0], wait=False))
    pc.prefill(FakeKvEngine(), words(200, seed=6), ())
    pc.commit()
    assert store.usage().total <= before and store.manifest_names(RECENT) == ["auto"]
    assert store.prefix.read_index() == {}
    budget[0] = before + 10**6  # room: the entries stay
    pc = PrefixCache(fp, store=store.prefix, min_tokens=32, block_tokens=64,
                     evict=lambda: store.evict(budget[0], wait=False))
    pc.prefill(FakeKvEngine(), words(200, seed=6), ())
    pc.commit()
    assert store.prefix.read_index() and before < store.usage().total <= budget[0]
    assert restored(store, "keep")[0].cells == named.cells


def test_block_keys_with_a_memo_equal_the_keys_hashed_from_the_start() -> None:
    """A save resumes the token prefix's hash where the last one stopped; after an undo,
    an edit or another fingerprint it must hash from the start again."""
    from kvchat.kv_files import PrefixHash, block_keys

    memo = PrefixHash()
    history = list(range(1000))
    edited = history[:300] + [7] * 500
    for fp, tokens, spans in ((b"a", history, [(0, 256), (256, 512)]), (b"a", history, [(512, 700)]),
                              (b"a", history, [(700, 1000)]), (b"a", edited, [(300, 512), (512, 800)]),
                              (b"b", edited, [(512, 800)]), (b"b", edited, [(0, 800)]),
                              (b"b", history[:200], [(100, 200)])):
        assert block_keys(fp, tokens, spans, memo=memo) == block_keys(fp, tokens, spans)


def test_the_keeper_passes_over_the_store_only_when_its_writes_may_have_filled_it(tmp_path: Path) -> None:
    """A chat's saves do not each read every manifest and list every block: a full
    eviction pass runs at the first save and then only once the headroom it left is
    used up; the store stays under its budget all the same."""
    from kvchat.kv_evict import Keeper

    store = KvStore(tmp_path)
    _fill(store, "keep", SESSION, 256, seed=1)
    per_token = store.usage().total / 256
    _fill(store, "auto-0", RECENT, 512, seed=3)  # an older recent chat: evicted first
    budget = int(store.usage().total + 700 * per_token)
    keeper = Keeper(store, budget)
    engine = FakeKvEngine()
    cells = words(1024, seed=2)
    turns = 0
    for end in range(64, 1025, 64):  # one chat's turns, 1,024 tokens in all: over the budget on the way
        engine.eval(cells[end - 64:end])
        keeper.wrote(save(store, "auto-1", engine, RECENT))
        turns += 1
        assert store.usage().total <= budget
    assert store.manifest_names(RECENT) == ["auto-1"]  # the older chat made room
    assert 2 <= keeper.passes <= turns // 2  # the first save's, then only when the headroom ran out
