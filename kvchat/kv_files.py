"""The KV store's files: block keys, blocks and manifests (kvchat.kv_store uses them).

Every file is sealed (magic, format version, length-prefixed sections, SHA-256 of
all before) and written atomically: temp file, fsync, rename, fsync of the folder.

    block     MAGIC, version, JSON header (key, start, end, kind, fingerprint),
              tokens [start, end) (int32), the sequence state of those cells
              (kind "range"; "whole": a state not cut by position; "parts": a
              prefix-cache segment of a sliding-window model, kvchat.prefix_store)
    manifest  version 2: a log of frames, each what changed since the one before
              (kvchat.manifest_log); version 1 (still read): MAGIC, version, JSON
              header (kind, name, fingerprint, chain, times, n_tokens), record JSON,
              all tokens (int32), extra (checkpoints)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvchat.atomic_file import Chunk, atomic_write
from kvchat.errors import KvchatError

BLOCK_MAGIC = b"KVCHATBLOCK\n"
MANIFEST_MAGIC = b"KVCHATMANIFEST\n"
FORMAT_VERSION = 1
RANGE, WHOLE = "range", "whole"
# Manifest kinds: named sessions (never evicted) and recent chats.
SESSION, RECENT = "session", "recent"
# Recent manifests so named are `kvchat serve`'s conversations, not chats: `sessions
# list` and `--continue` leave them out; usage counts them apart (SERVED).
SERVED_PREFIX = "serve-"
SERVED = "served"


def group_of(kind: str, name: str) -> str:
    """What a manifest counts as in the store's usage: its kind, or SERVED."""
    return SERVED if kind == RECENT and name.startswith(SERVED_PREFIX) else kind
BLOCK_SUFFIX = ".kvb"
# Saves hold it shared, collection (deleting blocks) exclusively: kvchat.kv_store.
STORE_LOCK = "store.lock"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HASH = 32
# The rename that publishes a file: tests replace it to kill a save between writes.
_rename = os.replace


class BlockError(KvchatError):
    """A block that is damaged, missing or not the one asked for."""


def block_path(root: Path, key: str) -> Path:
    """Where the store under `root` keeps the block `key`."""
    return Path(block_file(str(root), key))


def block_file(root: str, key: str) -> str:
    """block_path as a string, built without pathlib (a save checks every kept block)."""
    return f"{root}/blocks/{key[:2]}/{key}{BLOCK_SUFFIX}"


def token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("i", tokens)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def block_keys(fp_digest: bytes, tokens: Sequence[int], spans: Sequence[tuple[int, int]],
               kind: str = RANGE, memo: PrefixHash | None = None) -> list[str]:
    """The key of each span [start, end) of `tokens`, spans in increasing end order.

    SHA-256 of the fingerprint, the token ids 0..end, then kind, start and end:
    the trailer fixes the length, so no two (tokens, span) pairs hash the same
    input. The token prefix is hashed once for all spans, and with `memo` once for
    all saves of a conversation: only the tokens after the last save's are hashed."""
    sha, done = memo.resume(fp_digest, tokens, spans[0][1]) if memo is not None and spans \
        else (hashlib.sha256(fp_digest), 0)
    keys = []
    for start, end in spans:
        sha.update(token_bytes(tokens[done:end]))
        done = end
        final = sha.copy()
        final.update(kind.encode() + struct.pack("<QQ", start, end))
        keys.append(final.hexdigest())
    if memo is not None:
        memo.keep(fp_digest, tokens, done, sha)
    return keys


class PrefixHash:
    """The SHA-256 state of a fingerprint and a token prefix, kept between a
    conversation's saves: a block's key hashes every token before its end, and
    hashing the whole history again at every save costs a 16k-token chat a
    millisecond or two (the list's conversion to bytes)."""

    def __init__(self) -> None:
        self._fp = b""
        self._tokens: list[int] = []
        self._sha = hashlib.sha256()

    def resume(self, fp_digest: bytes, tokens: Sequence[int], limit: int) -> tuple[Any, int]:
        """A hash of the fingerprint and tokens[:done] for the largest `done` <= limit
        known, and `done` (a fresh hash and 0 when the kept prefix is not theirs)."""
        n = len(self._tokens)
        if fp_digest == self._fp and n <= limit and _listed(tokens[:n]) == self._tokens:
            return self._sha.copy(), n
        return hashlib.sha256(fp_digest), 0

    def keep(self, fp_digest: bytes, tokens: Sequence[int], n: int, sha: Any) -> None:
        self._fp, self._tokens, self._sha = fp_digest, _listed(tokens[:n]), sha.copy()


