"""The errors dsreg raises: each says what went wrong and what to do about it.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): errors are one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class DsregError(Exception):
    """Base of every error that dsreg reports to a user."""

    exit_code = 1


class UsageError(DsregError):
    """An argument that can never work (a bad name, tau out of range, ...)."""

    exit_code = 2


class InvalidName(UsageError):
    pass


class NotFound(DsregError):
    exit_code = 3


class SubjectNotFound(NotFound):
    pass


class RevisionNotFound(NotFound):
    pass


class BaseNotFound(NotFound):
    pass


class CheckpointError(DsregError):
    """A file that is not a checkpoint dsreg can read."""

    exit_code = 4


class UnsafeCheckpoint(CheckpointError):
    """A pickle that needs more than tensors and containers to load."""


class NonFiniteWeights(CheckpointError):
    pass


class BaseMismatch(DsregError):
    """The fine-tune does not fit the base (keys, shapes), or no base fits it."""

    exit_code = 5


class AmbiguousBase(BaseMismatch):
    pass


class Conflict(DsregError):
    """A name already taken, or a concurrent writer that won a race."""

    exit_code = 6


class IntegrityError(DsregError):
    """Stored bytes that do not hash to their name, or a reference with no object."""

    exit_code = 7


class StoreError(DsregError):
    """The catalog or object store could not be reached or written."""

    exit_code = 8


class OutputError(DsregError):
    """A file dsreg was asked to write could not be written (disk full, no permission, ...)."""

    exit_code = 9


def check_choice(what: str, value: str, choices) -> None:
    """A UsageError naming the choices, unless ``value`` is one of them."""
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
