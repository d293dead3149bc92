"""A transient line on stderr while a one-shot answer is being prepared.

"loading SmolLM2…" while the model loads, then "prefill 1,024/3,000 tokens" on
long prompts; the line is erased when the first token of the answer arrives. It is
drawn only when stderr is a terminal, so pipes and files never see it.
"""

from __future__ import annotations

import itertools
import threading
from types import TracebackType

from kvchat.ui.environment import Environment

_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_INTERVAL_S = 0.1
# Short prompts are done before a counter would be readable: show it from here on.
_PREFILL_SHOWN_FROM = 256


class LoadProgress:
    """A spinner thread writing one `\\r`-rewritten line; `done()` erases it for good."""

    def __init__(self, env: Environment, *, enabled: bool = True) -> None:
        self._stream = env.stderr
        self._active = enabled and env.stderr_isatty
        self._text = "loading the model…"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    def __enter__(self) -> LoadProgress:
        if self._active:
            self._thread = threading.Thread(target=self._spin, name="kvchat-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.done()

    def loaded(self, model_name: str) -> None:
        self._set(f"{model_name}: reading the prompt…")

    def prefill(self, done: int, total: int) -> None:
        if total >= _PREFILL_SHOWN_FROM and done < total:
            self._set(f"prefill {done:,}/{total:,} tokens")

    def say(self, line: str) -> None:
        """Write a line of its own on stderr, above the spinner's line (which is redrawn)."""
        with self._lock:
            erase = "\r" + " " * self._width + "\r" if self._active and self._width else ""
            self._width = 0
            self._write(f"{erase}{line}\n")

    def _set(self, text: str) -> None:
        with self._lock:
            self._text = text

    def _spin(self) -> None:
        for frame in itertools.cycle(_FRAMES):
            if self._stop.wait(_INTERVAL_S):
                return
            with self._lock:
                line = f"{frame} {self._text}"
                pad = max(0, self._width - len(line))
                self._write("\r" + line + " " * pad)
                self._width = len(line)

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # stderr went away: stop drawing
            self._stop.set()

    def done(self) -> None:
        """Erase the line (idempotent); called when the answer starts or on any exit."""
        if not self._active:
            return
        self._active = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        with self._lock:
            if self._width:
                self._write("\r" + " " * self._width + "\r")
