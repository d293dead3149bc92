"""The KvchatError family and the exit codes kvchat returns.

Library code raises these; the CLI entry point turns them into one line on stderr
and the error's exit code. Every message says what to do next.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit statuses, one name per outcome (httpie-style)."""

    SUCCESS = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    BAD_MODEL = 4
    OUT_OF_MEMORY = 5
    NETWORK = 6
    SESSION = 7
    INTERRUPTED = 130


class KvchatError(Exception):
    """Base of every error kvchat reports to a user."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message


class UsageError(KvchatError):
    """A flag or argument value that cannot be used."""

    exit_code = ExitCode.USAGE


class ModelNotFoundError(KvchatError):
    """A model reference that resolves to nothing."""

    exit_code = ExitCode.NOT_FOUND


class ModelFormatError(KvchatError):
    """A file that is not a readable GGUF model."""

    exit_code = ExitCode.BAD_MODEL


class ModelLoadError(KvchatError):
    """llama.cpp refused to load the model or create the context."""

    exit_code = ExitCode.BAD_MODEL


class OutOfMemoryError(KvchatError):
    """The requested settings do not fit the memory available."""

    exit_code = ExitCode.OUT_OF_MEMORY


class NetworkError(KvchatError):
    """A download or remote read failed."""

    exit_code = ExitCode.NETWORK


class SessionError(KvchatError):
    """A saved session that cannot be used as asked."""

    exit_code = ExitCode.SESSION
