"""Named sessions and recent chats on disk: manifests in the KV store
(kvchat.kv_store), and `.kvs` files from before it (kvchat.session_store), which are
still read and move to the store on their next save.

A name picks its kind: `auto-*` names are recent chats (the store evicts them oldest
first when it is over budget), the others named sessions (never evicted). A
manifest keeps the record and the tokens, checksummed apart from the KV blocks: a
damaged block costs its cells (evaluated again), never the transcript.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvchat import kv_state, session_store
from kvchat.errors import SessionError
from kvchat.kv_files import SERVED, WHOLE, BlockError, Manifest, group_of
from kvchat.kv_store import RECENT, SESSION, KvStore
from kvchat.session_store import RECENT_PREFIX, SavedSession, is_recent


def kind_of(name: str) -> str:
    return RECENT if is_recent(name) else SESSION


def fingerprint(record: dict[str, Any], salt: str = "") -> bytes:
    """A conversation's digest from its record alone: the model file and the context
    settings (`salt`: anything else, such as a server's slot file). For sessions on a
    server and imports; a model loaded here keys by its KV fingerprint instead
    (kvchat.named_session.NamedSession.fingerprint_of)."""
    model = record["model"]
    key = json.dumps([model["sha256"], model["size"], record["settings"], salt], sort_keys=True)
    return hashlib.sha256(key.encode()).digest()


@dataclass
class Saved:
    """A saved conversation: in the store (`manifest`) or a `.kvs` file (`legacy`)."""

    name: str
    record: dict[str, Any]
    tokens: list[int]
    checkpoints: bytes
    manifest: Manifest | None = None
    legacy: SavedSession | None = None
    path: Path | None = None  # the file it was read from


def load(name: str, *, with_state: bool = True, store: KvStore | None = None) -> Saved | None:
    """The conversation saved as `name`, checked (None when there is none): the
    store's manifest, else a `.kvs` file (`with_state` False: its KV state is verified,
    not kept)."""
    store = store or KvStore()
    path = store.manifest_path(kind_of(session_store.check_name(name)), name)
    if path.exists():
        try:
            manifest = store.read_manifest(kind_of(name), name)
        except SessionError as exc:
            raise SessionError(f"saved session '{name}' is corrupt or truncated ({exc})",
                               hint=f"remove it with `kvchat sessions rm {name}` and start again") from None
        problem = session_store.record_problem(manifest.record, manifest.tokens)
        if problem:
            raise SessionError(f"saved session '{name}' has an invalid record: {problem}",
                               hint=f"remove it with `kvchat sessions rm {name}` and start again")
        return Saved(name, manifest.record, manifest.tokens, manifest.extra, manifest=manifest, path=path)
    legacy_path = session_store.session_path(name)
    if not legacy_path.exists():
        return None
    saved = session_store.load(legacy_path, with_state=with_state)
    return Saved(name, saved.record, saved.tokens, saved.checkpoints, legacy=saved, path=legacy_path)


def load_existing(name: str, *, with_state: bool = True) -> Saved:
    saved = load(name, with_state=with_state)
    if saved is None:
        raise SessionError(f"no session named '{name}'", hint="see `kvchat sessions list`")
    return saved


def exists(name: str) -> bool:
    store = KvStore()
    return store.manifest_path(kind_of(name), name).exists() or session_store.session_path(name).exists()


def whole_state(saved: Saved, store: KvStore | None = None) -> bytes:
    """The KV state of a saved conversation as one sequence state (an export): its
    blocks joined, each verified. Raises SessionError when a block is damaged."""
    if saved.legacy is not None:
        return saved.legacy.state
    assert saved.manifest is not None
    store = store or KvStore()
    chain = saved.manifest.chain
    try:
        if chain and chain[0].kind == WHOLE:
            return store.read_block(chain[0], saved.tokens)
        parts: list[tuple[kv_state.Part, int, int]] = []
        header = b""
        for link in chain:
            state = kv_state.parse(store.read_block(link, saved.tokens))
            header = state.header
            parts.extend((p, 0, p.n_cells) for p in state.parts)
        return header + kv_state.join(parts) if parts else b""
    except (BlockError, kv_state.StateFormatError) as exc:
        raise SessionError(f"the KV state of '{saved.name}' is damaged: {exc}",
                           hint="export its transcript with --format markdown or json") from None


# -- listing -------------------------------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    name: str
    path: Path
    size: int  # bytes only it holds (a .kvs file: the file)
    updated: float
    model: str
    n_ctx: int
    n_kv: int
    turns: int
    shared: int = 0  # bytes of blocks other conversations name too


def _names(store: KvStore) -> dict[str, Path]:
    """Every saved conversation's name and file (a manifest wins over a .kvs file)."""
    found: dict[str, Path] = {}
    folder = session_store.sessions_dir()
    if folder.is_dir():
        for path in folder.glob(f"*{session_store.SUFFIX}"):
            found[path.stem] = path
    for kind in (SESSION, RECENT):
        for name in store.manifest_names(kind):
            if group_of(kind, name) == kind:  # not `kvchat serve`'s conversations
                found[name] = store.manifest_path(kind, name)
    return found


