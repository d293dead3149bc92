"""Named sessions on disk: format, atomic saves, locks, and model identity.

A session file holds, in one checksummed container, the conversation record
(format version, model identity, context settings, messages, turn marks), the
exact token list, and the sequence's KV state as llama.cpp serialises it
(`llama_state_seq_get_data`: cells only, no logits). It is written to a temp
file, fsynced and renamed over the old one, so a crash or SIGKILL mid-save leaves
the previous file whole; a damaged file fails its checksum and is never loaded.

Layout (little-endian):
    b"KVCHATSESSION\\n"  magic
    u32                 container format version
    u64 + bytes         record (UTF-8 JSON)
    u64 + bytes         tokens (int32 array)
    u64 + bytes         KV state
    32 bytes            SHA-256 of everything above
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kvchat import config
from kvchat.errors import SessionError, UsageError

MAGIC = b"KVCHATSESSION\n"
FORMAT_VERSION = 1
SUFFIX = ".kvs"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HASH_CHUNK = 8 * 1024 * 1024


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UsageError(
            f"invalid session name '{name}'",
            hint="use letters, digits, '.', '_' or '-' (at most 64, not starting with a dot)",
        )
    return name


def sessions_dir() -> Path:
    return config.paths().sessions_dir


def session_path(name: str) -> Path:
    return sessions_dir() / f"{check_name(name)}{SUFFIX}"


# -- atomic files ---------------------------------------------------------------


def atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` to `path` via a temp file in the same folder + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- model identity -------------------------------------------------------------


def _hash_cache_path() -> Path:
    return config.paths().data_dir / "model_hashes.json"


def model_identity(model_path: Path) -> dict[str, Any]:
    """Path, size and SHA-256 of a model file; the hash is computed once and cached
    (keyed by path, size and modification time)."""
    resolved = model_path.resolve()
    stat = resolved.stat()
    key = str(resolved)
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        digest = entry["sha256"]
    else:
        sha = hashlib.sha256()
        with resolved.open("rb") as fh:
            while block := fh.read(_HASH_CHUNK):
                sha.update(block)
        digest = sha.hexdigest()
        cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        atomic_write(cache_file, [json.dumps(cache, indent=1).encode()])
    return {"path": key, "size": stat.st_size, "sha256": digest}


# -- the container ---------------------------------------------------------------


@dataclass
class SavedSession:
    record: dict[str, Any]
    tokens: list[int]
    state: bytes


def save(path: Path, record: dict[str, Any], tokens: list[int], state: bytes) -> int:
    """Save atomically; returns the file size in bytes."""
    body = json.dumps({**record, "format_version": FORMAT_VERSION}, ensure_ascii=False).encode()
    token_bytes = array("i", tokens)
    if token_bytes.itemsize != 4:  # pragma: no cover - exotic platforms
        raise SessionError("this platform's int is not 32-bit; cannot save sessions")
    token_raw = token_bytes.tobytes() if sys.byteorder == "little" else _swap(token_bytes)
    parts = [
        MAGIC,
        _U32.pack(FORMAT_VERSION),
        _U64.pack(len(body)),
        body,
        _U64.pack(len(token_raw)),
        token_raw,
        _U64.pack(len(state)),
        state,
    ]
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part)
    parts.append(sha.digest())
    atomic_write(path, parts)
    return sum(len(p) for p in parts)


def _swap(values: array) -> bytes:  # pragma: no cover - big-endian hosts
    copy = array("i", values)
    copy.byteswap()
    return copy.tobytes()


def _read_exact(fh: IO[bytes], n: int, remaining: int, what: str, path: Path) -> bytes:
    if n > remaining:
        raise SessionError(f"session file {path} is truncated or corrupt ({what})", hint=_DAMAGED_HINT)
    data = fh.read(n)
    if len(data) != n:
        raise SessionError(f"session file {path} is truncated ({what})", hint=_DAMAGED_HINT)
    return data


_DAMAGED_HINT = "remove it with `kvchat sessions rm NAME` and start again"


def load(path: Path, *, with_state: bool = True) -> SavedSession:
    """Read and verify a session file; never returns anything from a damaged one."""
    try:
        size = path.stat().st_size
        fh = path.open("rb")
    except FileNotFoundError:
        raise SessionError(
            f"no session named '{path.stem}'", hint="see `kvchat sessions list`"
        ) from None
    with fh:
        sha = hashlib.sha256()
        remaining = size - 32

        def take(n: int, what: str) -> bytes:
            nonlocal remaining
            data = _read_exact(fh, n, remaining, what, path)
            remaining -= n
            sha.update(data)
            return data

        if take(len(MAGIC), "header") != MAGIC:
            raise SessionError(f"{path} is not a kvchat session file", hint=_DAMAGED_HINT)
        (version,) = _U32.unpack(take(4, "version"))
        if version != FORMAT_VERSION:
            raise SessionError(
                f"session file {path} has format version {version}; this kvchat reads "
                f"version {FORMAT_VERSION}",
                hint="use the kvchat version that wrote it, or start a new session",
            )
        (n_body,) = _U64.unpack(take(8, "record length"))
        body = take(n_body, "record")
        (n_tokens,) = _U64.unpack(take(8, "token length"))
        token_raw = take(n_tokens, "tokens")
        (n_state,) = _U64.unpack(take(8, "state length"))
        if with_state:
            state = take(n_state, "KV state")
        else:
            # Listing: skip the state, trust lengths only (nothing is loaded from it).
            if n_state > remaining:
                raise SessionError(f"session file {path} is truncated (KV state)", hint=_DAMAGED_HINT)
            fh.seek(n_state, os.SEEK_CUR)
            remaining -= n_state
            state = b""
        if remaining != 0:
            raise SessionError(f"session file {path} has trailing data", hint=_DAMAGED_HINT)
        digest = fh.read(32)
        if with_state and digest != sha.digest():
            raise SessionError(f"session file {path} is corrupt (checksum mismatch)", hint=_DAMAGED_HINT)
    try:
        record = json.loads(body)
    except ValueError:
        raise SessionError(f"session file {path} has an unreadable record", hint=_DAMAGED_HINT) from None
    tokens = array("i")
    tokens.frombytes(token_raw)
    if sys.byteorder != "little":  # pragma: no cover
        tokens.byteswap()
    return SavedSession(record, tokens.tolist(), state)


# -- locks ---------------------------------------------------------------------------


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the session's lock for the life of the block (one process at a time)."""
    lock_path = session_path(name).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise SessionError(
                f"session '{name}' is in use by another kvchat process (pid {holder})",
                hint="close that one first, or pick another --session name",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


# -- listing -------------------------------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    name: str
    path: Path
    size: int
    updated: float
    model: str
    n_ctx: int
    n_kv: int
    turns: int


def context_cells(record: dict[str, Any]) -> int:
    """The context a record's n_kv is measured against: the cells llama.cpp made (older
    records only have the n_ctx that was asked for)."""
    return int(record.get("n_ctx_cells") or record["settings"]["n_ctx"])


def list_sessions() -> list[SessionInfo]:
    from kvchat.registry import model_name

    infos = []
    folder = sessions_dir()
    if not folder.is_dir():
        return []
    names: dict[str, str] = {}
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            saved = load(path, with_state=False)
        except SessionError:
            infos.append(SessionInfo(path.stem, path, path.stat().st_size, path.stat().st_mtime,
                                     "(damaged)", 0, 0, 0))
            continue
        rec = saved.record
        model_path = rec["model"]["path"]
        if model_path not in names:
            names[model_path] = model_name(Path(model_path))
        infos.append(
            SessionInfo(
                name=path.stem,
                path=path,
                size=path.stat().st_size,
                updated=rec.get("updated", path.stat().st_mtime),
                model=names[model_path],
                n_ctx=context_cells(rec),
                n_kv=rec["n_kv"],
                turns=sum(1 for m in rec["messages"] + rec.get("dropped", []) if m["role"] == "user"),
            )
        )
    return infos


def remove(name: str) -> None:
    path = session_path(name)
    if not path.exists():
        raise SessionError(f"no session named '{name}'", hint="see `kvchat sessions list`")
    with locked(name):
        path.unlink()
    with contextlib.suppress(OSError):
        path.with_suffix(".lock").unlink()


# -- recent chats ------------------------------------------------------------------
#
# An unnamed chat is kept as a session named `auto-YYYYMMDD-HHMMSS` (saved after each
# reply like a named one), so that no conversation is lost quietly; only the newest
# `recent_chats` of them are kept. They are ordinary sessions: `sessions list`,
# `/load`, `export` and `rm` work on them, and `chat --continue` resumes the newest.

RECENT_PREFIX = "auto-"


def recent_name(now: float, taken: Iterable[str] = ()) -> str:
    """A new recent chat's name from the local time; '-2', '-3'… if that second is taken."""
    import time as _time

    base = RECENT_PREFIX + _time.strftime("%Y%m%d-%H%M%S", _time.localtime(now))
    used = set(taken) | {p.stem for p in _recent_paths()}
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}-{n}"
    return name


def is_recent(name: str | None) -> bool:
    return bool(name) and str(name).startswith(RECENT_PREFIX)


def _recent_paths() -> list[Path]:
    """Recent chats' files, oldest first (by the time they were last saved)."""
    folder = sessions_dir()
    if not folder.is_dir():
        return []
    paths = [p for p in folder.glob(f"{RECENT_PREFIX}*{SUFFIX}") if p.is_file()]
    return sorted(paths, key=lambda p: (p.stat().st_mtime, p.name))


def latest_recent() -> str | None:
    """The name of the recent chat saved last, or None."""
    paths = _recent_paths()
    return paths[-1].stem if paths else None


def prune_recent(keep: int) -> list[str]:
    """Delete the oldest recent chats beyond `keep`; one in use by a process is skipped.
    Returns the names deleted."""
    paths = _recent_paths()
    removed = []
    for path in paths[: max(len(paths) - max(keep, 0), 0)]:
        try:
            remove(path.stem)
        except SessionError:  # in use, or gone meanwhile
            continue
        removed.append(path.stem)
    return removed
