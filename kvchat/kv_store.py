"""One content-addressed store for the KV cells kvchat keeps on disk.

A *block* holds the cells of tokens [start, end) as llama.cpp serialises a
sequence state (kvchat.kv_state: a range of cells is a valid state of its own,
and consecutive ranges join into the state one evaluation would have written).
Its key is the SHA-256 of the fingerprint of everything that changes the KV
bytes (model hash, cache types, flash attention, ...), the token ids 0..end and
the span itself, so a block is stored once however many conversations share it.

A *manifest* is a conversation on disk: its record, all its tokens, the chain of
blocks that covers positions [0, n) and an opaque extra blob (checkpoints). It is
a log (kvchat.manifest_log): a turn's save writes the blocks not yet present and
appends to the manifest what the turn changed, never the history again.

How a save cuts the tokens not yet covered by the previous manifest's chain
(e .. n): at every multiple of BLOCK_TOKENS. The spans in between are aligned
blocks, the same for every conversation that holds those tokens; the pieces at
either end are the turn's own. A span filled over several turns stays in its
turn pieces: writing it again as one aligned block would cost the bytes this
store exists to save. So the bytes a turn writes are its new cells plus one
header per block (at most new / BLOCK_TOKENS + 2 of them) and the manifest's new
frame: the turn's tokens, links and transcript (the manifest holds every token,
so that a damaged block's tokens can still be evaluated again; it is written
whole again only when its log has doubled).

Models whose state cannot be cut by position (a sliding window without
swa_full, recurrent or hybrid memory: `can_save_ranges` false) are saved as one
*whole* block per save, bounded by the window or the recurrent state; the
previous one is deleted once no manifest names it.

Durability: every file is written to a temp file, fsynced, renamed and its
folder fsynced; a manifest is written only after every block it names, so a
SIGKILL at any moment leaves the previous manifest and all its blocks whole.
Saves hold `store.lock` shared; collection (deleting blocks) holds it
exclusively, so a block a save is about to name is never deleted under it.

A save first extends the chain it keeps with blocks already on disk that continue
it exactly from its end (same fingerprint, same tokens: the key says so): the
prefix cache's segments of a plain KV model are such blocks (kvchat.prefix_store),
and so are other conversations' aligned blocks. They cost no bytes and no engine
read, so a session started from a cached prompt shares the cache's cells.

Eviction and usage (one disk budget for conversations and the prefix cache, a
block counted once however many name it): kvchat.kv_evict.

Layout under `<data dir>/kv-store/` (file formats: kvchat.kv_files):
    blocks/<2 hex>/<key>.kvb       one block
    manifests/<kind>/<name>.kvm    one conversation (kind: session or recent)
    prefix/index.json              the prefix cache's index (its segments are blocks)
    store.lock
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvchat import config, kv_evict, kv_files, kv_state, manifest_log, prefix_store
from kvchat.atomic_file import flocked
from kvchat.errors import KvchatError, SessionError
from kvchat.kv_evict import MAX_DISK_FRACTION, EvictionReport, Usage, effective_budget
from kvchat.kv_files import (
    BLOCK_SUFFIX,
    RANGE,
    RECENT,
    SESSION,
    STORE_LOCK,
    WHOLE,
    BlockError,
    Link,
    Manifest,
    block_keys,
)
from kvchat.sequences import common_prefix

# Names the rest of kvchat and the tests take from here.
__all__ = ["BLOCK_SUFFIX", "BLOCK_TOKENS", "KINDS", "MAX_DISK_FRACTION", "RECENT", "SESSION", "Damage",
           "EvictionReport", "KvStore", "Manifest", "PendingSave", "RangeSink", "RangeSource", "Restored",
           "SaveResult", "Usage", "cut_spans", "effective_budget", "store_dir"]

MANIFEST_SUFFIX = ".kvm"
LOCK_NAME = STORE_LOCK
# Spans aligned to multiples of this are the blocks conversations share.
BLOCK_TOKENS = 256
KINDS = (SESSION, RECENT)
# Resume joins consecutive blocks up to this many bytes before handing them to
# the engine: fewer calls into llama.cpp, memory still bounded.
_GROUP_BYTES = 32 * 1024 * 1024
_LOCK_TIMEOUT_S = 3.0


class RangeSource(Protocol):
    """What a save reads from an engine (kvchat.engine.Engine has it)."""

    @property
    def can_save_ranges(self) -> bool: ...

    def state_range_bytes(self, start: int, end: int) -> bytes | bytearray: ...
    def state_bytes(self) -> bytes: ...


class RangeSink(Protocol):
    """What a resume writes into an engine."""

    def kv_clear(self) -> None: ...
    def load_state_range(self, data: bytes, start: int, end: int) -> None: ...
    def load_state_bytes(self, data: bytes, n_tokens: int) -> None: ...


def store_dir() -> Path:
    return config.paths().data_dir / "kv-store"


def cut_spans(start: int, end: int, block_tokens: int = BLOCK_TOKENS) -> list[tuple[int, int]]:
    """[start, end) cut at every multiple of block_tokens."""
    points = [start, *range((start // block_tokens + 1) * block_tokens, end, block_tokens), end]
    return [(a, b) for a, b in zip(points, points[1:], strict=False) if a < b]


@dataclass
class SaveResult:
    bytes_written: int  # blocks and manifest, headers included
    blocks_written: int
    blocks_shared: int  # named by the manifest, already present
    manifest: Manifest


@dataclass
class PendingSave:
    """A save whose engine reads are done (KvStore.prepare) and whose files are not
    yet written (KvStore.commit)."""

    kind: str
    name: str
    fingerprint: str  # hex digest
    record: dict[str, Any]
    tokens: list[int]
    extra: bytes
    previous: Manifest | None
    created: float
    delta: dict[str, Any]  # the record's, from previous.record ({} without a previous)
    delta_json: bytes  # encoded when prepared: the record may share lists with a live conversation
    kept_tokens: int  # of `tokens`, the leading ones previous.tokens holds too
    kept: list[Link] = field(default_factory=list)  # blocks already on disk, built on
    kept_from: Manifest | None = None  # the manifest whose chain `kept` starts with
    own: int = 0  # of `kept`, the links from kept_from's chain
    found: int = 0  # of them, blocks that continued the kept chain (shared, not read)
    new: list[tuple[Link, bytes | bytearray]] = field(default_factory=list)  # cells read

    @property
    def new_bytes(self) -> int:
        return sum(len(state) for _, state in self.new)


@dataclass
class Damage:
    """A block a resume could not use, and what that cost."""

    key: str
    start: int  # the first position lost: tokens from here on are evaluated again
    reason: str
    affected: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) naming the block


@dataclass
class Restored:
    n_tokens: int  # positions now in the engine; the caller evaluates tokens[n_tokens:]
    damage: Damage | None = None


# -- the store ------------------------------------------------------------------------------


class KvStore:
    """Blocks and manifests in one folder, shared safely between processes."""

    def __init__(self, root: Path | None = None, *, block_tokens: int = BLOCK_TOKENS) -> None:
        self.root = root or store_dir()
        self.prefix = prefix_store.Store(self.root, collect=self._collect)
        self.block_tokens = block_tokens
        self._root = str(self.root)
        self._hashed = kv_files.PrefixHash()  # the token prefix hashed at the last save
        self.bytes_written = 0  # over the store object's life: what the tests measure

    # -- paths ------------------------------------------------------------------------

    def block_path(self, key: str) -> Path:
        return kv_files.block_path(self.root, key)

    def has_block(self, key: str) -> bool:
        """Whether the block `key` is on disk. A save asks this of every block its
        chain keeps (history / 256 of them): one stat of a path built as a string,
        not through pathlib (3 us a block instead of 50; at 16k tokens, milliseconds)."""
        return os.path.isfile(kv_files.block_file(self._root, key))

    def manifest_path(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown manifest kind {kind!r}")
        return self.root / "manifests" / kind / f"{name}{MANIFEST_SUFFIX}"

    # -- locking ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, exclusive: bool, *, wait: bool = True, within: float = _LOCK_TIMEOUT_S) -> Iterator[bool]:
        """Saves share the lock; collection takes it alone. Without `wait`, yields
        False when it is not free `within` seconds (collection tries again later)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with flocked(self.root / LOCK_NAME, exclusive=exclusive, within=None if wait else within) as held:
            yield held

    # -- blocks -------------------------------------------------------------------------

    def write_block(self, link: Link, fingerprint: str, tokens: Sequence[int],
                    state: bytes | bytearray) -> int:
        n = kv_files.write_block(self.block_path(link.key), link, fingerprint, tokens, state)
        self.bytes_written += n
        return n

    def read_block(self, link: Link, tokens: Sequence[int], fingerprint: str | None = None) -> bytes:
        """A block's verified state (tokens: the conversation's; `fingerprint`: the hex
        digest it must have been written under); marks it used."""
        return kv_files.read_block(self.block_path(link.key), link, tokens, fingerprint)

    # -- manifests ----------------------------------------------------------------------

    def read_manifest(self, kind: str, name: str) -> Manifest:
        return manifest_log.read(self.manifest_path(kind, name), kind, name)

    def manifest_names(self, kind: str) -> list[str]:
        folder = self.root / "manifests" / kind
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob(f"*{MANIFEST_SUFFIX}") if p.is_file())

    def _refs(self) -> tuple[dict[tuple[str, str], tuple[float, list[Link]]], list[tuple[str, str]]]:
        """Every manifest's chain and update time, verified; unreadable ones apart."""
        refs: dict[tuple[str, str], tuple[float, list[Link]]] = {}
        damaged = []
        for kind in KINDS:
            for name in self.manifest_names(kind):
                try:
                    m = self.read_manifest(kind, name)
                except SessionError:
                    damaged.append((kind, name))
                    continue
                refs[(kind, name)] = (m.updated, m.chain)
        return refs, damaged

    # -- save and resume ----------------------------------------------------------------

    def save(self, kind: str, name: str, record: dict[str, Any], tokens: Sequence[int],
             source: RangeSource | None, fingerprint: bytes, *, n_kv: int | None = None,
             extra: bytes = b"", previous: Manifest | None = None,
             base: Manifest | None = None) -> SaveResult:
        """Save a conversation whose engine holds `tokens[:n_kv]` (default: all of
        them), writing only the blocks not already on disk, then its manifest.

        `previous` is the manifest last saved under this name (read from disk when
        not given); blocks only it named are deleted afterwards. `base` (default:
        `previous`) is the chain to build on, kept as far as its tokens agree with
        `tokens`: a copy saved under a new name passes the original's manifest and
        costs one manifest. `source` None: a conversation without KV here (the
        manifest holds its record and tokens only)."""
        return self.commit(self.prepare(kind, name, record, tokens, source, fingerprint, n_kv=n_kv,
                                        extra=extra, previous=previous, base=base))

    def prepare(self, kind: str, name: str, record: dict[str, Any], tokens: Sequence[int],
                source: RangeSource | None, fingerprint: bytes, *, n_kv: int | None = None,
                extra: bytes = b"", previous: Manifest | None = None,
                base: Manifest | None = None) -> PendingSave:
        """The engine's part of a save (see `save`): read the cells not covered by
        the chain kept, and nothing else. It costs the new cells (a whole state where
        ranges cannot be read); `commit` writes them later, from any thread, while the
        engine goes on: what it saves is the state as it was here. The record saved is
        `pending.record`: `record` as JSON gives it back, taken now."""
        fp_hex = fingerprint.hex()
        tokens = list(tokens)
        n = len(tokens) if n_kv is None else n_kv
        if not 0 <= n <= len(tokens):
            raise ValueError(f"n_kv {n} outside the {len(tokens)} tokens")
        path = self.manifest_path(kind, name)
        if previous is None and path.exists():
            with contextlib.suppress(SessionError):
                previous = self.read_manifest(kind, name)
        old = previous.record if previous is not None else {}
        delta = manifest_log.record_delta(old, record)
        delta_json = json.dumps(delta, ensure_ascii=False).encode()
        pending = PendingSave(kind, name, fp_hex, manifest_log.apply_delta(old, json.loads(delta_json)),
                              tokens, extra, previous, previous.created if previous else time.time(),
                              delta, delta_json, common_prefix(previous.tokens, tokens) if previous else 0)
        if source is None or n == 0:
            return pending
        if source.can_save_ranges:
            try:
                pending.kept_from = base or previous
                same = pending.kept_tokens if pending.kept_from is previous else \
                    common_prefix(pending.kept_from.tokens, tokens) if pending.kept_from else 0
                own = self._kept_chain(pending.kept_from, fp_hex, min(same, n))
                pending.own = len(own)
                kept = self._extended(own, fingerprint, tokens, n)
                pending.found = len(kept) - len(own)
                spans = cut_spans(kept[-1].end if kept else 0, n, self.block_tokens)
                keys = block_keys(fingerprint, tokens, spans, memo=self._hashed)
                pending.new = [(Link(key, a, b), source.state_range_bytes(a, b))
                               for (a, b), key in zip(spans, keys, strict=True)]
                pending.kept = kept
                return pending
            except kv_state.StateFormatError:
                # Cells out of position order (a context shift moved them): this save is whole.
                pending.new = []
        # A sliding window or a recurrent state cannot be cut by position: the state
        # is saved whole, bounded by the window or the state's size.
        (key,) = block_keys(fingerprint, tokens, [(0, n)], WHOLE)
        pending.new = [(Link(key, 0, n, WHOLE), source.state_bytes())]
        return pending

    def commit(self, pending: PendingSave) -> SaveResult:
        """Write what `prepare` read: the blocks not on disk, then the manifest (only
        after every block it names), then delete blocks only the previous manifest
        named. A kept block removed meanwhile (eviction of the conversation it was
        shared with) ends the chain there: the tokens after it are evaluated again on
        resume, never restored from the wrong cells."""
        before = self.bytes_written
        written = shared = 0
        p = pending
        with self._lock(exclusive=False):
            chain: list[Link] = []
            present = min(self._present(p.kept_from), p.own)
            for i, link in enumerate(p.kept):
                if i >= present and not self.has_block(link.key):
                    break
                chain.append(link)
            if len(chain) == len(p.kept):
                for link, state in p.new:
                    if self.has_block(link.key):
                        shared += 1
                    else:
                        self.write_block(link, p.fingerprint, p.tokens[link.start:link.end], state)
                        written += 1
                    chain.append(link)
            manifest = Manifest(p.kind, p.name, p.fingerprint, p.record, p.tokens, chain, p.extra,
                                p.created, time.time())
            self.bytes_written += manifest_log.write(self.manifest_path(p.kind, p.name), manifest,
                                                     p.previous, p.delta_json)
        if p.previous is not None:
            dropped = {x.key for x in p.previous.chain} - {x.key for x in chain}
            self._collect({k for k in dropped if not self._cacheable(p.previous, k)})
        return SaveResult(self.bytes_written - before, written, shared + p.found, manifest)

    def _kept_chain(self, previous: Manifest | None, fp_hex: str, same: int) -> list[Link]:
        """The links of `previous`'s chain a save keeps: its range blocks within the
        `same` tokens it has in common with the conversation, as far as they are on disk."""
        if previous is None or previous.fingerprint != fp_hex:
            return []
        kept = []
        for link in previous.chain:
            if link.kind != RANGE or link.end > same or not self.has_block(link.key):
                break
            kept.append(link)
        return kept

    def _present(self, manifest: Manifest | None) -> int:
        """How many leading links of `manifest`'s chain, found on disk by `prepare`, are
        still there at `commit`, known without a stat each: all of them while its file is
        still the log it was read or written as (a block a manifest names is deleted only
        once no manifest names it: kvchat.kv_evict), else none. (A resume that finds one
        damaged meanwhile deletes it whoever names it: this save's manifest then names a
        missing block, which costs a resume what the damage cost, no more.)"""
        log = manifest.log if manifest is not None else None
        if manifest is None or log is None:
            return 0
        try:
            st = os.stat(self.manifest_path(manifest.kind, manifest.name))
        except OSError:
            return 0
        return len(manifest.chain) if (st.st_ino, st.st_size) == (log.inode, log.seen) else 0

    def _extended(self, kept: list[Link], fingerprint: bytes, tokens: list[int], n: int) -> list[Link]:
        """`kept` and then blocks on disk that continue it exactly from its end: the
        prefix cache's range segments starting there, and the aligned span from there
        (another conversation's). The key holds the fingerprint, the tokens up to the
        block's end and the span: an existing file of that key holds those cells."""
        fp_hex = fingerprint.hex()
        ends: dict[int, set[int]] = {}
        for entry in self.prefix.read_index().values():
            if entry.kind == RANGE and entry.fingerprint == fp_hex and entry.end <= n:
                ends.setdefault(entry.start, set()).add(entry.end)
        kept = list(kept)
        at = kept[-1].end if kept else 0
        while at < n:
            aligned = cut_spans(at, n, self.block_tokens)[0][1]
            spans = [(at, end) for end in sorted(ends.get(at, set()) | {aligned})]
            keys = block_keys(fingerprint, tokens, spans, memo=self._hashed)
            found = [Link(key, a, b) for (a, b), key in zip(spans, keys, strict=True)
                     if self.has_block(key)]
            if not found:
                break
            kept.append(found[-1])
            at = found[-1].end
        return kept

    def _cacheable(self, manifest: Manifest, key: str) -> bool:
        """An aligned range block: worth keeping for another conversation (the LRU cache)."""
        link = next(x for x in manifest.chain if x.key == key)
        return link.kind == RANGE and link.start % self.block_tokens == 0 \
            and link.end - link.start == self.block_tokens

    def restore(self, manifest: Manifest, sink: RangeSink, fingerprint: bytes | None = None) -> Restored:
        """Load the manifest's chain into an empty engine, block by block (each read,
        verified against the manifest's own fingerprint and handed over before the next
        is read). A damaged or missing block ends the restore there: it is removed (the
        next save writes it again) and the result says where; the caller evaluates the
        tokens after `n_tokens`. `fingerprint` given: nothing is restored unless the
        manifest was saved under it (a session checks its model and settings instead:
        one saved under an older definition of the digest still restores)."""
        sink.kv_clear()
        if (fingerprint is not None and manifest.fingerprint != fingerprint.hex()) or not manifest.chain:
            return Restored(0)
        fp = manifest.fingerprint
        if manifest.chain[0].kind == WHOLE:
            link = manifest.chain[0]
            try:
                sink.load_state_bytes(self.read_block(link, manifest.tokens, fp), link.end)
            except (BlockError, KvchatError) as exc:
                sink.kv_clear()
                return Restored(0, self._damage(link, exc))
            return Restored(link.end)
        done = 0
        group: list[kv_state.Part] = []
        header = b""
        for link in manifest.chain:
            try:
                state = kv_state.parse(self.read_block(link, manifest.tokens, fp))
                (part,) = state.parts
                if part.positions != tuple(range(link.start, link.end)):
                    raise BlockError(f"block {link.key[:12]} holds other positions")
            except (BlockError, kv_state.StateFormatError, ValueError) as exc:
                return self._flush(sink, header, group, done, self._damage(link, exc))
            header = state.header
            group.append(part)
            if sum(len(p.blob) for p in group) >= _GROUP_BYTES:
                restored = self._flush(sink, header, group, done)
                if restored.damage is not None:
                    return restored
                done, group = restored.n_tokens, []
        return self._flush(sink, header, group, done)

    @staticmethod
    def _flush(sink: RangeSink, header: bytes, group: list[kv_state.Part], done: int,
               damage: Damage | None = None) -> Restored:
        """Join the blocks read since the last flush and load them after `done`."""
        if not group:
            return Restored(done, damage)
        end = done + sum(p.n_cells for p in group)
        try:
            sink.load_state_range(header + kv_state.join([(p, 0, p.n_cells) for p in group]), done, end)
        except KvchatError as exc:  # the engine refused them (a smaller context?): keep what it took
            return Restored(done, Damage("", done, str(exc)))
        return Restored(end, damage)

    def _damage(self, link: Link, exc: Exception) -> Damage:
        """What a bad block costs: a damaged one is removed (the next save that holds
        its tokens writes it again), and every conversation naming it is listed."""
        if isinstance(exc, BlockError):
            with contextlib.suppress(OSError):
                self.block_path(link.key).unlink()
        refs, _ = self._refs()
        affected = sorted(o for o, (_, chain) in refs.items() if any(x.key == link.key for x in chain))
        return Damage(link.key, link.start, str(exc), affected)

    # -- removal, usage, eviction ---------------------------------------------------------

    def remove(self, kind: str, name: str) -> None:
        """Delete a manifest, and the blocks only it named (aligned ones stay as cache)."""
        try:
            manifest = self.read_manifest(kind, name)
        except SessionError:
            manifest = None
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(kind, name).unlink()
        if manifest is not None:
            self._collect({x.key for x in manifest.chain if not self._cacheable(manifest, x.key)})

    def _collect(self, keys: set[str]) -> None:
        """Delete those of `keys` no manifest and no prefix-cache entry names (under the
        exclusive lock)."""
        if not keys:
            return
        with self._lock(exclusive=True, wait=False) as got:
            if not got:
                return  # a save is running: eviction collects them later
            refs, _ = self._refs()
            named = {x.key for _, chain in refs.values() for x in chain}
            named |= {e.block for e in self.prefix.read_index().values()}
            for key in keys - named:
                with contextlib.suppress(OSError):
                    self.block_path(key).unlink()

    def _manifest_size(self, kind: str, name: str) -> int:
        try:
            return self.manifest_path(kind, name).stat().st_size
        except OSError:
            return 0

    def usage(self) -> Usage:
        """Bytes on disk, every block once; who owns and who shares what (kvchat.kv_evict)."""
        return kv_evict.usage(self)

    def evict(self, budget: int, *, wait: bool = True, cache_only: bool = False) -> EvictionReport:
        """Bring the store under `budget` bytes: blocks nothing names and prefix-cache entries
        (least recently used first; an entry's block stays while a manifest names it), then
        recent chats (oldest first; not with `cache_only`). Named sessions stay. Without
        `wait` (the prefix cache never holds an answer) a busy store is left."""
        return kv_evict.evict(self, budget, wait=wait, cache_only=cache_only)
