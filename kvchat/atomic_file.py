"""Files kvchat writes whole or not at all: a temp file in the same folder, fsynced,
renamed over the target, and the folder fsynced, so a crash at any moment leaves the
old file or the new one, never half of one. And the lock files that keep processes
from writing the same store at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

Chunk = bytes | bytearray | memoryview


def atomic_write(path: Path, chunks: Iterable[Chunk], *,
                 publish: Callable[[str, Path], None] = os.replace) -> int:
    """Write `chunks` to `path` atomically; returns the bytes written. `publish` is the
    rename that makes the file visible (tests replace it to die between writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    written = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                written += fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return written


@contextlib.contextmanager
def flocked(path: Path, *, exclusive: bool = True, within: float | None = None) -> Iterator[bool]:
    """Hold an flock on `path` (created if missing): shared or exclusive, waiting as
    long as it takes (`within` None), or at most `within` seconds, yielding False
    when it was not free by then (the caller then does without)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if within is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + within
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        yield False
                        return
                    time.sleep(0.01)
        yield True
    finally:
        os.close(fd)
