"""Checkpoints at turn boundaries: snapshots of a sequence (kvchat.engine_api.Checkpoint)
for memory that cannot roll back by removing cells (sliding-window, recurrent and
hybrid), each with the digest of the token prefix it stands for, and their
encoding in a saved session."""

from __future__ import annotations

import hashlib
import struct
from array import array
from dataclasses import dataclass

from kvchat.engine_api import Checkpoint


def history_digest(tokens: list[int]) -> bytes:
    return hashlib.blake2b(array("i", tokens).tobytes(), digest_size=16).digest()


@dataclass
class SavedCheckpoint:
    """A checkpoint and the digest of the token prefix it stands for."""

    checkpoint: Checkpoint
    digest: bytes

    @property
    def n_tokens(self) -> int:
        return self.checkpoint.n_tokens


_CHECKPOINT_HEAD = struct.Struct("<IB16sQ")  # n_tokens, partial, digest, data length
PERSISTED_CHECKPOINTS = 2  # a named session keeps what rewinding its last exchange needs


def encode_checkpoints(checkpoints: list[SavedCheckpoint]) -> bytes:
    """Checkpoints as bytes for a session file (kvchat.session_store)."""
    parts = [struct.pack("<I", len(checkpoints))]
    for saved in checkpoints:
        cp = saved.checkpoint
        parts.append(_CHECKPOINT_HEAD.pack(cp.n_tokens, cp.partial, saved.digest, cp.size))
        parts.append(cp.data)
    return b"".join(parts)


def decode_checkpoints(blob: bytes) -> list[SavedCheckpoint]:
    """The inverse of encode_checkpoints; [] for an empty or malformed blob (they
    are an optimisation: without them an undo re-evaluates, and says so)."""
    if len(blob) < 4:
        return []
    (count,) = struct.unpack_from("<I", blob)
    at, out = 4, []
    for _ in range(count):
        if at + _CHECKPOINT_HEAD.size > len(blob):
            return []
        n_tokens, partial, digest, size = _CHECKPOINT_HEAD.unpack_from(blob, at)
        at += _CHECKPOINT_HEAD.size
        if at + size > len(blob):
            return []
        out.append(SavedCheckpoint(Checkpoint(n_tokens, blob[at : at + size], bool(partial)), digest))
        at += size
    return out


def with_checkpoint(checkpoints: list[SavedCheckpoint], taken: SavedCheckpoint, max_count: int,
                    max_mib: float) -> list[SavedCheckpoint]:
    """`checkpoints` with `taken` in its place (by position; one at the same position
    goes), oldest dropped first past `max_count` or `max_mib` MiB in all."""
    kept = [c for c in checkpoints if c.n_tokens != taken.n_tokens] + [taken]
    kept.sort(key=lambda c: c.n_tokens)
    budget = max_mib * 1024 * 1024
    while kept and (len(kept) > max_count or sum(c.checkpoint.size for c in kept) > budget):
        kept.pop(0)
    return kept
