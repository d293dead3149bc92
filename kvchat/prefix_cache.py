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

On disk, in the KV store (`<data dir>/kv-store/`, kvchat.prefix_store): each
segment is one of the store's blocks (`blocks/<2 hex>/<key>.kvb`): a plain KV
model's is the very block a session save writes for those cells, keyed by
kvchat.kv_files.block_keys over the same fingerprint digest, so a session that
starts with a cached prompt shares it. `prefix/index.json` lists the entries
(key, parent, span, block, size, last use, hits), changed only under an exclusive
`flock` on `prefix/index.lock` taken with a timeout, so two processes never corrupt
it and never wait on each other for long. A block that fails its checks or a
broken chain is dropped. Least-recently used entries (and their descendants,
useless without them) leave the index past the KV store's one budget; their
blocks go with them unless a conversation's manifest names them
(kvchat.kv_store.KvStore.evict).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from kvchat import kv_state, settings
from kvchat.engine_state import RangeEngine
from kvchat.errors import KvchatError
from kvchat.kv_files import RANGE, block_keys
from kvchat.kv_store import KvStore, effective_budget
from kvchat.prefix_store import (
    PART_DELTA,
    PART_NONE,
    PART_WHOLE,
    PARTS,
    PARTS_BARE,
    EntryError,
    IndexEntry,
    Segment,
    Store,
    prefix_keys,
)

# Names tests and the CLI read from here (the files themselves: kvchat.prefix_store).
__all__ = ["BLOCK_TOKENS", "MIN_PREFIX_TOKENS", "WINDOW_EVERY", "EntryError", "Fingerprint",
           "IndexEntry", "PrefillResult", "PrefixCache", "Segment", "Store", "prefix_keys"]

# Every BLOCK_TOKENS positions a prompt gets a boundary, so prompts that share a
# start but differ later still find the blocks before they diverge.
BLOCK_TOKENS = 512
# Shorter prompts are not stored: restoring is cheap, but an entry under this
# costs more in files and index churn than its prefill (see README: measured).
MIN_PREFIX_TOKENS = 256
# The store's budget when the cache evicts on its own (no `evict` given: tests and
# benchmarks; prefix_cache_size's table default, when one is set, wins).
DEFAULT_LIMIT = 4 * 1024**3
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