def _listed(tokens: Sequence[int]) -> list[int]:
    """A list's slice as it is (already a copy), anything else as a list."""
    return tokens if isinstance(tokens, list) else list(tokens)


@dataclass(frozen=True)
class Link:
    """One block of a chain."""

    key: str
    start: int
    end: int
    kind: str = RANGE


@dataclass(frozen=True)
class LogState:
    """Where a manifest's log ended when it was last read or written: what the next
    save appends to (kvchat.manifest_log), when the file is still that one."""

    inode: int
    size: int  # bytes of whole frames
    seen: int  # the file's size then (more than `size`: a torn append after them)
    digest: bytes  # the last frame's chained digest
    frames: int
    snapshot: int  # bytes of the file's first frame (a whole manifest), magic included


@dataclass
class Manifest:
    kind: str
    name: str
    fingerprint: str  # hex digest
    record: dict[str, Any]
    tokens: list[int]
    chain: list[Link]
    extra: bytes = b""
    created: float = 0.0
    updated: float = 0.0
    log: LogState | None = field(default=None, compare=False, repr=False)

    @property
    def covered(self) -> int:
        """Positions the chain restores (the tokens after that are re-evaluated)."""
        return self.chain[-1].end if self.chain else 0


def write_file(path: Path, chunks: Sequence[Chunk]) -> int:
    """Write `chunks` to `path` atomically (temp, fsync, rename, fsync folder)."""
    return atomic_write(path, chunks, publish=lambda tmp, target: _rename(tmp, target))


def framed(sections: Sequence[Chunk]) -> list[Chunk]:
    """Each section preceded by its length (u64)."""
    chunks: list[Chunk] = []
    for section in sections:
        chunks += [_U64.pack(len(section)), section]
    return chunks


def split_sections(view: memoryview, at: int, stop: int, n_sections: int, what: str) -> list[memoryview]:
    """The `n_sections` length-prefixed sections filling view[at:stop] exactly."""
    out = []
    for _ in range(n_sections):
        if at + 8 > stop:
            raise BlockError(f"{what} is inconsistent")
        (n,) = _U64.unpack(view[at : at + 8])
        if at + 8 + n > stop:
            raise BlockError(f"{what} is inconsistent")
        out.append(view[at + 8 : at + 8 + n])
        at += 8 + n
    if at != stop:
        raise BlockError(f"{what} is inconsistent")
    return out


def _sealed(magic: bytes, sections: Sequence[Chunk]) -> list[Chunk]:
    chunks: list[Chunk] = [magic, _U32.pack(FORMAT_VERSION), *framed(sections)]
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
    chunks.append(sha.digest())
    return chunks


def _unseal(data: bytes, magic: bytes, n_sections: int, what: str) -> list[memoryview]:
    view = memoryview(data)
    if len(view) < len(magic) + 4 + _HASH or bytes(view[: len(magic)]) != magic:
        raise BlockError(f"{what} is not a kvchat KV store file")
    if hashlib.sha256(view[:-_HASH]).digest() != bytes(view[-_HASH:]):
        raise BlockError(f"{what} is damaged (checksum mismatch)")
    (version,) = _U32.unpack(view[len(magic) : len(magic) + 4])
    if version != FORMAT_VERSION:
        raise BlockError(f"{what} has format version {version}, not {FORMAT_VERSION}")
    return split_sections(view, len(magic) + 4, len(view) - _HASH, n_sections, what)


def tokens_from(raw: memoryview | bytes) -> list[int]:
    arr = array("i")
    arr.frombytes(raw)
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr.tolist()


def write_block(path: Path, link: Link, fingerprint: str, tokens: Sequence[int],
                state: bytes | bytearray) -> int:
    """Write one block (tokens: its own, [start, end)); returns bytes written."""
    header = json.dumps({"key": link.key, "start": link.start, "end": link.end,
                         "kind": link.kind, "fingerprint": fingerprint}).encode()
    return write_file(path, _sealed(BLOCK_MAGIC, [header, token_bytes(tokens), state]))


