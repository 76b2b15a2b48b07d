"""Names of subjects, bases and tags, and ``NAME@REV`` references.

A name is 1 to 128 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or a digit.
That charset is safe in file names, URLs, shells and SQL, so a name can never escape a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidName

MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_AUTO = re.compile(r"subject-([0-9]+)")
AUTO_PREFIX = "subject-"


def _printable(value: str) -> str:
    shown = value if len(value) <= 40 else value[:40] + "..."
    return ascii(shown)


def validate_name(value: str, what: str = "subject") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidName(
            f"invalid {what} name {_printable(value)}: use 1-{MAX_NAME} characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Ref:
    """A subject and optionally one revision number (``None``: the latest)."""

    subject: str
    revision: int | None = None

    def __str__(self) -> str:
        return self.subject if self.revision is None else f"{self.subject}@{self.revision}"


def parse_ref(text: str) -> Ref:
    name, sep, rev = text.partition("@")
    validate_name(name)
    if not sep:
        return Ref(name)
    # Not str.isdigit(): it accepts "²" and other digits that int() refuses.
    if not re.fullmatch(r"[0-9]{1,9}", rev) or int(rev) < 1:
        raise InvalidName(f"invalid revision in {_printable(text)}: use NAME@N with N a positive integer")
    return Ref(name, int(rev))


def auto_number(name: str) -> int | None:
    """The N of an automatically assigned ``subject-N``, or None for any other name."""
    match = _AUTO.fullmatch(name)
    return int(match.group(1)) if match else None


def as_ref(ref: str | Ref) -> Ref:
    """A ``SUBJECT[@REV]`` string or a Ref, as a Ref."""
    return parse_ref(ref) if isinstance(ref, str) else ref
