"""Session files (`.kvs`), locks and model identity. Sessions live in the KV store
(kvchat.saved_sessions); a `.kvs` file is what kvchat wrote before it, still read,
and the one portable file `sessions export --format kvs` writes and `import` reads.

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
    u64 + bytes         checkpoints (version 2; see kvchat.session.encode_checkpoints)
    32 bytes            SHA-256 of everything above

Version 1 files (no checkpoints section) are still read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import stat
import struct
import sys
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard

from kvchat import config
from kvchat.atomic_file import atomic_write
from kvchat.errors import SessionError, UsageError

MAGIC = b"KVCHATSESSION\n"
FORMAT_VERSION = 2
# The record's lists of items record_problem checks one by one.
LISTS = ("messages", "dropped", "turns")
READABLE_VERSIONS = (1, 2)
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


# -- model identity -------------------------------------------------------------


def _hash_cache_path() -> Path:
    return config.paths().data_dir / "model_hashes.json"


def model_identity(model_path: Path) -> dict[str, Any]:
    """Path, size and SHA-256 of a model file; the hash is computed once and cached
    (keyed by path, size and modification time)."""
    resolved = model_path.resolve()
    st = resolved.stat()
    key = str(resolved)
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        cache = {}
    if not isinstance(cache, dict):  # [] or null: a damaged cache is only a cache
        cache = {}
    entry = cache.get(key)
    if (isinstance(entry, dict) and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns and isinstance(entry.get("sha256"), str)):
        digest = entry["sha256"]
    else:
        sha = hashlib.sha256()
        with resolved.open("rb") as fh:
            while block := fh.read(_HASH_CHUNK):
                sha.update(block)
        digest = sha.hexdigest()
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        with contextlib.suppress(OSError):  # unwritable: hash again next time
            atomic_write(cache_file, [json.dumps(cache, indent=1).encode()])
    return {"path": key, "size": st.st_size, "sha256": digest}


# -- the container ---------------------------------------------------------------


@dataclass
class SavedSession:
    record: dict[str, Any]
    tokens: list[int]
    state: bytes
    checkpoints: bytes = b""


def remove_stale_temps(path: Path) -> int:
    """Delete `.NAME.kvs.*.tmp` files a killed save left behind; returns how many.

    Call it holding the session's lock: no other save of that name is in flight."""
    removed = 0
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def save(path: Path, record: dict[str, Any], tokens: list[int], state: bytes,
         checkpoints: bytes = b"") -> int:
    """Save atomically (the caller holds the lock); returns the file size in bytes.

    A failed write (disk full, permission denied) raises SessionError and leaves the
    previous file as it was; so does a record that `load` would refuse (the loader's
    checks, run on what would be read back): a bad record is never written over a
    good file."""
    body = json.dumps({**record, "format_version": FORMAT_VERSION}, ensure_ascii=False).encode()
    try:
        array("i", tokens)
        problem = record_problem(json.loads(body), tokens)
    except (OverflowError, TypeError):
        problem = "a token id is not a 32-bit integer"
    if problem:
        raise SessionError(
            f"did not save session '{path.stem}': its record is invalid ({problem})"
            + (", the previously saved copy is intact" if path.is_file() else ""),
            hint="a kvchat bug or a misbehaving server; rerun with --debug for details",
        )
    return write_container(path, record, tokens, state, checkpoints)


def write_container(path: Path, record: dict[str, Any], tokens: list[int], state: bytes,
                    checkpoints: bytes = b"") -> int:
    """The file as given, unchecked (`save` checks first): tests write damaged records
    with it to exercise the loader."""
    remove_stale_temps(path)
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
        _U64.pack(len(checkpoints)),
        checkpoints,
    ]
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part)
    parts.append(sha.digest())
    try:
        atomic_write(path, parts)
    except OSError as exc:
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (
            exc.strerror or str(exc))
        raise SessionError(
            f"could not save session '{path.stem}': {reason}"
            + (" (the previously saved copy is intact)" if path.is_file() else ""),
            hint=f"free space or fix permissions in {path.parent}, then send another message to save again",
        ) from exc
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


