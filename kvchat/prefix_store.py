"""The prefix cache's files: its segments are KV store blocks (kvchat.kv_files, under
`<store>/blocks/`), its index (`<store>/prefix/index.json`, changed only under an
exclusive `flock` taken with a timeout) says which prompt start each one ends and
when it was last used; see kvchat.prefix_cache for what they hold and why.

A segment of a plain KV model is a "range" block: byte for byte the block a session
save writes for the same span of the same tokens (the same key), so a session that
starts with a cached prompt names the cache's blocks instead of writing its own
(kvchat.kv_store.KvStore.prepare), and the cache's blocks a manifest names are never
deleted by the cache (only dropped from its index). A sliding-window model's
segment holds its window part too: a "parts" block, the cache's alone.

Anything on disk that cannot be read as written is dropped, never trusted; a
damaged index is rebuilt from the blocks (their tokens chain back to position 0).
Segment files of the cache before it used blocks (`*.kvp`, index format 1) are
removed on first use: it is a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvchat import config, kv_files
from kvchat.atomic_file import atomic_write, flocked
from kvchat.errors import KvchatError
from kvchat.kv_files import RANGE, BlockError, Link, block_keys, token_bytes

FORMAT_VERSION = 2
INDEX_NAME = "index.json"
LOCK_NAME = "index.lock"
PREFIX_DIR = "prefix"
# The block kinds of a segment of a sliding-window model (not shareable): with the
# window part, and without it (only a parent of others).
PARTS, PARTS_BARE = "parts", "parts-bare"
LEGACY_SUFFIX = ".kvp"
_LOCK_TIMEOUT_S = 3.0
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_STATE_HEADER = 8  # magic and sequence id (kvchat.kv_state)
# A part of a segment: the segment's own cells of a complete KV cache, the whole
# (window) cache at the segment's end, or nothing (a window not kept there).
PART_DELTA, PART_WHOLE, PART_NONE = 0, 1, 2

__all__ = ["FORMAT_VERSION", "INDEX_NAME", "LEGACY_SUFFIX", "LOCK_NAME", "PARTS", "PARTS_BARE", "PART_DELTA",
           "PART_NONE", "PART_WHOLE", "EntryError", "IndexEntry", "Segment", "Store", "prefix_keys",
           "token_bytes", "with_descendants"]


def store_root() -> Path:
    return config.paths().data_dir / "kv-store"


def prefix_keys(fp_digest: bytes, tokens: Sequence[int]) -> list[str]:
    """keys[i] names the prefix tokens[:i] (keys[0] is the empty prefix)."""
    sha = hashlib.sha256(fp_digest)
    keys = [sha.hexdigest()]
    for token in tokens:
        sha.update(token_bytes([token]))
        keys.append(sha.copy().hexdigest())
    return keys


@dataclass
class Segment:
    """One entry: the cells of tokens [start, end) and the parts of the state there."""

    key: str  # the prefix it ends: prefix_keys(...)[end]
    parent: str  # the prefix it continues: prefix_keys(...)[start]
    start: int
    end: int
    tokens: list[int]
    parts: list[tuple[int, bytes]]  # (PART_DELTA, PART_WHOLE or PART_NONE, part bytes)
    state_header: bytes
    block: str = ""  # its block's key
    kind: str = RANGE  # its block's kind: RANGE, or PARTS with a window part

    @property
    def resumable(self) -> bool:
        return all(kind != PART_NONE for kind, _ in self.parts)

    def payload(self) -> bytes:
        """The block's state: a range block holds exactly what a session's range read
        gives (the state header, then the cut part); a parts block lists its parts."""
        if self.kind == RANGE:
            ((_, data),) = self.parts
            return self.state_header + data
        out = [self.state_header, _U32.pack(len(self.parts))]
        for kind, data in self.parts:
            out += [_U32.pack(kind), _U64.pack(len(data)), data]
        return b"".join(out)


def _parts(kind: str, state: bytes) -> list[tuple[int, bytes]]:
    if len(state) < _STATE_HEADER:
        raise EntryError("a segment without a state")
    if kind == RANGE:
        return [(PART_DELTA, state[_STATE_HEADER:])]
    view, at, parts = memoryview(state), _STATE_HEADER + 4, []
    try:
        for _ in range(_U32.unpack(view[_STATE_HEADER:at])[0]):
            part_kind, (n,) = _U32.unpack(view[at : at + 4])[0], _U64.unpack(view[at + 4 : at + 12])
            parts.append((part_kind, bytes(view[at + 12 : at + 12 + n])))
            at += 12 + n
    except struct.error:
        raise EntryError("an inconsistent segment") from None
    if at != len(view) or any(k not in (PART_DELTA, PART_WHOLE, PART_NONE) for k, _ in parts):
        raise EntryError("an inconsistent segment")
    return parts


class EntryError(KvchatError):
    """An entry that is damaged, foreign or gone: it is dropped, never used."""

    damaged = True  # False: its block is gone (evicted meanwhile), nothing to delete


class MissingBlock(EntryError):
    damaged = False


@dataclass
class IndexEntry:
    key: str
    parent: str
    start: int
    end: int
    fingerprint: str
    model: str
    bytes: int  # its block file's size
    created: float
    last_used: float
    hits: int = 0
    resumable: bool = True  # False: only a parent of others (a window was not kept)
    block: str = ""
    kind: str = RANGE


class Store:
    """The prefix cache's index in the KV store at `root`, and its blocks there,
    shared safely between processes."""

    def __init__(self, root: Path | None = None, *,
                 collect: Callable[[set[str]], None] | None = None) -> None:
        """`collect` deletes those of the given blocks that nothing names any more (the
        KV store passes its own, kvchat.kv_store.KvStore.prefix); without it, blocks
        this store lets go of wait for the store's next eviction."""
        self.root = root or store_root()
        self.folder = self.root / PREFIX_DIR
        self._collect_blocks = collect

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_NAME

    def block_path(self, key: str) -> Path:
        return kv_files.block_path(self.root, key)

    # -- segments ---------------------------------------------------------------------

    def write_segment(self, segment: Segment, fingerprint: str) -> int:
        link = Link(segment.block, segment.start, segment.end, segment.kind)
        return kv_files.write_block(self.block_path(segment.block), link, fingerprint, segment.tokens,
                                    segment.payload())

    def read_segment(self, entry: IndexEntry, tokens: Sequence[int]) -> Segment:
        """The entry's segment, verified (its block's checksum, key, span, tokens and
        fingerprint, and first the file's size against the index's)."""
        path = self.block_path(entry.block)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise MissingBlock(f"{path.name}: {exc.strerror or exc}") from None
        try:
            if size != entry.bytes:
                raise EntryError(f"{path.name} is not the size its index records")
            state = kv_files.read_block(path, Link(entry.block, entry.start, entry.end, entry.kind),
                                        tokens, entry.fingerprint)
        except (BlockError, OSError) as exc:
            raise EntryError(str(exc)) from None
        return Segment(entry.key, entry.parent, entry.start, entry.end, list(tokens[entry.start : entry.end]),
                       _parts(entry.kind, state), state[:_STATE_HEADER], entry.block, entry.kind)

    # -- the index ----------------------------------------------------------------------

    def read_index(self) -> dict[str, IndexEntry]:
        """The index as last written; rebuilt from the blocks if damaged (any shape of
        JSON, wrong types, a folder in its place, unreadable); empty if there is none."""
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
            if raw.get("format_version") != FORMAT_VERSION:
                if raw.get("format_version") == 1:  # the cache before it used blocks: the
                    self._drop_legacy()  # next update writes this format over it
                raise ValueError("format")
            entries = {k: IndexEntry(**v) for k, v in raw["entries"].items()}
            if not all(isinstance(k, str) and _well_typed(e) for k, e in entries.items()):
                raise TypeError("entry fields")
            return entries
        except FileNotFoundError:
            self._drop_legacy()
            return {}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError):
            return self._scan()

    def _drop_legacy(self) -> None:
        """Remove what the cache kept before its segments were store blocks: `.kvp`
        files and their index here, and its folder from before it joined the store."""
        legacy = [*self.folder.glob(f"*{LEGACY_SUFFIX}")] if self.folder.is_dir() else []
        for path in legacy:
            with contextlib.suppress(OSError):
                path.unlink()
        if self.root == store_root():
            shutil.rmtree(config.paths().data_dir / "prefix-cache", ignore_errors=True)

    def _scan(self) -> dict[str, IndexEntry]:
        """Entries for every chain of range or parts blocks that starts at position 0
        (a session's blocks included: they are valid cells of those tokens)."""
        heads: dict[tuple[str, int], list[kv_files.BlockHead]] = {}
        folder = self.root / "blocks"
        for path in folder.glob(f"*/*{kv_files.BLOCK_SUFFIX}") if folder.is_dir() else ():
            with contextlib.suppress(BlockError, OSError):
                head = kv_files.read_block_head(path)
                if head.kind in (RANGE, PARTS, PARTS_BARE) and path.stem == head.key:
                    heads.setdefault((head.fingerprint, head.start), []).append(head)
        entries: dict[str, IndexEntry] = {}
        todo: list[tuple[str, list[int], str]] = []
        for fp, start in heads:
            with contextlib.suppress(ValueError):  # a fingerprint that is not hex: not ours
                if start == 0:
                    todo.append((fp, [], hashlib.sha256(bytes.fromhex(fp)).hexdigest()))
        while todo:
            fp, before, parent = todo.pop()
            digest = bytes.fromhex(fp)
            for head in heads.get((fp, len(before)), []):
                tokens = before + head.tokens
                if block_keys(digest, tokens, [(head.start, head.end)], head.kind)[0] != head.key:
                    continue  # not the continuation of this prefix
                key = hashlib.sha256(digest + token_bytes(tokens)).hexdigest()  # prefix_keys(...)[-1]
                entries[key] = IndexEntry(key, parent, head.start, head.end, fp, "?", head.size, head.mtime,
                                          head.mtime, resumable=head.kind != PARTS_BARE, block=head.key,
                                          kind=head.kind)
                todo.append((fp, tokens, key))
        return entries

    def _write_index(self, entries: dict[str, IndexEntry]) -> None:
        body = {"format_version": FORMAT_VERSION, "entries": {k: asdict(v) for k, v in entries.items()}}
        atomic_write(self.index_path, [json.dumps(body).encode()])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        """Exclusive index lock; yields False (do nothing) if it is not free within the timeout."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with flocked(self.folder / LOCK_NAME, within=_LOCK_TIMEOUT_S) as held:
            yield held

    @contextlib.contextmanager
    def store_lock(self) -> Iterator[bool]:
        """The KV store's lock, shared (as a save holds it): blocks the cache writes are
        not collected before its index names them. False: not free within the timeout."""
        self.root.mkdir(parents=True, exist_ok=True)
        with flocked(self.root / kv_files.STORE_LOCK, exclusive=False, within=_LOCK_TIMEOUT_S) as held:
            yield held

    def update(self, change: Callable[[dict[str, IndexEntry]], object]) -> bool:
        """Apply `change(entries)` to the index under the lock; False if the lock was busy
        or the index cannot be written (a read-only folder, a folder named index.json):
        the cache is optional, it never stops an answer."""
        try:
            with self._locked() as got:
                if not got:
                    return False
                entries = self.read_index()
                change(entries)
                self._write_index(entries)
                return True
        except OSError:
            return False

    def drop_entries(self, keys: set[str]) -> dict[str, IndexEntry] | None:
        """Remove those entries and their descendants from the index; returns them
        (None if the index was busy). Their blocks stay: see `remove_entries`."""
        dropped: dict[str, IndexEntry] = {}

        def drop(entries: dict[str, IndexEntry]) -> None:
            for key in with_descendants(entries, keys):
                dropped[key] = entries.pop(key)

        return dropped if self.update(drop) else None

    def remove_entries(self, keys: set[str], *, damaged: bool = False) -> bool:
        """Remove those entries and their descendants; their blocks go unless a
        conversation's manifest names them (`damaged`: a block that failed its checks
        goes anyway: a conversation naming it evaluates its tokens again). False if
        the index was busy."""
        dropped = self.drop_entries(keys)
        if dropped is None:
            return False
        if damaged:
            for entry in (e for k, e in dropped.items() if k in keys):
                with contextlib.suppress(OSError):
                    self.block_path(entry.block).unlink()
        self._collect({e.block for e in dropped.values()})
        return True

    def _collect(self, blocks: set[str]) -> None:
        if self._collect_blocks is not None:
            self._collect_blocks(blocks)

    def repair(self) -> dict[str, IndexEntry]:
        """Drop broken chains (an entry whose parent is gone, and all after it);
        returns the entries dropped (their blocks are the caller's to collect)."""
        dropped: dict[str, IndexEntry] = {}

        def fix(entries: dict[str, IndexEntry]) -> None:
            broken = {k for k, e in entries.items() if e.start > 0 and e.parent not in entries}
            for key in with_descendants(entries, broken):
                dropped[key] = entries.pop(key)

        if self.index_path.exists():
            self.update(fix)
        return dropped

    def clear(self) -> int:
        """Remove every entry, and the blocks no conversation names; returns the index's bytes."""
        freed = 0
        dropped: dict[str, IndexEntry] = {}

        def empty(entries: dict[str, IndexEntry]) -> None:
            nonlocal freed
            freed = sum(e.bytes for e in entries.values())
            dropped.update(entries)
            entries.clear()

        if self.index_path.is_dir() and not self.index_path.is_symlink():
            shutil.rmtree(self.index_path, ignore_errors=True)  # repaired: written anew below
        if self.folder.is_dir():
            self.update(empty)
            self._collect({e.block for e in dropped.values()})
        self._drop_legacy()
        return freed

    def used_bytes(self) -> int:
        """The blocks the index names, each once (some may be a conversation's too)."""
        return sum({e.block: e.bytes for e in self.read_index().values()}.values())


def _well_typed(e: IndexEntry) -> bool:
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return (all(isinstance(v, str) for v in (e.key, e.parent, e.fingerprint, e.model, e.block, e.kind))
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for v in (e.start, e.end, e.bytes, e.hits))
            and number(e.created) and number(e.last_used) and isinstance(e.resumable, bool)
            and len(e.block) == 64)


def with_descendants(entries: dict[str, IndexEntry], keys: set[str]) -> set[str]:
    children: dict[str, list[str]] = {}
    for key, entry in entries.items():
        children.setdefault(entry.parent, []).append(key)
    out: set[str] = set()
    todo = [k for k in keys if k in entries]
    while todo:
        key = todo.pop()
        if key not in out:
            out.add(key)
            todo.extend(children.get(key, []))
    return out

