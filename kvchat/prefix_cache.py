"""The persistent prefix cache: KV snapshots of prompt starts on disk, found by content.

A one-shot run that starts like an earlier one (the same piped document, the same
system prompt) restores the KV cells of that start from disk and evaluates only
the rest. Entries are *segments*: the cells of tokens [start, end) of some prompt,
keyed by the SHA-256 of a fingerprint (model file hash and every setting that
changes the KV bytes) followed by the token ids 0..end. A segment names its
parent (the entry ending at `start`); restoring the prefix ending at `end` joins
the chain of segments back to position 0 (kvchat.kv_state), so a block shared by
many prompts is stored once.

Where a prompt is cut into segments ("boundaries"): the end of the system prompt,
the end of the piped stdin part and every `BLOCK_TOKENS` tokens, so the longest
shared start is found however prompts diverge. Lookup hashes the prompt's token
prefixes incrementally and looks for the longest one in the index: any boundary
another prompt stored is found, and the cached tokens are exactly the tokens the
new prompt tokenizes to, or the entry is not used.

Sliding-window models (swa_full off) hold only the window for those layers: a
segment keeps that part whole (the window at its end), which is exactly what
continuing from there needs. A window costs as much as n_swa tokens of every
window layer, so it is kept only at marks, at a prompt's last cut and every
WINDOW_EVERY blocks; other segments there serve only as parents ("resumable"
false). Recurrent and hybrid models are skipped with a reason, as is any state
kv_state cannot cut.

On disk (`<data dir>/prefix-cache/`): one file per segment (`<key>.kvp`: magic,
format version, JSON header, tokens, parts, SHA-256), written to a temp file,
fsynced and renamed; `index.json` (written the same way) lists the entries with
size, last use and hits, and is changed only under an exclusive `flock` on
`index.lock` taken with a timeout, so two processes never corrupt it and never
wait on each other for long. A file that fails its checksum, a foreign format
or a broken chain is dropped and removed. Least-recently used segments (and
their descendants, useless without them) are evicted past the size limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvchat import config, kv_state, settings
from kvchat.errors import KvchatError
from kvchat.session_store import atomic_write

MAGIC = b"KVCHATPREFIX\n"
FORMAT_VERSION = 1
SUFFIX = ".kvp"
INDEX_NAME = "index.json"
LOCK_NAME = "index.lock"
# Every BLOCK_TOKENS positions a prompt gets a boundary, so prompts that share a
# start but differ later still find the blocks before they diverge.
BLOCK_TOKENS = 512
# Shorter prompts are not stored: restoring is cheap, but an entry under this
# costs more in files and index churn than its prefill (see README: measured).
MIN_PREFIX_TOKENS = 256
# The cache never takes more than this share of (its own size + free disk).
MAX_DISK_FRACTION = 0.5
_LOCK_TIMEOUT_S = 3.0
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ORPHAN_AGE_S = 120.0
# A part of a segment: the segment's own cells of a complete KV cache, the whole
# (window) cache at the segment's end, or nothing (a window not kept there).
_PART_DELTA, _PART_WHOLE, _PART_NONE = 0, 1, 2
# Sliding-window models: a window costs as much as n_swa tokens of every window
# layer, so it is kept only where a prompt is likely to resume: at marks (system
# prompt, piped stdin), the prompt's last cut, and every WINDOW_EVERY blocks.
WINDOW_EVERY = 4


class PrefixEngine(Protocol):
    """What the prefix cache needs from an engine (kvchat.engine.Engine has it)."""

    @property
    def n_past(self) -> int: ...

    def eval(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None) -> None: ...
    def state_bytes(self) -> bytes: ...
    def load_state_bytes(self, data: bytes, n_tokens: int) -> None: ...
    def kv_clear(self) -> None: ...


def cache_dir() -> Path:
    return config.paths().prefix_cache_dir


# -- keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """Everything that changes the KV bytes of a prefix (not what merely bounds them).

    n_ctx is not here: a state holds cells, not the context size, and loads into any
    context with room for it. The llama-cpp-python version pins the vendored
    llama.cpp, whose state format and kernels both matter.
    """

    model_sha256: str
    model_name: str
    type_k: str
    type_v: str
    flash_attn: str  # effective: on or off
    swa_full: bool
    n_gpu_layers: int  # 0 when the build cannot offload: KV computed on the CPU
    n_batch: int
    n_ubatch: int
    backend: str

    def digest(self) -> bytes:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).digest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("i", tokens)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def prefix_keys(fp_digest: bytes, tokens: Sequence[int]) -> list[str]:
    """keys[i] names the prefix tokens[:i] (keys[0] is the empty prefix)."""
    sha = hashlib.sha256(fp_digest)
    keys = [sha.hexdigest()]
    for token in tokens:
        sha.update(_token_bytes([token]))
        keys.append(sha.copy().hexdigest())
    return keys


# -- entry files ---------------------------------------------------------------------


@dataclass
class Segment:
    """One entry: the cells of tokens [start, end) and the parts of the state there."""

    key: str
    parent: str
    start: int
    end: int
    tokens: list[int]
    parts: list[tuple[int, bytes]]  # (_PART_DELTA, _PART_WHOLE or _PART_NONE, part bytes)
    header: dict[str, Any] = field(default_factory=dict)


class EntryError(KvchatError):
    """An entry file that is damaged, foreign or gone: it is dropped, never used."""


def _entry_path(folder: Path, key: str) -> Path:
    return folder / f"{key}{SUFFIX}"


def write_segment(folder: Path, segment: Segment) -> int:
    header = json.dumps({**segment.header, "key": segment.key, "parent": segment.parent,
                         "start": segment.start, "end": segment.end,
                         "format_version": FORMAT_VERSION}).encode()
    chunks = [MAGIC, _U32.pack(FORMAT_VERSION), _U64.pack(len(header)), header]
    token_raw = _token_bytes(segment.tokens)
    chunks += [_U64.pack(len(token_raw)), token_raw, _U32.pack(len(segment.parts))]
    for kind, data in segment.parts:
        chunks += [_U32.pack(kind), _U64.pack(len(data)), data]
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
    chunks.append(sha.digest())
    atomic_write(_entry_path(folder, segment.key), chunks)
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
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + _LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        yield False
                        return
                    time.sleep(0.01)
            yield True
        finally:
            os.close(fd)

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

    def remove_entries(self, keys: set[str]) -> None:
        def drop(entries: dict[str, IndexEntry]) -> None:
            for key in _with_descendants(entries, keys):
                entries.pop(key, None)
                with contextlib.suppress(OSError):
                    _entry_path(self.folder, key).unlink()

        self.update(drop)

    def evict(self, limit_bytes: int) -> int:
        """Drop least-recently used entries (and their descendants) past the limit;
        also broken chains and stray files. Returns bytes freed."""
        freed = 0

        def shrink(entries: dict[str, IndexEntry]) -> None:
            nonlocal freed
            broken = {k for k, e in entries.items() if e.start > 0 and e.parent not in entries}
            doomed = _with_descendants(entries, broken)
            total = sum(e.bytes for k, e in entries.items() if k not in doomed)
            for entry in sorted(entries.values(), key=lambda e: (e.last_used, -e.end)):
                if total <= limit_bytes:
                    break
                if entry.key in doomed:
                    continue
                for key in _with_descendants(entries, {entry.key}) - doomed:
                    total -= entries[key].bytes
                    doomed.add(key)
            for key in doomed:
                freed += entries.pop(key).bytes
                with contextlib.suppress(OSError):
                    _entry_path(self.folder, key).unlink()
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
                    _entry_path(self.folder, key).unlink()
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


def _with_descendants(entries: dict[str, IndexEntry], keys: set[str]) -> set[str]:
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


@dataclass
class PrefillResult:
    """What one prefill got from the cache (all zero / None when nothing was found)."""

    restored_tokens: int = 0
    restore_s: float = 0.0
    stored_tokens: int = 0
    skipped: str | None = None  # why the cache was not used at all
    routine: bool = False  # `skipped` is only that the prompt is short: nothing to warn about


class PrefixCache:
    """Look up, restore and store prompt prefixes for one loaded model and settings."""

    def __init__(self, fingerprint: Fingerprint, *, limit_bytes: int | None = None,
                 store: Store | None = None, memory_kind: str = "kv",
                 min_tokens: int = MIN_PREFIX_TOKENS, block_tokens: int = BLOCK_TOKENS) -> None:
        self.fingerprint = fingerprint
        self.fp_digest = fingerprint.digest()
        self.fp_hex = self.fp_digest.hex()
        self.store = store or Store()
        self.limit_bytes: int = settings.default("prefix_cache_size") if limit_bytes is None else limit_bytes
        self.min_tokens = min_tokens
        self.block_tokens = block_tokens
        self.skip_reason = _skip_reason(memory_kind)
        # A sliding-window model's state holds two caches, the window one last
        # (llama-kv-cache-iswa.cpp): that one is kept whole or not at all, never cut.
        self.window_part = 1 if memory_kind == "swa" else None
        self._pending: list[Segment] = []

    # -- lookup --------------------------------------------------------------------------

    def _chain(self, entries: dict[str, IndexEntry], key: str) -> list[IndexEntry] | None:
        chain = []
        while True:
            entry = entries.get(key)
            if entry is None or entry.fingerprint != self.fp_hex:
                return None
            chain.append(entry)
            if entry.start == 0:
                return chain[::-1]
            key = entry.parent

    def lookup(self, tokens: Sequence[int], keys: list[str] | None = None) -> list[Segment]:
        """The segments of the longest cached prefix of `tokens` (at most all but the
        last token, whose logits the answer needs), verified; [] when none."""
        entries = self.store.read_index()
        if not entries:
            return []
        keys = keys or prefix_keys(self.fp_digest, tokens)
        for n in range(len(tokens) - 1, 0, -1):
            if keys[n] not in entries or not entries[keys[n]].resumable:
                continue
            chain = self._chain(entries, keys[n])
            if chain is None:
                continue
            segments = self._read_chain(chain, tokens)
            if segments is not None:
                return segments
        return []

    def _read_chain(self, chain: list[IndexEntry], tokens: Sequence[int]) -> list[Segment] | None:
        segments = []
        for entry in chain:
            path = _entry_path(self.store.folder, entry.key)
            try:
                # The size the index recorded, checked before the file is read at all.
                if path.stat().st_size != entry.bytes:
                    raise EntryError(f"{path.name} is not the size its index records")
                seg = read_segment(path)
            except (EntryError, OSError):
                self.store.remove_entries({entry.key})
                return None
            if seg.tokens != list(tokens[seg.start : seg.end]) or seg.key != entry.key:
                self.store.remove_entries({entry.key})
                return None
            segments.append(seg)
        return segments

    def assemble(self, segments: list[Segment]) -> bytes:
        """The sequence state at the end of the last segment, joined from the chain."""
        last = segments[-1]
        header = bytes.fromhex(last.header["state_header"])
        out = [header]
        for i, (kind, data) in enumerate(last.parts):
            if kind == _PART_WHOLE:
                out.append(data)
                continue
            if kind != _PART_DELTA:
                raise kv_state.StateFormatError("no state kept for this part at this point")
            pieces = []
            for seg in segments:
                if i >= len(seg.parts) or seg.parts[i][0] != _PART_DELTA:
                    raise kv_state.StateFormatError("chain mixes whole and cut parts")
                part = kv_state.parse_part(memoryview(seg.parts[i][1]), 0)
                pieces.append((part, 0, part.n_cells))
            out.append(kv_state.join(pieces))
        return b"".join(out)

    # -- prefill -------------------------------------------------------------------------

    def boundaries(self, n_tokens: int, marks: Sequence[int]) -> list[int]:
        """Where a prompt of n_tokens is cut into segments: marks and block multiples."""
        points = set(range(self.block_tokens, n_tokens, self.block_tokens))
        points.update(m for m in marks if 0 < m < n_tokens)
        return sorted(p for p in points if p >= self.min_tokens)

    def prefill(self, engine: PrefixEngine, tokens: Sequence[int], marks: Sequence[int] = (),
                progress: Callable[[int, int], None] | None = None) -> PrefillResult:
        """Evaluate `tokens` into an empty KV cache, restoring the longest cached prefix
        first and snapshotting the boundaries past it (written by `commit`).
        `progress(done, total)` counts over the whole prompt, restored tokens included."""
        result = PrefillResult()
        if self.skip_reason is not None or len(tokens) < self.min_tokens:
            engine.eval(tokens, progress)
            # A short prompt is routine: said in --json, not warned about on every run.
            result.routine = self.skip_reason is None
            result.skipped = self.skip_reason or (f"the prompt has {len(tokens)} tokens; the prefix cache "
                                                  f"stores prompts of {self.min_tokens} or more")
            return result
        keys = prefix_keys(self.fp_digest, tokens)
        started = time.perf_counter()
        done = 0
        segments = self.lookup(tokens, keys)
        if segments:
            try:
                engine.load_state_bytes(self.assemble(segments), segments[-1].end)
                done = segments[-1].end
                self._touch([s.key for s in segments])
            except kv_state.StateFormatError:  # verified files that do not join: drop them
                engine.kv_clear()
                self.store.remove_entries({segments[-1].key})
            except KvchatError:  # llama.cpp refused it here (a smaller context?): a miss
                engine.kv_clear()
        result.restored_tokens = done
        result.restore_s = time.perf_counter() - started if done else 0.0
        if done and progress is not None:
            progress(done, len(tokens))
        parent = keys[done]
        points = self.boundaries(len(tokens), marks)
        windows = {*marks, *points[-1:]}
        for point in points:
            if point <= done:
                continue
            engine.eval(tokens[done:point], _offset(progress, done, len(tokens)))
            keep_window = point in windows or point % (self.block_tokens * WINDOW_EVERY) == 0
            stored = self._snapshot(engine, tokens, keys, parent, done, point, keep_window)
            done = point
            if not stored:
                break
            parent = keys[point]
        engine.eval(tokens[done:], _offset(progress, done, len(tokens)))
        result.stored_tokens = sum(s.end - s.start for s in self._pending)
        result.skipped = self.skip_reason
        return result

    def _snapshot(self, engine: PrefixEngine, tokens: Sequence[int], keys: list[str], parent: str,
                  start: int, end: int, keep_window: bool) -> bool:
        """Cut cells [start, end) out of the state; False when this state cannot be cut."""
        try:
            raw = engine.state_bytes()
            state = kv_state.parse(raw)
            parts: list[tuple[int, bytes]] = []
            if len(state.parts) != (2 if self.window_part is not None else 1):
                raise kv_state.StateFormatError(f"{len(state.parts)} KV caches in the state")
            for i, part in enumerate(state.parts):
                if i == self.window_part:
                    parts.append((_PART_WHOLE, kv_state.part_bytes(part)) if keep_window
                                 else (_PART_NONE, b""))
                elif part.complete and part.n_cells == end:
                    parts.append((_PART_DELTA, kv_state.cut(part, start, end)))
                else:
                    raise kv_state.StateFormatError("cells do not match the evaluated tokens")
        except kv_state.StateFormatError as exc:
            self.skip_reason = f"cannot cut this model's KV state ({exc})"
            return False
        resumable = all(kind != _PART_NONE for kind, _ in parts)
        header = {"fingerprint": self.fp_hex, "model": self.fingerprint.model_name,
                  "state_header": state.header.hex(), "created": time.time(), "resumable": resumable}
        self._pending.append(Segment(keys[end], parent, start, end, list(tokens[start:end]), parts, header))
        return True

    def commit(self) -> int:
        """Write the snapshots taken by `prefill` and evict past the limit; returns bytes
        written. Call after the answer, so that writing never delays the first token."""
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        folder = self.store.folder
        folder.mkdir(parents=True, exist_ok=True)
        known = self.store.read_index()
        written: dict[str, IndexEntry] = {}
        for seg in pending:
            old = known.get(seg.key)
            if old is not None and (old.resumable or not seg.header["resumable"]) \
                    and _entry_path(folder, seg.key).exists():
                continue  # content-addressed: stored already (by this or another process)
            size = write_segment(folder, seg)
            now = time.time()
            written[seg.key] = IndexEntry(seg.key, seg.parent, seg.start, seg.end, self.fp_hex,
                                          self.fingerprint.model_name, size, now, now,
                                          resumable=bool(seg.header["resumable"]))

        def add(entries: dict[str, IndexEntry]) -> None:
            for key, entry in written.items():
                if key not in entries or (entry.resumable and not entries[key].resumable):
                    entries[key] = entry

        if written:
            self.store.update(add)
        self.store.evict(effective_limit(self.limit_bytes, self.store))
        return sum(e.bytes for e in written.values())

    def _touch(self, keys: list[str]) -> None:
        now = time.time()

        def mark(entries: dict[str, IndexEntry]) -> None:
            for key in keys:  # every segment of the chain served this prompt: a hit each
                if key in entries:
                    entries[key].last_used = now
                    entries[key].hits += 1

        self.store.update(mark)


def _offset(progress: Callable[[int, int], None] | None, start: int,
            total: int) -> Callable[[int, int], None] | None:
    """A progress callback for one piece of the prompt, reporting over the whole of it."""
    if progress is None:
        return None
    report = progress

    def piece(done: int, _n: int) -> None:
        report(start + done, total)

    return piece


def _skip_reason(memory_kind: str) -> str | None:
    if memory_kind in ("recurrent", "hybrid"):
        return (f"prefix cache off for this model: its {memory_kind} state cannot be cut at a "
                "prefix and resumed exactly")
    return None

