"""Typed errors. Each carries the exit code the CLI uses and an optional hint.

Exit codes (stable, CI scripts rely on them):
  0 ok, 1 a threshold gate failed, 2 bad input or usage, 3 internal failure.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class ShrinkError(Exception):
    """Base class: a message for humans, an exit code for scripts, and a hint on what to do."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class BadInputError(ShrinkError):
    """The user gave us something we cannot use: a path, a file, an option."""

    exit_code = EXIT_BAD_INPUT


class ModelNotFoundError(BadInputError):
    pass


class UnsupportedModelError(BadInputError):
    pass


class CorruptCheckpointError(BadInputError):
    pass


class OutputExistsError(BadInputError):
    pass


class ManifestVersionError(BadInputError):
    pass


class ThresholdFailedError(ShrinkError):
    """A CI threshold (speed, size, quality) was not met."""

    exit_code = EXIT_THRESHOLD


GateFailedError = ThresholdFailedError  # the earlier name, for code written against it


class InternalError(ShrinkError):
    """Something that should not happen did (e.g. ONNX parity failed)."""

    exit_code = EXIT_INTERNAL
