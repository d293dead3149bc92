"""The KV store's files: block keys, blocks and manifests (kvchat.kv_store uses them).

Every file is sealed (magic, format version, length-prefixed sections, SHA-256 of
all before) and written atomically: temp file, fsync, rename, fsync of the folder.

    block     MAGIC, version, JSON header (key, start, end, kind, fingerprint),
              tokens [start, end) (int32), the sequence state of those cells
              (kind "range"; "whole": a state not cut by position; "parts": a
              prefix-cache segment of a sliding-window model, kvchat.prefix_store)
    manifest  MAGIC, version, JSON header (kind, name, fingerprint, chain, times,
              n_tokens), record JSON, all tokens (int32), extra (checkpoints)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvchat.atomic_file import Chunk, atomic_write
from kvchat.errors import KvchatError, SessionError

BLOCK_MAGIC = b"KVCHATBLOCK\n"
MANIFEST_MAGIC = b"KVCHATMANIFEST\n"
FORMAT_VERSION = 1
RANGE, WHOLE = "range", "whole"
# Manifest kinds: named sessions (never evicted) and recent chats.
SESSION, RECENT = "session", "recent"
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
        if fp_digest == self._fp and n <= limit and list(tokens[:n]) == self._tokens:
            return self._sha.copy(), n
        return hashlib.sha256(fp_digest), 0

    def keep(self, fp_digest: bytes, tokens: Sequence[int], n: int, sha: Any) -> None:
        self._fp, self._tokens, self._sha = fp_digest, list(tokens[:n]), sha.copy()


@dataclass(frozen=True)
class Link:
    """One block of a chain."""

    key: str
    start: int
    end: int
    kind: str = RANGE


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

    @property
    def covered(self) -> int:
        """Positions the chain restores (the tokens after that are re-evaluated)."""
        return self.chain[-1].end if self.chain else 0


def write_file(path: Path, chunks: Sequence[Chunk]) -> int:
    """Write `chunks` to `path` atomically (temp, fsync, rename, fsync folder)."""
    return atomic_write(path, chunks, publish=lambda tmp, target: _rename(tmp, target))


def _sealed(magic: bytes, sections: Sequence[Chunk]) -> list[Chunk]:
    chunks: list[Chunk] = [magic, _U32.pack(FORMAT_VERSION)]
    for section in sections:
        chunks += [_U64.pack(len(section)), section]
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
    at, out = len(magic) + 4, []
    for _ in range(n_sections):
        if at + 8 > len(view) - _HASH:
            raise BlockError(f"{what} is inconsistent")
        (n,) = _U64.unpack(view[at : at + 8])
        out.append(view[at + 8 : at + 8 + n])
        at += 8 + n
    if at != len(view) - _HASH:
        raise BlockError(f"{what} is inconsistent")
    return out


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


def write_manifest(path: Path, manifest: Manifest) -> int:
    header = json.dumps({
        "kind": manifest.kind, "name": manifest.name, "fingerprint": manifest.fingerprint,
        "chain": [[x.key, x.start, x.end, x.kind] for x in manifest.chain],
        "n_tokens": len(manifest.tokens), "created": manifest.created, "updated": manifest.updated,
    }).encode()
    record = json.dumps(manifest.record, ensure_ascii=False).encode()
    return write_file(path, _sealed(MANIFEST_MAGIC, [header, record, token_bytes(manifest.tokens),
                                                     manifest.extra]))


def read_manifest(path: Path, kind: str, name: str) -> Manifest:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SessionError(f"no saved conversation '{name}'", hint="see `kvchat sessions list`") from None
    except OSError as exc:
        raise SessionError(f"cannot read {path}: {exc.strerror or exc}",
                           hint="check the folder's permissions") from None
    try:
        header_raw, record_raw, token_raw, extra = _unseal(data, MANIFEST_MAGIC, 4, f"'{name}'")
        header = json.loads(bytes(header_raw))
        chain = [Link(str(k), int(a), int(b), str(t)) for k, a, b, t in header["chain"]]
        manifest = Manifest(kind, name, str(header["fingerprint"]), json.loads(bytes(record_raw)),
                            tokens_from(token_raw), chain, bytes(extra),
                            float(header["created"]), float(header["updated"]))
    except BlockError as exc:
        raise SessionError(str(exc), hint="remove it with `kvchat sessions rm NAME`") from None
    except (ValueError, KeyError, TypeError):
        raise SessionError(f"saved conversation '{name}' has an unreadable header",
                           hint="remove it with `kvchat sessions rm NAME`") from None
    if not isinstance(manifest.record, dict) or len(manifest.tokens) != header["n_tokens"] \
            or manifest.covered > len(manifest.tokens) or not chained(chain):
        raise SessionError(f"saved conversation '{name}' is inconsistent",
                           hint="remove it with `kvchat sessions rm NAME`")
    return manifest


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
