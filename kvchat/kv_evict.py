"""What the KV store holds and how it stays under its one budget (kvchat.kv_store
uses these for `KvStore.usage` and `KvStore.evict`).

Who names a block: conversations' manifests, and the prefix cache's index
(kvchat.prefix_store). A block is counted once however many name it; it is
*shared* when more than one does (a session forked from a cached prompt shares
the cache's blocks), and *unreferenced* when none does.

Eviction, least recently used first: unreferenced blocks (last use: the file's
mtime) and prefix-cache entries (last use in its index; an entry goes with its
descendants, useless without it). An entry leaving the index frees its block only
when no manifest names it: the cache never takes a session's cells. Then recent
chats, oldest first. Named sessions are never evicted; when they alone exceed the
budget, the report says so.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kvchat.kv_files import BLOCK_SUFFIX, RECENT, SESSION, Link, group_of
from kvchat.prefix_store import IndexEntry, Store, with_descendants


class KvStore(Protocol):
    """What usage and eviction read and delete in the KV store (kvchat.kv_store.KvStore,
    which calls them with itself: a protocol, so that this module needs no import of it)."""

    root: Path
    prefix: Store

    def block_path(self, key: str) -> Path: ...
    def manifest_path(self, kind: str, name: str) -> Path: ...
    def usage(self) -> Usage: ...
    def _lock(self, exclusive: bool, *, wait: bool = ...,
              within: float = ...) -> AbstractContextManager[bool]: ...
    def _refs(self) -> tuple[dict[tuple[str, str], tuple[float, list[Link]]], list[tuple[str, str]]]: ...
    def _manifest_size(self, kind: str, name: str) -> int: ...


# The default budget is at most this share of (free disk + the store's own size).
MAX_DISK_FRACTION = 0.5
_STALE_TEMP_S = 120.0
# The prefix cache's pseudo-owner of the blocks its index names.
PREFIX_OWNER = ("prefix", "")


@dataclass
class Usage:
    total: int = 0  # every block once, and the manifests
    blocks: int = 0
    manifests: int = 0
    unreferenced: int = 0  # blocks nothing names (the evictable cache)
    prefix: int = 0  # blocks the prefix cache's index names (some a conversation's too)
    by_kind: dict[str, int] = field(default_factory=dict)  # bytes of blocks each kind (group_of) names
    own: dict[tuple[str, str], int] = field(default_factory=dict)  # only this manifest names them
    shared: dict[tuple[str, str], int] = field(default_factory=dict)  # others (or the cache) name them too
    damaged: list[tuple[str, str]] = field(default_factory=list)  # manifests that cannot be read


@dataclass
class EvictionReport:
    budget: int
    used: int  # after eviction
    freed: int = 0
    blocks_removed: int = 0
    recent_removed: list[str] = field(default_factory=list)
    named_bytes: int = 0  # what named sessions need, never evicted

    @property
    def over_budget(self) -> bool:
        return self.used > self.budget

    def warning(self) -> str | None:
        """A line for the user when named sessions alone do not fit the budget."""
        if not self.over_budget:
            return None
        return (f"named sessions take {self.named_bytes} bytes of KV, over the store's budget of "
                f"{self.budget} bytes")


def blocks_on_disk(root: Path) -> dict[str, tuple[int, float]]:
    """Every block file: key -> (size, last use); stale temp files are removed."""
    out: dict[str, tuple[int, float]] = {}
    folder = root / "blocks"
    if not folder.is_dir():
        return out
    now = time.time()
    for sub in folder.iterdir():
        for path in sub.iterdir() if sub.is_dir() else ():
            try:
                st = path.stat()
            except OSError:
                continue
            if path.name.endswith(".tmp"):
                if now - st.st_mtime > _STALE_TEMP_S:
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            if path.suffix == BLOCK_SUFFIX:
                out[path.stem] = (st.st_size, st.st_mtime)
    return out


def _users(refs: dict[tuple[str, str], tuple[float, list[Link]]],
           segments: dict[str, IndexEntry]) -> dict[str, set[tuple[str, str]]]:
    """Block key -> who names it: manifests, and PREFIX_OWNER for the cache's index."""
    users: dict[str, set[tuple[str, str]]] = {}
    for owner, (_, chain) in refs.items():
        for link in chain:
            users.setdefault(link.key, set()).add(owner)
    for entry in segments.values():
        users.setdefault(entry.block, set()).add(PREFIX_OWNER)
    return users


def usage(store: KvStore) -> Usage:
    refs, damaged = store._refs()
    blocks = blocks_on_disk(store.root)
    segments = store.prefix.read_index()
    users = _users(refs, segments)
    u = Usage(damaged=damaged)
    u.blocks = sum(size for size, _ in blocks.values())
    u.manifests = sum(store._manifest_size(*owner) for owner in [*refs, *damaged])
    u.total = u.blocks + u.manifests
    u.unreferenced = sum(size for key, (size, _) in blocks.items() if key not in users)
    u.prefix = sum(blocks.get(e.block, (0, 0.0))[0] for e in {e.block: e for e in segments.values()}.values())
    for owner in refs:
        u.own[owner] = store._manifest_size(*owner)
        u.shared[owner] = 0
    for key, owners in users.items():
        size = blocks.get(key, (0, 0.0))[0]
        for owner in owners - {PREFIX_OWNER}:
            if len(owners) == 1:
                u.own[owner] += size
            else:
                u.shared[owner] += size
        for kind in {group_of(*owner) for owner in owners - {PREFIX_OWNER}}:
            u.by_kind[kind] = u.by_kind.get(kind, 0) + size
    return u


