"""One exception family: every expected failure carries an exit code and a hint."""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def first_line(exc: BaseException) -> str:
    """A library exception as one line for our messages: its first line, or its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DiffcliError(Exception):
    """An expected failure: printed as one line on stderr, no traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(DiffcliError):
    """Bad flags, bad values or bad input files (exit 2)."""

    exit_code = EXIT_USAGE


class ModelError(UsageError):
    """A model spec that cannot be resolved, refused or loaded (exit 2)."""


class RuntimeFailure(DiffcliError):
    """The job was valid but failed while running, e.g. non-finite output (exit 1)."""

    exit_code = EXIT_FAILURE


class Interrupted(DiffcliError):
    """SIGINT (exit 130) or SIGTERM (exit 143) during a run."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str = "interrupted", exit_code: int = EXIT_INTERRUPTED):
        super().__init__(message)
        self.exit_code = exit_code