def list_sessions() -> list[SessionInfo]:
    store = KvStore()
    usage = store.usage() if store.root.is_dir() else None
    infos = []
    names: dict[str, str] = {}
    for name, path in sorted(_names(store).items()):
        try:
            st = path.stat()
            saved = _quick_load(name, path, store)
        except (SessionError, OSError):
            # one bad file is listed as damaged, never hides the others
            with contextlib.suppress(OSError):
                infos.append(SessionInfo(name, path, path.stat().st_size, path.stat().st_mtime,
                                         "(damaged)", 0, 0, 0))
            continue
        rec = saved.record
        model_path = rec["model"]["path"]
        if model_path not in names:
            names[model_path] = session_store.model_display_name(rec["model"])
        owner = (kind_of(name), name)
        own = usage.own.get(owner, st.st_size) if usage and saved.manifest else st.st_size
        shared = usage.shared.get(owner, 0) if usage and saved.manifest else 0
        infos.append(SessionInfo(
            name=name, path=path, size=own, updated=rec.get("updated", st.st_mtime), model=names[model_path],
            n_ctx=session_store.context_cells(rec), n_kv=rec["n_kv"],
            turns=sum(1 for m in rec["messages"] + rec.get("dropped", []) if m["role"] == "user"),
            shared=shared))
    return infos


def _quick_load(name: str, path: Path, store: KvStore) -> Saved:
    """A listing's read: a .kvs file by its lengths only (fast over many large files)."""
    if path.suffix == session_store.SUFFIX:
        legacy = session_store.load(path, with_state=False, verify=False)
        return Saved(name, legacy.record, legacy.tokens, b"", legacy=legacy, path=path)
    saved = load(name, store=store)
    if saved is None:
        raise SessionError(f"'{name}' was removed meanwhile")
    return saved


def remove(name: str) -> None:
    """Delete a saved conversation: its manifest (blocks only it named go; aligned
    ones stay as evictable cache) and any .kvs file of that name."""
    store = KvStore()
    manifest = store.manifest_path(kind_of(session_store.check_name(name)), name)
    legacy = session_store.session_path(name)
    if not manifest.exists() and not legacy.exists():
        raise SessionError(f"no session named '{name}'", hint="see `kvchat sessions list`")
    with session_store.locked(name):
        if manifest.exists():
            try:
                store.remove(kind_of(name), name)
            except OSError as exc:
                raise SessionError(f"cannot delete {manifest}: {exc.strerror or exc}",
                                   hint="check the folder's permissions") from None
        if legacy.exists() or legacy.is_symlink():
            try:
                if legacy.is_dir() and not legacy.is_symlink():
                    raise SessionError(f"{legacy} is a directory, not a session file",
                                       hint="remove or move it by hand")
                legacy.unlink()
            except OSError as exc:
                raise SessionError(f"cannot delete {legacy}: {exc.strerror or exc}",
                                   hint="check the sessions folder's permissions") from None
        session_store.remove_stale_temps(legacy)


