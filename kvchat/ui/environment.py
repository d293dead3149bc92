"""The outside world in one object: streams, whether they are terminals, width.

Commands take an Environment instead of touching sys.* directly, so that "piped
in, piped out" is testable without a terminal.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Environment:
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def stdin_isatty(self) -> bool:
        try:
            return self.stdin is not None and self.stdin.isatty()
        except ValueError:
            return False

    @property
    def stderr_isatty(self) -> bool:
        try:
            return self.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def read_stdin(self) -> str:
        """All of stdin when it is piped; '' when it is a terminal or closed."""
        if self.stdin is None or self.stdin_isatty:
            return ""
        try:
            raw = getattr(self.stdin, "buffer", None)
            if raw is not None:  # bytes that are not UTF-8 become U+FFFD, never an error
                data: bytes = raw.read()
                return data.decode("utf-8", errors="replace")
            return valid_text(self.stdin.read())
        except (OSError, ValueError):
            return ""

    def err_console(self) -> Console:
        from rich.console import Console

        return Console(file=self.stderr, no_color="NO_COLOR" in os.environ, highlight=False)

    def out_console(self) -> Console:
        from rich.console import Console

        return Console(file=self.stdout, no_color="NO_COLOR" in os.environ, highlight=False)

    def warn(self, message: str) -> None:
        self.stderr.write(f"kvchat: warning: {message}\n")
        self.stderr.flush()


def valid_text(text: str) -> str:
    """Text that encodes as UTF-8: arguments carry undecodable bytes as lone
    surrogates (PEP 383); they become U+FFFD, as bytes from stdin do."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text
