"""A small named registry: strategies register once, next to their definition.

The command line's choices, the docs and the error for an unknown name all come from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered strategy: its name, the object, and a one-line description."""

    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    """Maps names to strategies of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a name can be registered once."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, obj, description)
            return obj

        return deco

    def get(self, name: str) -> T:
        """The strategy registered as ``name``; unknown names list the choices."""
        try:
            return self._entries[name].obj
        except KeyError:
            raise InputError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, for help texts and docs."""
        return {e.name: e.description for e in self._entries.values()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
