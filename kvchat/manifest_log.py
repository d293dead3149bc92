"""A conversation's manifest on disk as a log, so that a turn's save appends what
the turn changed instead of rewriting the history.

A manifest (kvchat.kv_files.Manifest) holds a conversation's record, every token
of its history, its chain of blocks and an extra blob (checkpoints). Rewritten
whole at every save it cost a turn 4 bytes per token of history for the tokens
and about as much again for the transcript, twice (the messages and the KV text):
at 16k tokens of SmolLM2 ~190 KB and a millisecond or two of encoding, per turn,
growing with the history. Written as a log, a save appends one *frame* holding
only what changed since the frame before: the tokens after the part kept, the
chain's new links, the record's fields that changed (a list or a text that kept
its start: only what it gained), the extra blob when it changed.

    file     MAGIC, u32 version (2), frames
    frame    u64 length, payload, SHA-256(the previous frame's digest, payload)
    payload  length-prefixed sections: header JSON, record delta JSON, tokens
             gained (int32), extra (when the header says it changed)

The first frame is relative to nothing: a whole manifest. The digests are chained
(the first from the file's magic and version), so a frame belongs to its place.

Durability. A whole manifest is written atomically (temp file, fsync, rename,
fsync of the folder: kvchat.atomic_file). An append is one write at the end of
the last whole frame, then an fsync: a SIGKILL leaves a prefix of the frame,
which readers ignore (a frame that does not reach its end, or the last frame
failing its checksum, is an append that never finished): the manifest read is
the previous one, whole, and the blocks it names were all written before it. The
writer cuts such a tail off before its next append. A damaged frame followed by
others is damage, and refused. An append happens only while the file is the one
the writer last read or wrote (same inode, same size: another writer's append or
rewrite sends this save back to a whole write), under an flock on the file.

A save writes the manifest whole instead of appending when there is no log to
continue (a new conversation, a version-1 file, a changed fingerprint) and when
the log's frames after the first would outgrow the first (or 64 KiB, or 256
frames): each byte of history is then rewritten about once on average, and a
read replays a bounded log.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvchat import kv_files
from kvchat.errors import SessionError
from kvchat.kv_files import BlockError, Link, LogState, Manifest, chained, token_bytes, tokens_from
from kvchat.sequences import common_prefix

LOG_VERSION = 2
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HASH = 32
_HEAD = kv_files.MANIFEST_MAGIC + _U32.pack(LOG_VERSION)
# The log is written whole again when its appended frames outgrow the first one by
# this much, or number this many.
_SLACK = 64 * 1024
_MAX_FRAMES = 256
# The write that appends a frame: tests replace it to die halfway through one.
_pwrite = os.pwrite


# -- the record's deltas ------------------------------------------------------------------


def record_delta(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What turns `old` into `new`: fields set whole ("set"), lists and texts that kept
    a start and gained an end ("grow": field -> [kept, gained]), fields gone ("drop").
    Compared by value (C-speed slice compares): `new` may share lists with a live
    conversation, and what the delta holds is what they were now."""
    put: dict[str, Any] = {}
    grow: dict[str, Any] = {}
    for key, value in new.items():
        if key not in old:
            put[key] = value
            continue
        was = old[key]
        if type(value) is type(was) and isinstance(value, (list, str)):
            kept = common_prefix(was, value)
            if kept == len(was) == len(value):
                continue
            if kept:
                grow[key] = [kept, value[kept:]]
            else:
                put[key] = value
        elif was != value or type(was) is not type(value):
            put[key] = value
    return {"set": put, "grow": grow, "drop": [key for key in old if key not in new]}