def read_block(path: Path, link: Link, tokens: Sequence[int], fingerprint: str | None = None) -> bytes:
    """The state a block holds, verified: checksum, span, its tokens equal to
    tokens[start:end] (the caller's whole token list) and, when given, the
    fingerprint it was written under. Marks the block used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BlockError(f"block {link.key[:12]} cannot be read: {exc.strerror or exc}") from None
    header_raw, token_raw, state = _unseal(data, BLOCK_MAGIC, 3, f"block {link.key[:12]}")
    try:
        header = json.loads(bytes(header_raw))
        span = (header["key"], int(header["start"]), int(header["end"]), header["kind"])
        written_under = header["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise BlockError(f"block {link.key[:12]} has an unreadable header") from None
    if span != (link.key, link.start, link.end, link.kind):
        raise BlockError(f"block {link.key[:12]} holds another span")
    if fingerprint is not None and written_under != fingerprint:
        raise BlockError(f"block {link.key[:12]} was written under another fingerprint")
    if tokens_from(token_raw) != list(tokens[link.start : link.end]):
        raise BlockError(f"block {link.key[:12]} holds other tokens")
    with contextlib.suppress(OSError):
        os.utime(path)  # last use, for least-recently-used eviction
    return bytes(state)


def parse_manifest_v1(data: bytes, kind: str, name: str) -> Manifest:
    """A manifest of format 1 (one sealed file, written before the log): still read,
    rewritten as a log by its next save. Raises BlockError when damaged, ValueError,
    KeyError or TypeError when unreadable."""
    header_raw, record_raw, token_raw, extra = _unseal(data, MANIFEST_MAGIC, 4, f"'{name}'")
    header = json.loads(bytes(header_raw))
    chain = [Link(str(k), int(a), int(b), str(t)) for k, a, b, t in header["chain"]]
    tokens = tokens_from(token_raw)
    if len(tokens) != header["n_tokens"]:
        raise ValueError("token count")
    return Manifest(kind, name, str(header["fingerprint"]), json.loads(bytes(record_raw)), tokens, chain,
                    bytes(extra), float(header["created"]), float(header["updated"]))


def chained(chain: Sequence[Link]) -> bool:
    """Links follow each other from position 0 (a whole block stands alone)."""
    at = 0
    for link in chain:
        if link.start != at or link.end <= link.start or (link.kind == WHOLE and len(chain) != 1):
            return False
        at = link.end
    return True


@dataclass
class BlockHead:
    """What a block says about itself, read without its state (not verified)."""

    key: str
    start: int
    end: int
    kind: str
    fingerprint: str
    tokens: list[int]
    size: int
    mtime: float


def read_block_head(path: Path) -> BlockHead:
    """A block's header and tokens, its state not read: for rebuilding an index
    (kvchat.prefix_store); whatever it names is verified again when read."""
    with path.open("rb") as fh:
        st = os.fstat(fh.fileno())
        head = fh.read(len(BLOCK_MAGIC) + 4 + 8)
        if len(head) < len(BLOCK_MAGIC) + 12 or head[: len(BLOCK_MAGIC)] != BLOCK_MAGIC:
            raise BlockError(f"{path.name} is not a kvchat block")
        (n_header,) = _U64.unpack(head[-8:])
        if n_header > 1 << 16:
            raise BlockError(f"{path.name} has an implausible header")
        try:
            header = json.loads(fh.read(n_header))
            (n_tokens,) = _U64.unpack(fh.read(8))
            if n_tokens > 1 << 28:
                raise ValueError("implausible")
            tokens = tokens_from(fh.read(n_tokens))
            got = BlockHead(str(header["key"]), int(header["start"]), int(header["end"]), str(header["kind"]),
                            str(header["fingerprint"]), tokens, st.st_size, st.st_mtime)
        except (ValueError, KeyError, TypeError, struct.error):
            raise BlockError(f"{path.name} has an unreadable header") from None
    if len(got.tokens) != got.end - got.start:
        raise BlockError(f"{path.name} is inconsistent")
    return got