# -- keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """Everything that changes the KV bytes of a prefix or a conversation (not what
    merely bounds them): the one fingerprint the KV store keys blocks by, for the
    prefix cache and sessions alike (kvchat.named_session).

    n_ctx is not here: a state holds cells, not the context size, and loads into any
    context with room for it. Nor is the model's file name (shown, not hashed): a
    file moved or renamed holds the same weights. The llama-cpp-python version pins
    the vendored llama.cpp, whose state format and kernels both matter.
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
        fields = {k: v for k, v in asdict(self).items() if k != "model_name"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()


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
                 min_tokens: int = MIN_PREFIX_TOKENS, block_tokens: int = BLOCK_TOKENS,
                 evict: Callable[[], object] | None = None) -> None:
        self.fingerprint = fingerprint
        self.fp_digest = fingerprint.digest()
        self.fp_hex = self.fp_digest.hex()
        self.store = store or KvStore().prefix
        if limit_bytes is None:
            limit_bytes = settings.default("prefix_cache_size") or DEFAULT_LIMIT
        self.limit_bytes: int = limit_bytes
        # What keeps the disk bounded after a store: the cache lives in the KV store and
        # evicts with its one budget (kvchat.kv_store.KvStore.evict); without `evict`,
        # the store is held to `limit_bytes`.
        self.evict = evict or self._evict
        self.min_tokens = min_tokens
        self.block_tokens = block_tokens
        self.skip_reason = _skip_reason(memory_kind)
        # A sliding-window model's state holds two caches, the window one last
        # (llama-kv-cache-iswa.cpp): that one is kept whole or not at all, never cut.
        self.window_part = 1 if memory_kind == "swa" else None
        self._pending: list[Segment] = []

    def _evict(self) -> object:
        store = KvStore(self.store.root)
        return store.evict(effective_budget(self.limit_bytes, store), wait=False)

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
            try:  # its size, key, span, tokens and fingerprint checked (the size first)
                segments.append(self.store.read_segment(entry, tokens))
            except EntryError as exc:
                self.store.remove_entries({entry.key}, damaged=exc.damaged)
                return None
        return segments

    def assemble(self, segments: list[Segment]) -> bytes:
        """The sequence state at the end of the last segment, joined from the chain."""
        last = segments[-1]
        out = [last.state_header]
        for i, (kind, data) in enumerate(last.parts):
            if kind == PART_WHOLE:
                out.append(data)
                continue
            if kind != PART_DELTA:
                raise kv_state.StateFormatError("no state kept for this part at this point")
            pieces = []
            for seg in segments:
                if i >= len(seg.parts) or seg.parts[i][0] != PART_DELTA:
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
        self._name_blocks([s for s in self._pending if not s.block], tokens)
        result.stored_tokens = sum(s.end - s.start for s in self._pending)
        result.skipped = self.skip_reason
        return result

    def _name_blocks(self, segments: list[Segment], tokens: Sequence[int]) -> None:
        """Each segment's block kind and key. A window model's segment without its window
        is another kind than one with it: the same span, other bytes, another key."""
        for seg in segments:
            seg.kind = RANGE if self.window_part is None else PARTS if seg.resumable else PARTS_BARE
        for kind in {seg.kind for seg in segments}:
            group = [seg for seg in segments if seg.kind == kind]
            spans = [(seg.start, seg.end) for seg in group]
            for seg, block in zip(group, block_keys(self.fp_digest, tokens, spans, kind), strict=True):
                seg.block = block

    def _snapshot(self, engine: PrefixEngine, tokens: Sequence[int], keys: list[str], parent: str,
                  start: int, end: int, keep_window: bool) -> bool:
        """Cut cells [start, end) out of the state; False when this state cannot be cut."""
        try:
            if self.window_part is None and isinstance(engine, RangeEngine) and engine.can_save_ranges:
                # Only the cells of [start, end) (kvchat.engine.seq_state.read_range: the bytes
                # the cut below takes from the whole state, without reading the rest). Cutting
                # the whole state at each boundary read a long prompt's history again and
                # again: 32 times up to 2 GiB for 16k tokens of an 8B model.
                state = kv_state.parse(engine.state_range_bytes(start, end))
                if len(state.parts) != 1:
                    raise kv_state.StateFormatError(f"{len(state.parts)} KV caches in the state")
                delta = [(PART_DELTA, kv_state.part_bytes(state.parts[0]))]
                self._pending.append(Segment(keys[end], parent, start, end, list(tokens[start:end]), delta,
                                             state.header))
                return True
            raw = engine.state_bytes()
            state = kv_state.parse(raw)
            parts: list[tuple[int, bytes]] = []
            if len(state.parts) != (2 if self.window_part is not None else 1):
                raise kv_state.StateFormatError(f"{len(state.parts)} KV caches in the state")
            for i, part in enumerate(state.parts):
                if i == self.window_part:
                    parts.append((PART_WHOLE, kv_state.part_bytes(part)) if keep_window
                                 else (PART_NONE, b""))
                elif part.complete and part.n_cells == end:
                    parts.append((PART_DELTA, kv_state.cut(part, start, end)))
                else:
                    raise kv_state.StateFormatError("cells do not match the evaluated tokens")
        except kv_state.StateFormatError as exc:
            self.skip_reason = f"cannot cut this model's KV state ({exc})"
            return False
        self._pending.append(Segment(keys[end], parent, start, end, list(tokens[start:end]), parts,
                                     state.header))
        return True

    def commit(self) -> int:
        """Write the snapshots taken by `prefill` and evict past the budget; returns bytes
        written. Call after the answer, so that writing never delays the first token.
        A block already in the store (this cache's, or a session's with the same cells)
        is not written again: the index names it."""
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        written = 0
        added: dict[str, IndexEntry] = {}
        with self.store.store_lock() as held:
            if not held:  # the store is being collected: this prompt is not cached
                return 0
            known = self.store.read_index()
            for seg in pending:
                old = known.get(seg.key)
                path = self.store.block_path(seg.block)
                if old is not None and old.block == seg.block and (old.resumable or not seg.resumable) \
                        and path.exists():
                    continue  # content-addressed: stored already (by this or another process)
                if path.is_file():
                    size = path.stat().st_size
                else:
                    size = self.store.write_segment(seg, self.fp_hex)
                    written += size
                now = time.time()
                added[seg.key] = IndexEntry(seg.key, seg.parent, seg.start, seg.end, self.fp_hex,
                                            self.fingerprint.model_name, size, now, now,
                                            resumable=seg.resumable, block=seg.block, kind=seg.kind)

            def add(entries: dict[str, IndexEntry]) -> None:
                for key, entry in added.items():
                    if key not in entries or (entry.resumable and not entries[key].resumable):
                        entries[key] = entry

            if added:
                self.store.update(add)
        self.evict()
        return written

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

