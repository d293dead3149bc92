"""Saves written in the background: the conversation's state is read when the save
is asked for (the cells new since the last save, a few milliseconds), and the files
are written on a thread while the next prompt is already up.

One write at a time, in order: a new save, leaving, loading another conversation
wait for the one in flight (KvStore.commit keeps each write SIGKILL-safe: the
previous manifest and its blocks stay whole until the new manifest is durable).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvchat.errors import KvchatError, SessionError

# How long a wait stays silent before the caller is told (a "saving…" line).
NOTICE_AFTER_S = 0.3


class SaveWriter:
    """Runs save jobs on a background thread, one after the other."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: KvchatError | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` after the write in flight (whose error, if any, is raised here
        first; `job` is then not run)."""
        self.wait()

        def run() -> None:
            try:
                job()
            except KvchatError as exc:
                self._error = exc
            except OSError as exc:  # a write the store did not explain (a folder gone)
                self._error = SessionError(f"could not save: {exc.strerror or exc}",
                                           hint="check the data folder's space and permissions")

        # Not a daemon: a process that exits with a write in flight finishes it first.
        self._thread = threading.Thread(target=run, name="kvchat-save")
        self._thread.start()

    def wait(self, notice: Callable[[], None] | None = None) -> None:
        """Until the write in flight is durable; `notice` is called once if that takes
        longer than NOTICE_AFTER_S. Raises the write's error, once."""
        thread = self._thread
        if thread is not None:
            thread.join(NOTICE_AFTER_S)
            if thread.is_alive():
                if notice is not None:
                    notice()
                thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