def apply_delta(old: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """`old` changed by `delta` (record_delta's, as JSON gave it back): a new dict, `old`
    untouched. Raises ValueError when the delta does not fit `old`."""
    put, grow, drop = delta["set"], delta["grow"], delta["drop"]
    if not (isinstance(put, dict) and isinstance(grow, dict) and isinstance(drop, list)):
        raise ValueError("malformed record delta")
    new = {key: value for key, value in old.items() if key not in drop}
    new.update(put)
    for key, (kept, gained) in grow.items():
        was = new.get(key)
        if not (isinstance(kept, int) and isinstance(was, (list, str)) and 0 < kept <= len(was)):
            raise ValueError(f"record delta does not fit its field {key!r}")
        if isinstance(was, str) and isinstance(gained, str):
            new[key] = "".join((was[:kept], gained))
        elif isinstance(was, list) and isinstance(gained, list):
            new[key] = [*was[:kept], *gained]
        else:
            raise ValueError(f"record delta does not fit its field {key!r}")
    return new


def kept_items(delta: Mapping[str, Any], old: Mapping[str, Any], key: str) -> int:
    """How many leading items of the field `key` the delta carried over from `old`."""
    if key in delta["set"] or key not in old:
        return 0
    if key in delta["grow"]:
        return int(delta["grow"][key][0])
    return len(old[key])


# -- frames ---------------------------------------------------------------------------


def _payload(manifest: Manifest, previous: Manifest | None, delta_json: bytes) -> bytes:
    """The frame that turns `previous` (None: nothing) into `manifest`; `delta_json`:
    the record's delta from `previous.record` ({} without one)."""
    if previous is None:
        kept_tokens = kept_links = 0
        extra = True
        header: dict[str, Any] = {"kind": manifest.kind, "name": manifest.name,
                                  "fingerprint": manifest.fingerprint}
    else:
        kept_tokens = common_prefix(previous.tokens, manifest.tokens)
        kept_links = common_prefix(previous.chain, manifest.chain)
        extra = previous.extra != manifest.extra
        header = {}
    header.update({
        "n_tokens": len(manifest.tokens), "kept_tokens": kept_tokens, "kept_links": kept_links,
        "links": [[x.key, x.start, x.end, x.kind] for x in manifest.chain[kept_links:]],
        "extra": extra, "created": manifest.created, "updated": manifest.updated,
    })
    return b"".join(kv_files.framed([json.dumps(header).encode(), delta_json,
                                     token_bytes(manifest.tokens[kept_tokens:]),
                                     manifest.extra if extra else b""]))


def _frame(payload: bytes, digest: bytes) -> tuple[bytes, bytes]:
    """The frame of `payload` after a frame of digest `digest`, and its own digest."""
    sha = hashlib.sha256(digest)
    sha.update(payload)
    own = sha.digest()
    return _U64.pack(len(payload)) + payload + own, own


def _apply(state: Manifest | None, payload: memoryview, kind: str, name: str) -> Manifest:
    """The manifest a frame makes of `state` (None: the first frame)."""
    header_raw, delta_raw, token_raw, extra = kv_files.split_sections(
        payload, 0, len(payload), 4, f"'{name}'")
    header = json.loads(bytes(header_raw))
    kept_tokens, kept_links = int(header["kept_tokens"]), int(header["kept_links"])
    links = [Link(str(k), int(a), int(b), str(t)) for k, a, b, t in header["links"]]
    delta = json.loads(bytes(delta_raw))
    if state is None:
        if kept_tokens or kept_links:
            raise ValueError("a first frame keeps nothing")
        state = Manifest(kind, name, str(header["fingerprint"]), {}, [], [])
    if not (0 <= kept_tokens <= len(state.tokens) and 0 <= kept_links <= len(state.chain)):
        raise ValueError("a frame keeps more than there is")
    # In place: the replay owns `state` (a 16k-token history copied per frame would
    # cost a read of a long log milliseconds).
    del state.tokens[kept_tokens:], state.chain[kept_links:]
    state.tokens.extend(tokens_from(token_raw))
    state.chain.extend(links)
    if len(state.tokens) != header["n_tokens"]:
        raise ValueError("token count")
    state.record = apply_delta(state.record, delta)
    if header["extra"]:
        state.extra = bytes(extra)
    state.created, state.updated = float(header["created"]), float(header["updated"])
    return state


def _replay(data: bytes, inode: int, kind: str, name: str) -> Manifest:
    """The manifest a log holds: its frames applied in order, up to a torn append."""
    view = memoryview(data)
    digest = hashlib.sha256(_HEAD).digest()
    at, frames, snapshot = len(_HEAD), 0, 0
    state: Manifest | None = None
    while at < len(view):
        end = at + 8 + (_U64.unpack(view[at : at + 8])[0] if at + 8 <= len(view) else len(view)) + _HASH
        if end > len(view):
            break  # an append that never finished
        sha = hashlib.sha256(digest)
        sha.update(view[at + 8 : end - _HASH])
        if sha.digest() != bytes(view[end - _HASH : end]):
            if frames and end == len(view):
                break  # the last append's write did not finish as a whole
            raise BlockError(f"'{name}' is damaged (checksum mismatch)")
        state = _apply(state, view[at + 8 : end - _HASH], kind, name)
        digest, at, frames = sha.digest(), end, frames + 1
        snapshot = snapshot or at
    if state is None:
        raise BlockError(f"'{name}' is damaged (no whole frame)")
    state.log = LogState(inode, at, len(view), digest, frames, snapshot)
    return state


# -- reading and writing ----------------------------------------------------------------


def read(path: Path, kind: str, name: str) -> Manifest:
    """The manifest at `path` (a log, or a file of format 1), checked."""
    try:
        with path.open("rb") as fh:
            inode = os.fstat(fh.fileno()).st_ino
            data = fh.read()
    except FileNotFoundError:
        raise SessionError(f"no saved conversation '{name}'", hint="see `kvchat sessions list`") from None
    except OSError as exc:
        raise SessionError(f"cannot read {path}: {exc.strerror or exc}",
                           hint="check the folder's permissions") from None
    try:
        if data.startswith(_HEAD):
            manifest = _replay(data, inode, kind, name)
        elif data.startswith(kv_files.MANIFEST_MAGIC):
            manifest = kv_files.parse_manifest_v1(data, kind, name)
        else:
            raise BlockError(f"'{name}' is not a kvchat manifest")
    except BlockError as exc:
        raise SessionError(str(exc), hint="remove it with `kvchat sessions rm NAME`") from None
    except (ValueError, KeyError, TypeError, IndexError, struct.error, RecursionError):
        raise SessionError(f"saved conversation '{name}' has an unreadable header",
                           hint="remove it with `kvchat sessions rm NAME`") from None
    if not isinstance(manifest.record, dict) or manifest.covered > len(manifest.tokens) \
            or not chained(manifest.chain):
        raise SessionError(f"saved conversation '{name}' is inconsistent",
                           hint="remove it with `kvchat sessions rm NAME`")
    return manifest


def write(path: Path, manifest: Manifest, previous: Manifest | None, delta_json: bytes) -> int:
    """Put `manifest` at `path`: one frame appended to `previous`'s log where the file
    is still that log and the log is not due to be written whole, else the whole
    manifest (`delta_json`: the record's delta from `previous.record`, or from {} when
    `previous` is None). Sets `manifest.log`; returns bytes written."""
    log = previous.log if previous is not None else None
    if log is not None and previous is not None and previous.fingerprint == manifest.fingerprint \
            and log.frames < _MAX_FRAMES:
        frame, digest = _frame(_payload(manifest, previous, delta_json), log.digest)
        if log.size + len(frame) - log.snapshot <= max(log.snapshot, _SLACK) and _append(path, log, frame):
            manifest.log = LogState(log.inode, log.size + len(frame), log.size + len(frame), digest,
                                    log.frames + 1, log.snapshot)
            return len(frame)
    if previous is not None:  # written whole: the record relative to nothing
        delta_json = json.dumps(record_delta({}, manifest.record), ensure_ascii=False).encode()
    frame, digest = _frame(_payload(manifest, None, delta_json), hashlib.sha256(_HEAD).digest())
    n = kv_files.write_file(path, [_HEAD, frame])
    manifest.log = LogState(os.stat(path).st_ino, n, n, digest, 1, n)
    return n


def _append(path: Path, log: LogState, frame: bytes) -> bool:
    """Append `frame` where `log` ends, if the file is still that log (False: it is not;
    the caller writes the manifest whole)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        st = os.fstat(fd)
        if st.st_ino != log.inode or st.st_size != log.seen or os.stat(path).st_ino != st.st_ino:
            return False
        if st.st_size != log.size:
            os.ftruncate(fd, log.size)  # a torn append's tail
        done = 0
        while done < len(frame):
            done += _pwrite(fd, frame[done:], log.size + done)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)