# -- recent chats ------------------------------------------------------------------
#
# An unnamed chat is kept as a recent chat (saved after each reply like a named one),
# so that no conversation is lost quietly; only the newest `recent_chats` of them are
# kept. `sessions list`, `/load`, `export` and `rm` work on them, and `chat
# --continue` resumes the newest.


def recent_name(now: float, taken: Iterable[str] = ()) -> str:
    """A new recent chat's name from the local time; '-2', '-3'… if that second is taken."""
    base = RECENT_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    used = set(taken) | {name for name, _ in _recent()}
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}-{n}"
    return name


def _recent() -> list[tuple[str, Path]]:
    """Recent chats, oldest first (by the time they were last saved)."""
    found = []
    for name, path in _names(KvStore()).items():
        if is_recent(name):
            with contextlib.suppress(OSError):
                found.append((path.stat().st_mtime, name, path))
    return [(name, path) for _, name, path in sorted(found)]


def latest_recent() -> str | None:
    """The name of the recent chat saved last, or None."""
    recent = _recent()
    return recent[-1][0] if recent else None


def session_names() -> list[str]:
    """Every saved conversation's name, named and recent (no record is read)."""
    return sorted(_names(KvStore()))


def latest_session() -> str | None:
    """The conversation saved last, named or recent (by its file's time), or None."""
    newest: tuple[float, str] | None = None
    for name, path in _names(KvStore()).items():
        try:
            key = (path.stat().st_mtime, name)
        except OSError:
            continue  # removed meanwhile
        newest = max(newest, key) if newest is not None else key
    return newest[1] if newest is not None else None


def prune_recent(keep: int) -> list[str]:
    """Delete the oldest recent chats beyond `keep`; one in use by a process is skipped.
    Returns the names deleted."""
    recent = _recent()
    removed = []
    for name, _ in recent[: max(len(recent) - max(keep, 0), 0)]:
        try:
            remove(name)
        except SessionError:  # in use, or gone meanwhile
            continue
        removed.append(name)
    return removed


# -- one portable file -----------------------------------------------------------------


class WholeState:
    """A whole saved KV state as the store reads it: by position where it is one KV
    cache holding positions 0..n in order (a plain KV model's), else whole."""

    def __init__(self, state: bytes, n_kv: int) -> None:
        self.state = state
        self._part: kv_state.Part | None = None
        self._header = b""
        with contextlib.suppress(kv_state.StateFormatError, ValueError):
            parsed = kv_state.parse(state)
            if len(parsed.parts) == 1 and parsed.parts[0].positions == tuple(range(n_kv)):
                self._part, self._header = parsed.parts[0], parsed.header

    @property
    def can_save_ranges(self) -> bool:
        return self._part is not None

    def state_range_bytes(self, start: int, end: int) -> bytes:
        assert self._part is not None
        return self._header + kv_state.cut(self._part, start, end)

    def state_bytes(self) -> bytes:
        return self.state


def store_figures(configured: int | None) -> dict[str, Any]:
    """The KV store's use against its budget (`configured`: Settings.store_budget), the
    prefix cache's segments included: what `paths`, `cache stats` and `sessions list` show."""
    from kvchat.kv_store import effective_budget

    store = KvStore()
    usage = store.usage() if store.root.is_dir() else None
    budget = effective_budget(configured, store)
    named = usage.by_kind.get(SESSION, 0) if usage else 0
    return {"path": str(store.root), "bytes": usage.total if usage else 0, "budget_bytes": budget,
            "configured_bytes": configured, "named_bytes": named,
            "recent_bytes": usage.by_kind.get(RECENT, 0) if usage else 0,
            "served_bytes": usage.by_kind.get(SERVED, 0) if usage else 0,
            "unreferenced_bytes": usage.unreferenced if usage else 0,
            "prefix_cache_bytes": usage.prefix if usage else 0,
            "named_over_budget": named > budget}