def evict(store: KvStore, budget: int, *, wait: bool = True, cache_only: bool = False) -> EvictionReport:
    """See KvStore.evict."""
    with store._lock(exclusive=True, wait=wait, within=0.0) as got:
        if not got:
            return EvictionReport(budget, 0)
        if store.prefix.index_path.exists():  # broken chains leave the index; blocks below
            store.prefix.repair()
        refs, damaged = store._refs()
        blocks = blocks_on_disk(store.root)
        segments = store.prefix.read_index()
        users = _users(refs, segments)
        used = sum(s for s, _ in blocks.values()) + sum(store._manifest_size(*o) for o in [*refs, *damaged])
        report = EvictionReport(budget, used)
        free = sorted([(mtime, key, False) for key, (_, mtime) in blocks.items() if key not in users]
                      + [(e.last_used, e.key, True) for e in segments.values()])
        recent = [] if cache_only else sorted((updated, owner) for owner, (updated, _) in refs.items()
                                              if owner[0] == RECENT)
        doomed: set[str] = set()  # index entries, removed together under its lock
        freed_blocks: set[str] = set()  # their blocks nothing else names
        while report.used > budget and free:
            _, key, segment = free.pop(0)
            if not segment:
                _unlink(store, key, blocks[key][0], report)
            elif key not in doomed:
                # A segment's descendants are useless without it: they go with it.
                doomed |= with_descendants(segments, {key}) - doomed
                left = {segments[k].block for k in segments if k not in doomed}
                for block in {segments[k].block for k in doomed} - left - freed_blocks:
                    if users.get(block, set()) <= {PREFIX_OWNER} and block in blocks:
                        freed_blocks.add(block)
                        size = blocks[block][0]
                        report.used, report.freed = report.used - size, report.freed + size
        if doomed:
            if store.prefix.drop_entries(doomed) is None:  # its index busy: nothing freed now
                size = sum(blocks[b][0] for b in freed_blocks)
                report.used, report.freed = report.used + size, report.freed - size
            else:
                for block in freed_blocks:
                    with contextlib.suppress(OSError):
                        store.block_path(block).unlink()
                    report.blocks_removed += 1
                for block in {segments[k].block for k in doomed}:
                    users.get(block, set()).discard(PREFIX_OWNER)
        while report.used > budget and recent:
            _, owner = recent.pop(0)
            report.used, report.freed = report.used - (m := store._manifest_size(*owner)), report.freed + m
            with contextlib.suppress(OSError):
                store.manifest_path(*owner).unlink()
            report.recent_removed.append(owner[1])
            for link in refs[owner][1]:
                owners = users.get(link.key)
                if owners is None or link.key not in blocks:
                    continue
                owners.discard(owner)
                if not owners:
                    del users[link.key]
                    _unlink(store, link.key, blocks[link.key][0], report)
        named = [k for k, owners in users.items()
                 if k in blocks and any(kind == SESSION for kind, _ in owners)]
        report.named_bytes = sum(blocks[k][0] for k in named)
        report.named_bytes += sum(store._manifest_size(*o) for o in refs if o[0] == SESSION)
    return report


def _unlink(store: KvStore, key: str, size: int, report: EvictionReport) -> None:
    with contextlib.suppress(OSError):
        store.block_path(key).unlink()
    report.used, report.freed, report.blocks_removed = report.used - size, report.freed + size, \
        report.blocks_removed + 1


def effective_budget(configured: int | None, store: KvStore) -> int:
    """The configured budget (None: no setting), capped to MAX_DISK_FRACTION of (free
    disk + what the store already holds)."""
    probe = store.root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    used = store.usage().total if store.root.is_dir() else 0
    cap = int((free + used) * MAX_DISK_FRACTION)
    return cap if configured is None else min(configured, cap)


class Keeper:
    """Keeps a store under its budget as one process writes to it, without a full
    eviction pass (every manifest read, every block listed: the size of the whole
    store) at every save: a pass runs at the first write and again only once this
    process's writes since have used up the headroom the last pass left. Another
    process's writes are counted by that process: together they can overshoot the
    budget by what the others wrote since this one's last pass, until the next pass."""

    def __init__(self, store: KvStore, configured: int | None) -> None:
        self.store = store
        self.configured = configured
        self.headroom: int | None = None  # None: no pass yet
        self.passes = 0

    def wrote(self, n_bytes: int) -> EvictionReport | None:
        """After a save that wrote `n_bytes`: the report of the pass it took (None: no
        pass was needed)."""
        if self.headroom is not None and n_bytes < self.headroom:
            self.headroom -= n_bytes
            return None
        report = evict(self.store, effective_budget(self.configured, self.store))
        self.passes += 1
        self.headroom = max(report.budget - report.used, 0)
        return report

