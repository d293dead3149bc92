"""The prefix cache's files: segments (`<key>.kvp`) and the index that lists them
(`index.json`, changed only under an exclusive `flock` taken with a timeout), with
eviction by least recent use; see kvchat.prefix_cache for what they hold and why.
Anything on disk that cannot be read as written is dropped, never trusted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import sys
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvchat import config
from kvchat.atomic_file import atomic_write, flocked
from kvchat.errors import KvchatError

MAGIC = b"KVCHATPREFIX\n"
FORMAT_VERSION = 1
SUFFIX = ".kvp"
INDEX_NAME = "index.json"
LOCK_NAME = "index.lock"
# The cache never takes more than this share of (its own size + free disk).
MAX_DISK_FRACTION = 0.5
_LOCK_TIMEOUT_S = 3.0
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ORPHAN_AGE_S = 120.0
# A part of a segment: the segment's own cells of a complete KV cache, the whole
# (window) cache at the segment's end, or nothing (a window not kept there).
PART_DELTA, PART_WHOLE, PART_NONE = 0, 1, 2


def token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("i", tokens)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def cache_dir() -> Path:
    p = config.paths()
    legacy = p.data_dir / "prefix-cache"  # where it was before it joined the KV store's budget
    if legacy.is_dir() and not p.prefix_cache_dir.exists():
        with contextlib.suppress(OSError):  # a cache: if it cannot move, it is simply not found
            p.prefix_cache_dir.parent.mkdir(parents=True, exist_ok=True)
            legacy.rename(p.prefix_cache_dir)
    return p.prefix_cache_dir


# -- entry files ---------------------------------------------------------------------


@dataclass
class Segment:
    """One entry: the cells of tokens [start, end) and the parts of the state there."""

    key: str
    parent: str
    start: int
    end: int
    tokens: list[int]
    parts: list[tuple[int, bytes]]  # (PART_DELTA, PART_WHOLE or PART_NONE, part bytes)
    header: dict[str, Any] = field(default_factory=dict)


class EntryError(KvchatError):
    """An entry file that is damaged, foreign or gone: it is dropped, never used."""


def entry_path(folder: Path, key: str) -> Path:
    return folder / f"{key}{SUFFIX}"


def write_segment(folder: Path, segment: Segment) -> int:
    header = json.dumps({**segment.header, "key": segment.key, "parent": segment.parent,
                         "start": segment.start, "end": segment.end,
                         "format_version": FORMAT_VERSION}).encode()
    chunks = [MAGIC, _U32.pack(FORMAT_VERSION), _U64.pack(len(header)), header]
    token_raw = token_bytes(segment.tokens)
    chunks += [_U64.pack(len(token_raw)), token_raw, _U32.pack(len(segment.parts))]
    for kind, data in segment.parts:
        chunks += [_U32.pack(kind), _U64.pack(len(data)), data]
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
    chunks.append(sha.digest())
    atomic_write(entry_path(folder, segment.key), chunks)
    return sum(len(c) for c in chunks)


def read_segment(path: Path, *, header_only: bool = False) -> Segment:
    """Read and verify an entry; raises EntryError for anything not whole and ours."""
    try:
        data = path.read_bytes() if not header_only else _read_head(path)
    except OSError as exc:
        raise EntryError(f"cannot read {path.name}: {exc.strerror}") from None
    view = memoryview(data)
    at = 0

    def take(n: int) -> memoryview:
        nonlocal at
        if at + n > len(view):
            raise EntryError(f"{path.name} is truncated")
        at += n
        return view[at - n : at]

    if bytes(take(len(MAGIC))) != MAGIC:
        raise EntryError(f"{path.name} is not a prefix-cache entry")
    (version,) = _U32.unpack(take(4))
    if version != FORMAT_VERSION:
        raise EntryError(f"{path.name} has format version {version}, not {FORMAT_VERSION}")
    (n_header,) = _U64.unpack(take(8))
    try:
        header = json.loads(bytes(take(n_header)))
        segment = Segment(header["key"], header["parent"], int(header["start"]), int(header["end"]),
                          [], [], header)
    except (ValueError, KeyError, TypeError):
        raise EntryError(f"{path.name} has an unreadable header") from None
    if header_only:
        return segment
    if hashlib.sha256(view[:-32]).digest() != bytes(view[-32:]):
        raise EntryError(f"{path.name} is corrupt (checksum mismatch)")
    (n_tokens,) = _U64.unpack(take(8))
    tokens = array("i")
    tokens.frombytes(take(n_tokens))
    if sys.byteorder != "little":  # pragma: no cover
        tokens.byteswap()
    segment.tokens = tokens.tolist()
    (n_parts,) = _U32.unpack(take(4))
    for _ in range(n_parts):
        (kind,) = _U32.unpack(take(4))
        (n_part,) = _U64.unpack(take(8))
        segment.parts.append((kind, bytes(take(n_part))))
    if at != len(view) - 32 or len(segment.tokens) != segment.end - segment.start:
        raise EntryError(f"{path.name} is inconsistent")
    return segment


def _read_head(path: Path) -> bytes:
    with path.open("rb") as fh:
        head = fh.read(len(MAGIC) + 12)
        if len(head) < len(MAGIC) + 12:
            return head
        (n_header,) = _U64.unpack(head[-8:])
        return head + fh.read(min(n_header, 1 << 20))


# -- the index ----------------------------------------------------------------------------


@dataclass
class IndexEntry:
    key: str
    parent: str
    start: int
    end: int
    fingerprint: str
    model: str
    bytes: int
    created: float
    last_used: float
    hits: int = 0
    resumable: bool = True  # False: only a parent of others (a window was not kept)


class Store:
    """The folder of entries and its index, shared safely between processes."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or cache_dir()

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_NAME

    def read_index(self) -> dict[str, IndexEntry]:
        """The index as last written; rebuilt from entry headers if missing or damaged
        (any shape of JSON, wrong types, a folder in its place, unreadable)."""
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
            if raw.get("format_version") != FORMAT_VERSION:
                raise ValueError("format")
            entries = {k: IndexEntry(**v) for k, v in raw["entries"].items()}
            if not all(isinstance(k, str) and _well_typed(e) for k, e in entries.items()):
                raise TypeError("entry fields")
            return entries
        except FileNotFoundError:
            return {} if not self.folder.is_dir() else self._scan()
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError):
            return self._scan()

    def _scan(self) -> dict[str, IndexEntry]:
        entries: dict[str, IndexEntry] = {}
        try:
            paths = list(self.folder.glob(f"*{SUFFIX}"))
        except OSError:  # an unreadable folder: an empty cache
            return entries
        for path in paths:
            try:
                seg = read_segment(path, header_only=True)
                stat = path.stat()
            except (EntryError, OSError):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            h = seg.header
            entries[seg.key] = IndexEntry(seg.key, seg.parent, seg.start, seg.end,
                                          str(h.get("fingerprint", "")), str(h.get("model", "?")),
                                          stat.st_size, stat.st_mtime, stat.st_mtime,
                                          resumable=bool(h.get("resumable", True)))
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

    def update(self, change: Any) -> bool:
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

    def remove_entries(self, keys: set[str]) -> bool:
        """Remove those entries and their descendants; False if the index was busy."""

        def drop(entries: dict[str, IndexEntry]) -> None:
            for key in with_descendants(entries, keys):
                entries.pop(key, None)
                with contextlib.suppress(OSError):
                    entry_path(self.folder, key).unlink()

        return self.update(drop)

    def evict(self, limit_bytes: int) -> int:
        """Drop least-recently used entries (and their descendants) past the limit;
        also broken chains and stray files. Returns bytes freed."""
        freed = 0

        def shrink(entries: dict[str, IndexEntry]) -> None:
            nonlocal freed
            broken = {k for k, e in entries.items() if e.start > 0 and e.parent not in entries}
            doomed = with_descendants(entries, broken)
            total = sum(e.bytes for k, e in entries.items() if k not in doomed)
            for entry in sorted(entries.values(), key=lambda e: (e.last_used, -e.end)):
                if total <= limit_bytes:
                    break
                if entry.key in doomed:
                    continue
                for key in with_descendants(entries, {entry.key}) - doomed:
                    total -= entries[key].bytes
                    doomed.add(key)
            for key in doomed:
                freed += entries.pop(key).bytes
                with contextlib.suppress(OSError):
                    entry_path(self.folder, key).unlink()
            now = time.time()
            for path in self.folder.iterdir():
                stray = path.suffix == SUFFIX and path.stem not in entries
                stray = stray or (path.name.startswith(".") and path.name.endswith(".tmp"))
                with contextlib.suppress(OSError):
                    if stray and now - path.stat().st_mtime > _ORPHAN_AGE_S:
                        path.unlink()

        self.update(shrink)
        return freed

    def clear(self) -> int:
        """Remove every entry; returns bytes freed."""
        freed = 0

        def empty(entries: dict[str, IndexEntry]) -> None:
            nonlocal freed
            for key, entry in list(entries.items()):
                freed += entry.bytes
                with contextlib.suppress(OSError):
                    entry_path(self.folder, key).unlink()
            entries.clear()

        if self.index_path.is_dir() and not self.index_path.is_symlink():
            shutil.rmtree(self.index_path, ignore_errors=True)  # repaired: written anew below
        if self.folder.is_dir():
            self.update(empty)
        return freed

    def used_bytes(self) -> int:
        return sum(e.bytes for e in self.read_index().values())


def _well_typed(e: IndexEntry) -> bool:
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return (all(isinstance(v, str) for v in (e.key, e.parent, e.fingerprint, e.model))
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for v in (e.start, e.end, e.bytes, e.hits))
            and number(e.created) and number(e.last_used) and isinstance(e.resumable, bool))


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


def effective_limit(limit_bytes: int, store: Store) -> int:
    """The configured limit, capped to MAX_DISK_FRACTION of (free disk + the cache's own size)."""
    probe = store.folder if store.folder.is_dir() else store.folder.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return min(limit_bytes, int((free + store.used_bytes()) * MAX_DISK_FRACTION))


# -- the cache a session uses ----------------------------------------------------------------