def load(path: Path, *, with_state: bool = True, verify: bool = True) -> SavedSession:
    """Read and verify a session file; never returns anything from a damaged one.

    Without `with_state` the KV state is hashed in bounded chunks, not kept (show,
    export). `verify=False` skips the state and the checksum, trusting lengths only
    (`sessions list`, which must stay fast over many large files); the record's
    schema is checked either way."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise SessionError(f"{path} is not a session file (a directory or device)",
                               hint="move it out of the sessions folder")
        size = st.st_size
        fh = path.open("rb")
    except FileNotFoundError:
        raise SessionError(
            f"no session named '{path.stem}'", hint="see `kvchat sessions list`"
        ) from None
    except OSError as exc:
        raise SessionError(f"cannot read session file {path}: {exc.strerror or exc}",
                           hint="check its permissions") from None
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
        if version not in READABLE_VERSIONS:
            raise SessionError(
                f"session file {path} has format version {version}; this kvchat reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}",
                hint="use the kvchat version that wrote it, or start a new session",
            )
        (n_body,) = _U64.unpack(take(8, "record length"))
        body = take(n_body, "record")
        (n_tokens,) = _U64.unpack(take(8, "token length"))
        token_raw = take(n_tokens, "tokens")
        (n_state,) = _U64.unpack(take(8, "state length"))
        state = b""
        if with_state:
            state = take(n_state, "KV state")
        elif n_state > remaining:
            raise SessionError(f"session file {path} is truncated (KV state)", hint=_DAMAGED_HINT)
        elif verify:
            left = n_state
            while left:
                take(min(left, _HASH_CHUNK), "KV state")
                left -= min(left, _HASH_CHUNK)
        else:
            fh.seek(n_state, os.SEEK_CUR)
            remaining -= n_state
            state = b""
        checkpoints = b""
        if version >= 2:
            (n_checkpoints,) = _U64.unpack(take(8, "checkpoints length"))
            if with_state:
                checkpoints = take(n_checkpoints, "checkpoints")
            elif n_checkpoints > remaining:
                raise SessionError(f"session file {path} is truncated (checkpoints)", hint=_DAMAGED_HINT)
            elif verify:
                left = n_checkpoints
                while left:
                    take(min(left, _HASH_CHUNK), "checkpoints")
                    left -= min(left, _HASH_CHUNK)
            else:
                fh.seek(n_checkpoints, os.SEEK_CUR)
                remaining -= n_checkpoints
        if remaining != 0:
            raise SessionError(f"session file {path} has trailing data", hint=_DAMAGED_HINT)
        digest = fh.read(32)
        if (verify or with_state) and digest != sha.digest():
            raise SessionError(f"session file {path} is corrupt (checksum mismatch)", hint=_DAMAGED_HINT)
    try:
        record = json.loads(body)
    except (ValueError, RecursionError):
        raise SessionError(f"session file {path} has an unreadable record", hint=_DAMAGED_HINT) from None
    if len(token_raw) % 4:
        raise SessionError(f"session file {path} has a broken token list", hint=_DAMAGED_HINT)
    tokens = array("i")
    tokens.frombytes(token_raw)
    if sys.byteorder != "little":  # pragma: no cover
        tokens.byteswap()
    token_list = tokens.tolist()
    problem = record_problem(record, token_list)
    if problem:
        raise SessionError(f"session file {path} has an invalid record: {problem}", hint=_DAMAGED_HINT)
    return SavedSession(record, token_list, state, checkpoints)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _message_problem(messages: Any, key: str, kept: int = 0) -> str | None:
    if not isinstance(messages, list):
        return f"'{key}' is not a list"
    for i, m in enumerate(messages[kept:], kept):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"{key}[{i}] is not a message with a role and a content"
    return None


def record_problem(record: Any, tokens: list[int], *, kept: Mapping[str, int] | None = None,
                   kept_tokens: int = 0) -> str | None:
    """What is wrong with a session record (None when it can be used): every field
    kvchat reads, its type, and n_kv against the token list. Unknown fields are kept.
    `kept`: for the list fields (LISTS), how many leading items were checked before
    (a save's record carried them over from the last save's); `kept_tokens` likewise."""
    kept = kept or {}
    if not isinstance(record, dict):
        return "not a JSON object"
    model = record.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("path"), str) \
            or not _is_int(model.get("size")) or not isinstance(model.get("sha256"), str):
        return "'model' needs a path, a size and a sha256"
    settings = record.get("settings")
    # n_ctx 0: a server that does not say its context (type_k "server": it decides the cache).
    smallest = 0 if isinstance(settings, dict) and settings.get("type_k") == "server" else 1
    if not isinstance(settings, dict) or not _is_int(settings.get("n_ctx")) or settings["n_ctx"] < smallest \
            or not all(isinstance(settings.get(k), str) for k in ("type_k", "type_v", "flash_attn")):
        return "'settings' needs n_ctx, type_k, type_v and flash_attn"
    for key in ("messages", "dropped"):
        problem = _message_problem(record.get(key, []), key, kept.get(key, 0))
        if problem:
            return problem
    if "messages" not in record:
        return "no 'messages'"
    if not isinstance(record.get("kv_text", ""), str):
        return "'kv_text' is not text"
    turns = record.get("turns", [])
    # A turn mark: where a user turn starts; since format 2 also where its reply starts
    # (reply_token/reply_char, -1 while unknown).
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and {"message", "token", "char"} <= set(t)
        and set(t) <= {"message", "token", "char", "reply_token", "reply_char"}
        and all(_is_int(v) and v >= (-1 if k.startswith("reply_") else 0) for k, v in t.items())
        for t in turns[kept.get("turns", 0):]
    ):
        return "'turns' is not a list of turn marks"
    n_kv = record.get("n_kv")
    if not _is_int(n_kv) or not 0 <= n_kv <= len(tokens):
        return f"n_kv {n_kv!r} does not match its {len(tokens)} tokens"
    cells = record.get("n_ctx_cells")
    if cells is not None and (not _is_int(cells) or cells < 1):
        return "'n_ctx_cells' is not a cell count"
    if n_kv > (cells or settings["n_ctx"]):
        return f"n_kv {n_kv} is more than its context ({cells or settings['n_ctx']})"
    if len(tokens) > kept_tokens and min(tokens[kept_tokens:]) < 0:
        return "a token id is negative"
    for key in ("created", "updated"):
        if key in record and not isinstance(record[key], (int, float)):
            return f"'{key}' is not a time"
    return None


# -- locks ---------------------------------------------------------------------------


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the session's lock for the life of the block (one process at a time)."""
    lock_path = session_path(name).with_suffix(".lock")
    fd = _acquire(name, lock_path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        # Unlinked while still held: a process that opened this file meanwhile
        # notices (its inode is no longer the path's) and retries on a fresh one.
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _acquire(name: str, lock_path: Path) -> int:
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SessionError(f"cannot create the sessions folder {lock_path.parent}: {exc.strerror or exc}",
                           hint="check KVCHAT_HOME and the folder's permissions") from None
    for _ in range(100):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SessionError(f"cannot lock session '{name}' in {lock_path.parent}: {exc.strerror or exc}",
                               hint="check the sessions folder's permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SessionError(
                f"session '{name}' is in use by another kvchat process (pid {holder[:12]})",
                hint="close that one first, or pick another --session name",
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and unlinked it between our open and flock
    raise SessionError(f"could not lock session '{name}'", hint="try again")


# -- names and cells ---------------------------------------------------------------


def model_display_name(model: dict[str, Any]) -> str:
    """A record's model as kvchat names it everywhere (registry.model_name_for); a
    server's model (its path there, or its id) after the server it runs on."""
    from kvchat.registry import model_name_for

    path, server = str(model.get("path", "")), model.get("server")
    if isinstance(server, str) and path.startswith(f"{server} "):
        return f"{model_name_for(path[len(server) + 1:])} on {server}"
    return model_name_for(path)

#
# An unnamed chat is kept as a session named `auto-YYYYMMDD-HHMMSS` (a recent chat;
# listing, pruning and the KV store's manifests: kvchat.saved_sessions).

RECENT_PREFIX = "auto-"


def is_recent(name: str | None) -> bool:
    return bool(name) and str(name).startswith(RECENT_PREFIX)


def context_cells(record: dict[str, Any]) -> int:
    """The context a record's n_kv is measured against: the cells llama.cpp made (older
    records only have the n_ctx that was asked for)."""
    return int(record.get("n_ctx_cells") or record["settings"]["n_ctx"])
