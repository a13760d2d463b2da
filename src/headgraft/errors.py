"""The package's own exceptions: every message names the problem and the fix."""

from __future__ import annotations


class HeadgraftError(Exception):
    """Base class of every error headgraft raises on purpose.

    ``exit_code`` is what the command line exits with: 2 for bad input or usage, 1 otherwise.
    """

    exit_code = 1


class InputError(HeadgraftError, ValueError):
    """The caller's input is wrong (a name, a file, a shape); the message says how to fix it."""

    exit_code = 2


class HeadNotFoundError(InputError, LookupError):
    """No classification head could be located, or the given path is not one."""


class AmbiguousHeadError(HeadNotFoundError):
    """Several modules could be the head; the caller must name one."""


class LabelError(InputError, KeyError):
    """A label name is duplicated, already present, unknown, or the list is empty."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedHeadError(InputError, TypeError):
    """The head is of a kind headgraft cannot grow without losing exactness."""


class UnsafeFileError(InputError):
    """A file would need unpickling (or would be overwritten) and the caller has not allowed it."""
